"""What a backend is called, and which one runs (or is built for) when the user says ``auto``.

The one owner of the backend names, their help text and both ``auto`` ladders:

* :func:`open_backend` — the backend that runs a loaded build (``Pipeline.from_dir``,
  ``ecar-run --backend``). ``auto`` takes, in order: TensorRT where the build has plans and
  TensorRT can run here; ONNX Runtime on CUDA where onnxruntime-gpu is installed and sees a
  GPU (``device`` not "cpu"); otherwise the fastest installed CPU backend
  (:data:`CPU_PREFERENCE`, measured with ``benchmarks/pipeline_speed.py`` on this project's
  CPUs, an AMD EPYC with AVX-512-BF16 and an Intel Xeon with AMX: on ecar-b at batch 8
  OpenVINO ran every precision faster than ONNX Runtime, fp32 2.0x, fp16 builds (at bf16)
  3.1x and int8 2.3x its speed on the EPYC; only on the tiny demo model, whose calls are
  short, is ONNX Runtime faster at fp32 and int8). Where the chosen OpenVINO is installed
  but cannot start, ``auto`` goes on with ONNX Runtime after one warning.
* :func:`build_target` — what ``ecar-export build --backend`` writes for. ``auto`` builds
  TensorRT plans where TensorRT imports and an NVIDIA GPU is visible, else the ONNX graphs
  for ONNX Runtime. ``openvino`` builds the same ONNX graphs and has OpenVINO compile each
  one before the commit, so a graph it cannot run fails the build, not the first request;
  the manifest records the backend, and ``auto`` chooses for such a build as for any build
  without TensorRT plans.
"""

from __future__ import annotations

import importlib.util
import warnings
from typing import TYPE_CHECKING

from runtime.errors import BackendUnavailableError, ECARWarning, InvalidRequestError

if TYPE_CHECKING:
    from runtime.backends import Backend
    from runtime.manifest import Manifest

BACKENDS = ("onnxruntime", "openvino", "tensorrt")  # what a build is made for (the manifest's "backend")
CHOICES = ("auto", *BACKENDS)
DEVICES = ("auto", "cpu", "cuda")
NAMES = {"onnxruntime": "ONNX Runtime", "openvino": "OpenVINO", "tensorrt": "TensorRT"}
CPU_PREFERENCE = ("openvino", "onnxruntime")  # fastest first, at every precision (see the module doc)
INSTALL = (
    "install an inference engine: pip install 'ecar-export[onnxruntime]' (CPU), 'ecar-export[openvino]' (CPU, "
    "AMX / AVX-512), 'ecar-export[gpu]' (CUDA) or 'ecar-export[tensorrt]'"
)
RUN_HELP = (
    "auto (TensorRT plans where they can run, else ONNX Runtime on CUDA, else the fastest installed CPU backend: "
    "OpenVINO, else ONNX Runtime) | onnxruntime | openvino | tensorrt."
)
BUILD_HELP = (
    "auto (TensorRT where importable and a GPU is present, else onnxruntime) | onnxruntime | openvino (the same "
    "ONNX graphs, each compiled by OpenVINO once to check it) | tensorrt."
)
DEVICE_HELP = "ONNX Runtime device: auto | cpu | cuda."


def no_plans(where: object, built_for: str) -> str:
    """The message for asking TensorRT to run a build without plans."""
    return (
        f"'{where}' holds no TensorRT plans (built for {built_for}); rebuild with "
        "`ecar-export build --backend tensorrt` on a machine with TensorRT"
    )


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def check_choice(backend: object) -> None:
    if backend not in CHOICES:
        raise InvalidRequestError(f"unknown backend '{backend}': use {', '.join(CHOICES)}")


def check_device(device: object) -> None:
    if device not in DEVICES:
        raise InvalidRequestError(f"unknown device '{device}': use {', '.join(DEVICES)}")


def onnxruntime_has_cuda() -> bool:
    if not installed("onnxruntime"):
        return False
    import onnxruntime

    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


def cpu_backend() -> str:
    """The CPU backend ``auto`` runs a build on: the first installed of :data:`CPU_PREFERENCE`."""
    for name in CPU_PREFERENCE:
        if installed(name):
            return name
    raise BackendUnavailableError(f"no CPU inference engine is installed here; {INSTALL}")


def cuda_wanted(device: str) -> bool:
    """ONNX Runtime on CUDA: asked for, or ``auto`` with onnxruntime-gpu seeing a GPU."""
    return device == "cuda" or (device == "auto" and onnxruntime_has_cuda())


def tensorrt_buildable() -> bool:
    """TensorRT importable (a real one, not the type stubs) and an NVIDIA GPU visible to the driver."""
    from runtime.backends.tensorrt.gpu import gpu_available
    from runtime.backends.tensorrt.loader import tensorrt_version

    return tensorrt_version() is not None and gpu_available()


def build_target(backend: str) -> str:
    """The backend a build writes for: ``auto`` resolved (see the module doc), a missing engine refused."""
    check_choice(backend)
    if backend == "openvino":
        from runtime.backends.openvino_backend import load_openvino

        load_openvino()  # a clear BackendUnavailableError where OpenVINO is missing
        return backend
    if backend in ("tensorrt", "auto"):
        if tensorrt_buildable():
            return "tensorrt"
        if backend == "tensorrt":
            raise BackendUnavailableError(
                "TensorRT is not available here (the 'tensorrt' package is not importable "
                "or no NVIDIA GPU is visible); "
                "install the 'tensorrt' extra on a GPU machine, or use --backend onnxruntime"
            )
    return "onnxruntime"


def open_backend(
    manifest: Manifest, backend: str = "auto", device: str = "auto", threads: int | None = None
) -> Backend:
    """The backend that runs ``manifest``'s build here (``auto``: the ladder of the module doc).

    ``device`` (ONNX Runtime): "auto", "cpu" or "cuda". ``threads`` caps the CPU threads of
    each graph (ONNX Runtime's intra-op threads, OpenVINO's inference threads).
    """
    check_choice(backend)
    check_device(device)
    if backend == "tensorrt" and manifest.backend != "tensorrt":
        raise BackendUnavailableError(no_plans(manifest.root, manifest.backend))
    if manifest.backend == "tensorrt" and backend in ("tensorrt", "auto"):
        from runtime.backends import tensorrt

        problem = tensorrt.probe(manifest)
        if problem is None:
            return tensorrt.TensorRTBackend(manifest)
        if backend == "tensorrt":
            raise BackendUnavailableError(problem)
        fallback = "onnxruntime" if cuda_wanted(device) else cpu_backend()
        where = "ONNX Runtime on CUDA" if cuda_wanted(device) else NAMES[fallback]
        warnings.warn(
            f"the TensorRT plans in '{manifest.root}' cannot run here, using {where} instead: "
            f"{problem.splitlines()[0]}",
            ECARWarning,
            stacklevel=3,
        )
        backend = fallback
    chosen = backend == "auto"
    if backend == "auto":
        if cuda_wanted(device):
            backend = "onnxruntime"
        else:
            backend = cpu_backend()
            device = "cpu" if backend == "onnxruntime" else device
    if backend == "openvino":
        from runtime.backends.openvino_backend import OpenVINOBackend

        try:
            return OpenVINOBackend(manifest, threads=threads)
        except BackendUnavailableError as exc:  # installed but broken: auto goes on with ONNX Runtime
            if not (chosen and installed("onnxruntime")):
                raise
            warnings.warn(f"using ONNX Runtime instead of OpenVINO: {exc}", ECARWarning, stacklevel=3)
            device = "cpu"
    from runtime.backends.onnxruntime_backend import OnnxRuntimeBackend

    return OnnxRuntimeBackend(manifest, device=device, threads=threads)
