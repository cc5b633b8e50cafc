"""CUDA-graph capture of a stage's flow-step loop (UNTESTED with real TensorRT).

After a stage's loop has run eagerly twice on its own execution context (a warm-up, then a
run that is followed by the capture), the loop is recorded into a CUDA graph and later
requests of that batch size replay it. A failed capture leaves the stage eager and is
reported as a warning.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from runtime.backends.tensorrt import gpu
from runtime.errors import BackendUnavailableError, EngineError

if TYPE_CHECKING:
    import tensorrt as trt


@dataclass
class StageGraph:
    """A stage's flow loop captured into a CUDA graph, on its own execution context."""

    context: trt.IExecutionContext
    binds: list[dict[str, int]] = field(default_factory=list)  # each step's device addresses, as captured
    warmed: bool = False
    graph: int = 0
    executable: int = 0
    failed: str | None = None


def capture(cuda: gpu.CudaDriver, stream: int, stage_graph: StageGraph, enqueue: Callable[[], None]) -> str | None:
    """Record ``enqueue``'s work into ``stage_graph``; returns why the capture failed, or None."""
    cuda.stream_synchronize(stream)  # TensorRT: enqueue once and wait before capturing
    graph = 0
    try:
        cuda.begin_capture(stream)
        try:
            enqueue()
        finally:
            graph = cuda.end_capture(stream)
        stage_graph.executable = cuda.graph_instantiate(graph)
        stage_graph.graph = graph
    except (EngineError, BackendUnavailableError) as exc:
        if graph:
            cuda.graph_destroy(graph)
        stage_graph.failed = str(exc)
        return str(exc)
    return None
