"""Which backend runs a build: the ``backend`` argument of ``Pipeline.from_dir`` and ``ecar-run``.

``auto`` takes, in order: TensorRT where the build has plans and TensorRT can run here; ONNX
Runtime on CUDA where onnxruntime-gpu is installed and sees a GPU (``device`` not "cpu");
otherwise the fastest installed CPU backend for the build's precision (:data:`CPU_PREFERENCE`,
measured with ``benchmarks/pipeline_speed.py`` on this project's CPUs, an AMD EPYC with
AVX-512-BF16 and an Intel Xeon with AMX: on ecar-b at batch 8 OpenVINO ran every precision
faster than ONNX Runtime, fp32 2.0x, fp16 builds (at bf16) 3.1x and int8 2.3x its speed on the
EPYC; only on the tiny demo model, whose calls are short, is ONNX Runtime faster at fp32 and
int8). Where the chosen OpenVINO is installed but cannot start, ``auto`` goes on with ONNX
Runtime after one warning. A build made with ``ecar-export build --backend
openvino`` records that backend in its manifest (OpenVINO compiled each of its graphs once, at
build time); its graphs are the same ONNX graphs, and ``auto`` chooses for it as for any build
without TensorRT plans.
"""

from __future__ import annotations

import importlib.util

from runtime.errors import BackendUnavailableError, InvalidRequestError

CHOICES = ("auto", "onnxruntime", "openvino", "tensorrt")
NAMES = {"onnxruntime": "ONNX Runtime", "openvino": "OpenVINO", "tensorrt": "TensorRT"}
CPU_PREFERENCE = {
    "fp32": ("openvino", "onnxruntime"),
    "fp16": ("openvino", "onnxruntime"),
    "int8": ("openvino", "onnxruntime"),
}
INSTALL = (
    "install an inference engine: pip install 'ecar-export[onnxruntime]' (CPU), 'ecar-export[openvino]' (CPU, "
    "AMX / AVX-512), 'ecar-export[gpu]' (CUDA) or 'ecar-export[tensorrt]'"
)


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def check_choice(backend: str) -> None:
    if backend not in CHOICES:
        raise InvalidRequestError(f"unknown backend '{backend}': use {', '.join(CHOICES)}")


def onnxruntime_has_cuda() -> bool:
    if not installed("onnxruntime"):
        return False
    import onnxruntime

    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


def cpu_backend(precision: str) -> str:
    """The CPU backend ``auto`` runs a build of ``precision`` on: the first installed of :data:`CPU_PREFERENCE`."""
    for name in CPU_PREFERENCE[precision]:
        if installed(name):
            return name
    raise BackendUnavailableError(f"no CPU inference engine is installed here; {INSTALL}")
