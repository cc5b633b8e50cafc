"""One deserialized TensorRT plan checked against its graph's contract, its contexts, and enqueueing it.

A plan holds one optimisation profile per stage its graph runs at (in the order of
:meth:`runtime.plan.RequestPlan.graph_stages`); each gets its own execution context, bound to that
profile once, so a request never switches profiles. Contexts have no memory of their own:
they share the backend's activation buffer.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from runtime.backends.tensorrt.compat import REBUILD
from runtime.backends.tensorrt.loader import LogBook, log_tail_text
from runtime.backends.tensorrt.memory import SharedScratch
from runtime.errors import EngineError
from runtime.graphs import GraphSpec

if TYPE_CHECKING:  # the stubs (tensorrt-stubs) type these where installed; Any otherwise
    import tensorrt as trt


class EngineRunner:
    """A plan's I/O names and dtypes (checked against the contract), its contexts, and enqueue.

    Execution contexts are created with user-managed device memory and bound to the backend's
    :class:`SharedScratch`: :meth:`memory_needed` tells how much the largest one needs.
    """

    def __init__(
        self,
        name: str,
        spec: GraphSpec,
        engine: trt.ICudaEngine,
        trt_module: ModuleType,
        book: LogBook,
        stages: list[int],
    ) -> None:
        self.name = name
        self.spec = spec
        self.stages = stages
        profiles = int(engine.num_optimization_profiles)
        if profiles != len(stages):
            raise EngineError(
                f"the TensorRT plan of graph '{name}' has {profiles} optimisation profile(s), the graph runs at "
                f"{len(stages)} stage(s) ({stages}); {REBUILD}"
            )
        self.engine = engine
        self.trt = trt_module
        self.book = book
        io_names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        modes = {n: engine.get_tensor_mode(n) for n in io_names}
        engine_inputs = {n for n in io_names if modes[n] == trt_module.TensorIOMode.INPUT}
        engine_outputs = {n for n in io_names if modes[n] == trt_module.TensorIOMode.OUTPUT}
        unexpected = sorted(engine_inputs - set(spec.input_names()))
        missing = sorted(set(spec.output_names()) - engine_outputs)
        if unexpected or missing:
            raise EngineError(
                f"the TensorRT plan of graph '{name}' does not match the graph contract (unexpected inputs "
                f"{unexpected}, missing outputs {missing}); {REBUILD}"
            )
        # inputs the graph never reads are dropped by the ONNX parser; the runtime skips them too
        self.inputs = [t.name for t in spec.inputs if t.name in engine_inputs]
        self.outputs = spec.output_names()
        self.dtypes: dict[str, np.dtype[Any]] = {}
        for tensor in (*spec.inputs, *spec.outputs):
            if tensor.name not in engine_inputs | engine_outputs:
                continue
            actual = np.dtype(trt_module.nptype(engine.get_tensor_dtype(tensor.name)))
            if actual != np.dtype(tensor.dtype):
                raise EngineError(
                    f"the TensorRT plan of graph '{name}' has {tensor.name} of type {actual}, the contract says "
                    f"{tensor.dtype}; {REBUILD}"
                )
            location = getattr(engine, "get_tensor_location", None)
            if location is not None and location(tensor.name) == trt_module.TensorLocation.HOST:
                raise EngineError(
                    f"the TensorRT plan of graph '{name}' wants '{tensor.name}' in host memory (a shape tensor); "
                    "this runtime binds device memory only"
                )
            self.dtypes[tensor.name] = actual
        self.contexts: dict[int, trt.IExecutionContext] = {}  # stage -> the context of its profile
        self._verified: set[tuple[int, tuple[tuple[str, int], ...]]] = set()

    def profile(self, stage: int) -> int:
        """The optimisation profile (index) of a stage."""
        try:
            return self.stages.index(stage)
        except ValueError:
            raise EngineError(f"graph '{self.name}' has no profile for stage {stage}") from None

    def memory_needed(self) -> int:
        """Activation memory one execution context of this plan needs (its largest profile)."""
        by_profile = getattr(self.engine, "get_device_memory_size_for_profile_v2", None)
        if by_profile is not None:
            return max(int(by_profile(index)) for index in range(len(self.stages)))
        return int(self.engine.device_memory_size)  # TensorRT 10.0

    def open_contexts(self, scratch: SharedScratch, stream: int) -> None:
        """One context per profile (per stage), each bound to its profile once."""
        for stage in self.stages:
            self.contexts[stage] = self.new_context(scratch, stage, stream)

    def new_context(self, scratch: SharedScratch, stage: int, stream: int) -> trt.IExecutionContext:
        """An execution context on the profile of ``stage``, without memory of its own, bound to ``scratch``."""
        mark = self.book.mark()
        strategy = self.trt.ExecutionContextAllocationStrategy.USER_MANAGED
        context: trt.IExecutionContext | None = self.engine.create_execution_context(strategy)
        if context is None:
            raise EngineError(
                f"TensorRT cannot create an execution context for graph '{self.name}'" + log_tail_text(self.book, mark)
            )
        needed = self.memory_needed()
        if needed > scratch.size:
            raise EngineError(
                f"internal error: graph '{self.name}' needs {needed} bytes of activation memory, the shared scratch "
                f"buffer holds {scratch.size}"
            )
        if hasattr(context, "set_device_memory"):
            context.set_device_memory(scratch.pointer, scratch.size)
        else:  # TensorRT 10.0
            setattr(context, "device_memory", scratch.pointer)  # noqa: B010
        profile = self.profile(stage)
        if profile and not context.set_optimization_profile_async(profile, stream):
            raise EngineError(
                f"TensorRT cannot select profile {profile} (stage {stage}) of graph '{self.name}'"
                + log_tail_text(self.book, mark)
            )
        return context

    def context(self, stage: int) -> trt.IExecutionContext:
        """The execution context of a stage's profile."""
        try:
            return self.contexts[stage]
        except KeyError:
            raise EngineError(f"graph '{self.name}' has no profile for stage {stage}") from None

    def shape(self, name: str, dims: Mapping[str, int]) -> tuple[int, ...]:
        for tensor in (*self.spec.inputs, *self.spec.outputs):
            if tensor.name == name:
                return tensor.concrete(dict(dims))
        raise EngineError(f"graph '{self.name}' has no tensor '{name}'")

    def enqueue(
        self, context: trt.IExecutionContext, dims: Mapping[str, int], addresses: Mapping[str, int], stream: int
    ) -> None:
        """Set shapes and addresses on ``context`` and enqueue one inference on ``stream``."""
        mark = self.book.mark()
        for name in self.inputs:
            shape = self.shape(name, dims)
            if not context.set_input_shape(name, shape):
                raise EngineError(
                    f"TensorRT rejected shape {shape} for input '{name}' of graph '{self.name}' (outside the plan's "
                    "batch profile?)" + log_tail_text(self.book, mark)
                )
        for name in (*self.inputs, *self.outputs):
            if not context.set_tensor_address(name, int(addresses[name])):
                raise EngineError(
                    f"TensorRT rejected the device address of '{name}' of graph '{self.name}'"
                    + log_tail_text(self.book, mark)
                )
        key = (id(context), tuple(sorted(dims.items())))
        if key not in self._verified:
            for name in self.outputs:
                dims_out = context.get_tensor_shape(name)
                got = tuple(int(dims_out[d]) for d in range(len(dims_out)))
                if got != self.shape(name, dims):
                    raise EngineError(
                        f"the TensorRT plan of graph '{self.name}' computes {name} of shape {got}, the contract says "
                        f"{self.shape(name, dims)}; {REBUILD}"
                    )
            self._verified.add(key)
        if not context.execute_async_v3(stream):
            raise EngineError(f"TensorRT failed to run graph '{self.name}'" + log_tail_text(self.book, mark))
