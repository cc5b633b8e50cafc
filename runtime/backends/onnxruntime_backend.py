"""ONNX Runtime backend: one InferenceSession per graph, created once and shared by all threads.

CPUExecutionProvider by default; with ``device="cuda"`` (or ``"auto"`` where
onnxruntime-gpu is installed and sees a GPU) the CUDA execution provider. ORT silently
falls back to the CPU when a GPU provider cannot start, so the providers a session
actually uses are checked, not the ones requested. (TensorRT runs through its own backend,
:mod:`runtime.backends.tensorrt`, never through ORT's TensorRT execution provider.)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from runtime.errors import BackendUnavailableError, EngineError
from runtime.graphs import Call
from runtime.manifest import Manifest
from runtime.sub_batches import host_activation_budget


def _ort() -> Any:
    try:
        import onnxruntime
    except ImportError as exc:  # pragma: no cover - onnxruntime is a core dependency
        raise BackendUnavailableError(f"onnxruntime is not installed ({exc}); pip install onnxruntime") from None
    return onnxruntime


def choose_providers(device: str) -> list[str]:
    """Execution providers for ``device`` in {"cpu", "cuda", "auto"}."""
    available = _ort().get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device in ("cuda", "auto"):
        if "CUDAExecutionProvider" in available:
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]
        if device == "cuda":
            raise BackendUnavailableError(
                "ONNX Runtime has no CUDAExecutionProvider here: install the 'gpu' extra (onnxruntime-gpu, "
                "in place of onnxruntime) on a machine with an NVIDIA GPU, or use device 'cpu'"
            )
        return ["CPUExecutionProvider"]
    raise BackendUnavailableError(f"unknown ONNX Runtime device '{device}': use cpu, cuda or auto")


def session_options(threads: int | None = None) -> Any:
    """The ``SessionOptions`` every graph of a build is loaded with (benchmarks reuse them)."""
    ort = _ort()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    # No CPU memory arena: with a dynamic batch / token axis the arena keeps growing to the
    # largest concurrent working set and never returns it; without it, peak RSS of a batch-8
    # demo request fell from 159 to 141 MB at no measured cost in speed.
    options.enable_cpu_mem_arena = False
    # Intra-op threads sleep instead of spinning between kernels. A generate call is hundreds
    # of short kernels; when anything else wants a core (another process, Ray's proxy, the
    # client threads of a server), spinning threads steal its time slices: the demo at batch 8
    # ran 20 img/s with spinning and 94 img/s without on a 2-core machine with one core busy.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        options.intra_op_num_threads = threads
    return options


def disabled_optimizers(precision: str) -> list[str]:
    """ORT graph optimizers turned off for a graph of ``precision``.

    INT8: common-subexpression elimination. The INT8 graphs give every quantized node its
    own QuantizeLinear/DequantizeLinear pair (the recipe's ``DedicatedQDQPair``). ORT's CPU
    kernels are fast for uint8 activations × int8 weights, so ORT rewrites each symmetric
    int8 Q/DQ pair to uint8 — but only a pair whose Q feeds a single DQ. CSE first merges the
    identical Q nodes of an activation that several MatMuls read (the AdaLN modulation
    Linears all read SiLU(condition)), the merged pair stays int8, and those QGemms fell to
    ORT's slow int8×int8 path: the ecar-b flow step at batch 8 ran 1.71 s with CSE against
    0.31 s without it, and 0.86 s in fp32 (``benchmarks/README.md``).
    """
    return ["CommonSubexpressionElimination"] if precision == "int8" else []


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(self, manifest: Manifest, device: str = "cpu", threads: int | None = None) -> None:
        ort = _ort()
        providers = choose_providers(device)
        options = session_options(threads)
        self.sessions: dict[str, Any] = {}
        self.output_names: dict[str, list[str]] = {}
        for name, entry in manifest.graphs.items():
            path = manifest.path(entry.file)
            try:
                session = ort.InferenceSession(
                    str(path),
                    sess_options=options,
                    providers=providers,
                    disabled_optimizers=disabled_optimizers(entry.precision) or None,
                )
            except Exception as exc:  # ORT raises its own exception types for bad models
                raise EngineError(f"ONNX Runtime cannot load graph '{name}' from '{path}': {exc}") from None
            used = session.get_providers()
            if used[0] != providers[0]:
                raise BackendUnavailableError(
                    f"ONNX Runtime fell back to {used[0]} for graph '{name}' although {providers[0]} was requested; "
                    "check the CUDA / cuDNN installation or use device 'cpu'"
                )
            self.sessions[name] = session
            self.output_names[name] = entry.spec.output_names()
        self.providers = providers
        # on the CPU, a call's activations are allocated per call: cut the large ones (runtime.sub_batches)
        self.activation_budget = host_activation_budget() if providers[0] == "CPUExecutionProvider" else None

    def run(self, call: Call, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        try:
            session, outputs = self.sessions[call.graph], self.output_names[call.graph]
        except KeyError:
            raise EngineError(f"this build has no graph '{call.graph}'") from None
        return list(session.run(outputs, dict(feeds)))

    def describe(self) -> dict[str, object]:
        return {
            "backend": self.name,
            "providers": self.providers,
            "onnxruntime": _ort().__version__,
            "activation_budget": self.activation_budget,
        }
