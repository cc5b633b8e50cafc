"""TensorRT backend: deserialized plans, device-resident buffers, one CUDA stream (DESIGN §5).

Nothing here imports TensorRT (or touches the GPU) at module import time: ``tensorrt`` is
imported inside functions, and CUDA is reached through :mod:`runtime.gpu` (the driver API over
ctypes; see there why not polygraphy.cuda or cuda-python).

Two ways to run:

* :meth:`TensorRTBackend.run` — the :class:`~runtime.backends.Backend` protocol: numpy feeds in,
  numpy outputs out, one graph per call (host round trip per call). Device buffers are
  allocated lazily per graph and input shape and then reused.
* :meth:`TensorRTBackend.generate_on_device` — a whole request on the device: labels, noise and
  the per-request scalars go in, the decoded image and final latents come out, and every
  intermediate (z, x, KV cache) stays in device buffers that are bound to the next engine by
  address (no copies between engines at all). Buffers are allocated once per batch size and
  reused. With ``cuda_graphs=True`` each stage's flow-step loop gets its own execution context
  per batch size; after its second eager run it is captured into a CUDA graph, which later
  requests of that batch size replay (UNTESTED with real TensorRT; a failed capture falls back
  to eager launches and is reported in ``describe()["warnings"]``).

Threading: one lock around everything that touches the shared stream, execution contexts and
buffers. Concurrent calls from several threads are safe and return what sequential calls
return; they run one at a time on the GPU. For GPU-side concurrency create one backend per
thread (each has its own contexts, stream and buffers).

Compatibility: before anything is deserialized, the manifest's ``tensorrt`` block is checked
against the running TensorRT version and GPU (:func:`check_plan_compatibility`); plans only load
in the exact TensorRT version that built them and, unless built with a hardware compatibility
level, on GPUs of the same compute capability.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from runtime import gpu
from runtime.errors import BackendUnavailableError, EngineError, InvalidRequestError, ManifestError
from runtime.graphs import GraphSpec, stage_times
from runtime.manifest import Manifest

if TYPE_CHECKING:  # the stubs (tensorrt-stubs) type these where installed; Any otherwise
    import tensorrt as trt

LOG = logging.getLogger("ecar.tensorrt")
REBUILD = "rebuild with `ecar-export build --backend tensorrt` on this machine"
HARDWARE_COMPATIBILITY_LEVELS = ("none", "same_compute_capability", "ampere_plus")
AMPERE = (8, 0)
ADDRESS_ALIGNMENT = 256  # bytes between the per-request scalars (t, dt, cfg) in their device buffer
LOG_TAIL = 25


# ----------------------------------------------------------------------------- TensorRT import
def load_tensorrt() -> ModuleType:
    """``import tensorrt``, or :class:`BackendUnavailableError` saying how to get it.

    A stubs-only install (``tensorrt-stubs`` without TensorRT) imports as an empty namespace
    package; that is treated as "not installed".
    """
    try:
        import tensorrt

        module: ModuleType = tensorrt
    except Exception as exc:  # ImportError, or OSError/RuntimeError from a broken install
        raise BackendUnavailableError(
            f"TensorRT is not importable here ({type(exc).__name__}: {exc}); install the 'tensorrt' extra "
            "(pip install '.[tensorrt]') on a machine with an NVIDIA GPU, or use the onnxruntime backend"
        ) from None
    if not isinstance(getattr(module, "__version__", None), str) or not hasattr(module, "Builder"):
        raise BackendUnavailableError(
            "TensorRT is not installed (the 'tensorrt' module found here is only type stubs); install the "
            "'tensorrt' extra (pip install '.[tensorrt]') on a machine with an NVIDIA GPU, or use the onnxruntime "
            "backend"
        )
    return module


def tensorrt_version() -> str | None:
    """The installed TensorRT's version, or None where TensorRT cannot be imported."""
    try:
        return str(load_tensorrt().__version__)
    except BackendUnavailableError:
        return None


def tensorrt_major(version: str) -> int:
    head = version.split(".", 1)[0]
    return int(head) if head.isdigit() else 0


class LogBook:
    """The TensorRT log of this process, kept so errors can show what TensorRT said."""

    def __init__(self, size: int = 4000) -> None:
        self._lines: deque[tuple[int, str, str]] = deque(maxlen=size)
        self._count = 0
        self._lock = threading.Lock()

    def add(self, severity: str, message: str) -> None:
        with self._lock:
            self._count += 1
            self._lines.append((self._count, severity, message))

    def mark(self) -> int:
        with self._lock:
            return self._count

    def since(self, mark: int, limit: int = LOG_TAIL) -> list[str]:
        """The last ``limit`` messages logged after ``mark`` (warnings and errors first choice)."""
        with self._lock:
            lines = [(sev, msg) for number, sev, msg in self._lines if number > mark]
        important = [f"[{sev}] {msg}" for sev, msg in lines if sev in ("ERROR", "INTERNAL_ERROR", "WARNING")]
        chosen = important or [f"[{sev}] {msg}" for sev, msg in lines]
        return chosen[-limit:]


_LOGGER: Any = None
_LOGGER_LOCK = threading.Lock()
_PY_LEVELS = {
    "INTERNAL_ERROR": logging.ERROR,
    "ERROR": logging.ERROR,
    "WARNING": logging.WARNING,
    "INFO": logging.INFO,
}


def tensorrt_logger(trt_module: ModuleType) -> tuple[trt.ILogger, LogBook]:
    """The process-wide capturing ``trt.ILogger`` and its :class:`LogBook`.

    One instance per process: TensorRT keeps the logger given to the first Builder/Runtime and
    ignores (with a warning) any other one passed later.
    """
    global _LOGGER
    with _LOGGER_LOCK:
        if _LOGGER is None:
            base = trt_module.ILogger

            class CapturingLogger(base):  # type: ignore[misc, valid-type]
                def __init__(self) -> None:
                    base.__init__(self)
                    self.book = LogBook()

                def log(self, severity: Any, msg: str) -> None:
                    name = str(getattr(severity, "name", severity)).rsplit(".", 1)[-1]
                    if name == "VERBOSE":
                        return
                    self.book.add(name, msg)
                    LOG.log(_PY_LEVELS.get(name, logging.DEBUG), "TensorRT: %s", msg)

            _LOGGER = CapturingLogger()
        return _LOGGER, _LOGGER.book


def log_tail_text(book: LogBook, mark: int) -> str:
    tail = book.since(mark)
    return ("\nTensorRT log (last messages):\n  " + "\n  ".join(tail)) if tail else ""


# ----------------------------------------------------------------------------- compatibility
@dataclass(frozen=True)
class RunningEnvironment:
    """What plans must match on this machine."""

    tensorrt_version: str
    gpu_name: str
    compute_capability: str


def running_environment(device_index: int = 0) -> RunningEnvironment:
    version = str(load_tensorrt().__version__)
    info = gpu.gpu_info(device_index)
    return RunningEnvironment(version, info.name, info.compute_capability)


def check_plan_compatibility(block: object, env: RunningEnvironment) -> list[str]:
    """Refuse plans that cannot load here; returns warnings for differences that still load.

    ``block`` is the manifest's top-level ``tensorrt`` object: {version, gpu_name,
    compute_capability, hardware_compatibility, strongly_typed}. Raises
    :class:`ManifestError` naming what differs and what to rebuild.
    """
    if not isinstance(block, Mapping):
        raise ManifestError(f"the manifest has no 'tensorrt' block describing its plans; {REBUILD}")
    for key, kind in (("version", str), ("gpu_name", str), ("compute_capability", str)):
        if not isinstance(block.get(key), kind):
            raise ManifestError(f"the manifest's 'tensorrt' block lacks a valid '{key}'; {REBUILD}")
    level = block.get("hardware_compatibility", "none")
    if level not in HARDWARE_COMPATIBILITY_LEVELS:
        raise ManifestError(
            f"the manifest's 'tensorrt' block has unknown hardware_compatibility {level!r} "
            f"(known: {', '.join(HARDWARE_COMPATIBILITY_LEVELS)}); {REBUILD}"
        )
    built_version = block["version"]
    if built_version != env.tensorrt_version:
        raise ManifestError(
            f"the TensorRT plans were built with TensorRT {built_version} but this machine runs TensorRT "
            f"{env.tensorrt_version}; plans load only in the exact TensorRT version that built them: {REBUILD} "
            f"(or install TensorRT {built_version})"
        )
    try:
        built_cc = gpu.parse_compute_capability(block["compute_capability"])
        here_cc = gpu.parse_compute_capability(env.compute_capability)
    except ValueError as exc:
        raise ManifestError(f"the manifest's 'tensorrt' block: {exc}; {REBUILD}") from None
    built_gpu = f"{block['gpu_name']} (compute capability {block['compute_capability']})"
    here_gpu = f"{env.gpu_name} (compute capability {env.compute_capability})"
    if level == "ampere_plus":
        if here_cc < AMPERE:
            raise ManifestError(
                f"the TensorRT plans were built with hardware compatibility 'ampere_plus', which needs an Ampere or "
                f"newer GPU (compute capability >= 8.0), but this GPU is {here_gpu}; {REBUILD}"
            )
    elif built_cc != here_cc:
        raise ManifestError(
            f"the TensorRT plans were built for {built_gpu} and cannot run on this {here_gpu}; {REBUILD}, "
            "or build portable plans with hardware compatibility 'ampere_plus'"
        )
    warnings = []
    if block["gpu_name"] != env.gpu_name:
        warnings.append(
            f"plans were built on {built_gpu} and run on {here_gpu}: they load, but their kernels were tuned for "
            f"the other GPU; {REBUILD} for best speed"
        )
    return warnings


def probe(manifest: Manifest, device_index: int = 0) -> str | None:
    """Why this build's TensorRT plans cannot run here, or None when they can (loads nothing).

    For ``Pipeline.from_dir(backend="auto")``: fall back to ONNX Runtime when this says why not.
    """
    if manifest.backend != "tensorrt":
        return f"the build holds no TensorRT plans (built for {manifest.backend})"
    missing = [name for name, entry in manifest.graphs.items() if not entry.plan_file]
    if missing:
        return f"the manifest names no TensorRT plan for {', '.join(missing)}; {REBUILD}"
    try:
        check_plan_compatibility(manifest.raw.get("tensorrt"), running_environment(device_index))
    except (BackendUnavailableError, ManifestError, EngineError) as exc:
        return str(exc)
    return None


# ----------------------------------------------------------------------------- shapes
def resolve_dims(spec: GraphSpec, shapes: Mapping[str, Sequence[int]]) -> dict[str, int]:
    """The symbolic dims (B, 2B, M, 2M) of ``spec`` implied by concrete input ``shapes``.

    Raises :class:`InvalidRequestError` when a shape does not fit the graph's contract.
    """
    values: dict[str, int] = {}
    for tensor in spec.inputs:
        if tensor.name not in shapes:
            raise InvalidRequestError(f"graph '{spec.name}' needs input '{tensor.name}'")
        shape = tuple(int(d) for d in shapes[tensor.name])
        if len(shape) != len(tensor.shape):
            raise InvalidRequestError(
                f"graph '{spec.name}' input '{tensor.name}' must have {len(tensor.shape)} dims, got shape {shape}"
            )
        for want, got in zip(tensor.shape, shape):
            if isinstance(want, int):
                if want != got:
                    raise InvalidRequestError(
                        f"graph '{spec.name}' input '{tensor.name}' has shape {shape}, the contract says "
                        f"{list(tensor.shape)}"
                    )
                continue
            base, factor = (want[1:], 2) if want.startswith("2") else (want, 1)
            if got <= 0 or got % factor:
                raise InvalidRequestError(f"graph '{spec.name}' input '{tensor.name}': dim {want}={got} is invalid")
            if values.setdefault(base, got // factor) != got // factor:
                raise InvalidRequestError(
                    f"graph '{spec.name}' input '{tensor.name}' has shape {shape}, inconsistent with the other inputs "
                    f"({base}={values[base]})"
                )
    dims = dict(values)
    for base, value in values.items():
        dims[f"2{base}"] = 2 * value
    return dims


def _nbytes(shape: Sequence[int], dtype: np.dtype[Any]) -> int:
    return int(np.prod(shape, dtype=np.int64)) * dtype.itemsize


# ----------------------------------------------------------------------------- engines
class _EngineRunner:
    """One deserialized plan: its I/O names and dtypes, its execution context, and enqueue."""

    def __init__(
        self, name: str, spec: GraphSpec, engine: trt.ICudaEngine, trt_module: ModuleType, book: LogBook
    ) -> None:
        self.name = name
        self.spec = spec
        self.engine = engine
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
        self.context = self.new_context()
        self._verified: set[tuple[int, tuple[tuple[str, int], ...]]] = set()

    def new_context(self) -> trt.IExecutionContext:
        mark = self.book.mark()
        context: trt.IExecutionContext | None = self.engine.create_execution_context()
        if context is None:
            raise EngineError(
                f"TensorRT cannot create an execution context for graph '{self.name}' (out of GPU memory?)"
                + log_tail_text(self.book, mark)
            )
        return context

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


# ----------------------------------------------------------------------------- device state
class _Allocations:
    """Device buffers owned by one object, freed together."""

    def __init__(self, cuda: gpu.CudaDriver) -> None:
        self.cuda = cuda
        self.pointers: list[int] = []

    def new(self, nbytes: int) -> int:
        # round up so every buffer starts ADDRESS_ALIGNMENT-aligned relative to the next one
        pointer = self.cuda.malloc(-(-max(1, nbytes) // ADDRESS_ALIGNMENT) * ADDRESS_ALIGNMENT)
        self.pointers.append(pointer)
        return pointer

    def free(self) -> None:
        while self.pointers:
            self.cuda.free(self.pointers.pop())


class _EventTimer:
    """CUDA events recorded around engine calls, read after the request's final sync."""

    def __init__(self, cuda: gpu.CudaDriver) -> None:
        self.cuda = cuda
        self.events: list[int] = []
        self.used = 0

    def mark(self, stream: int) -> int:
        if self.used == len(self.events):
            self.events.append(self.cuda.event_create())
        index = self.used
        self.cuda.event_record(self.events[index], stream)
        self.used += 1
        return index

    def seconds(self, start: int, end: int) -> float:
        return self.cuda.event_elapsed_ms(self.events[start], self.events[end]) / 1000.0

    def reset(self) -> None:
        self.used = 0

    def destroy(self) -> None:
        while self.events:
            self.cuda.event_destroy(self.events.pop())


@dataclass
class _StageGraph:
    """A stage's flow loop captured into a CUDA graph, on its own execution context."""

    context: trt.IExecutionContext
    warmed: bool = False
    graph: int = 0
    executable: int = 0
    failed: str | None = None


class _Workspace:
    """Every device buffer of a whole request at one batch size, bound by address between engines."""

    def __init__(self, backend: TensorRTBackend, batch: int) -> None:
        self.batch = batch
        config = backend.config
        self.memory = _Allocations(backend.cuda)
        self.timer = _EventTimer(backend.cuda)
        backbones = [backend.runners[f"backbone_{s}"] for s in range(1, config.num_stages + 1)]
        dims = backbones[0].spec.dims(batch)
        self.dims = dims
        self.labels = self.memory.new(batch * 8)
        self.noise, self.z, self.x, self.scratch, self.kv = [], [], [], [], []
        for runner in backbones:
            f32 = np.dtype(np.float32)
            self.noise.append(self.memory.new(_nbytes(runner.shape("noise", dims), f32)))
            self.z.append(self.memory.new(_nbytes(runner.shape("z", dims), f32)))
            self.x.append(self.memory.new(_nbytes(runner.shape("x", dims), f32)))
            self.scratch.append(self.memory.new(_nbytes(runner.shape("x", dims), f32)))
            self.kv.append(self.memory.new(_nbytes(runner.shape("present_kv", dims), f32)))
        decoder = backend.runners["decoder"]
        self.image_shape = decoder.shape("image", dims)
        self.image = self.memory.new(_nbytes(self.image_shape, np.dtype(np.float32)))
        # per-request scalars: cfg per stage, then (t, dt) per flow step, each in its own aligned slot
        self.steps = [stage_times(config, s) for s in range(1, config.num_stages + 1)]
        slots = config.num_stages + 2 * sum(len(steps) for steps in self.steps)
        self.slot_floats = ADDRESS_ALIGNMENT // 4
        self.host_scalars = np.zeros(slots * self.slot_floats, dtype=np.float32)
        self.time_slot: list[list[tuple[int, int]]] = []
        slot = config.num_stages
        for steps in self.steps:
            pairs = []
            for t, dt in steps:
                self.host_scalars[slot * self.slot_floats] = t
                self.host_scalars[(slot + 1) * self.slot_floats] = dt
                pairs.append((slot, slot + 1))
                slot += 2
            self.time_slot.append(pairs)
        self.scalars = self.memory.new(self.host_scalars.nbytes)
        self.stage_graphs: dict[int, _StageGraph] = {}

    def slot(self, index: int) -> int:
        return self.scalars + index * ADDRESS_ALIGNMENT

    def release(self, cuda: gpu.CudaDriver) -> None:
        for stage_graph in self.stage_graphs.values():
            cuda.graph_destroy(stage_graph.graph, stage_graph.executable)
        self.stage_graphs.clear()
        self.timer.destroy()
        self.memory.free()


@dataclass
class DeviceRunResult:
    """What :meth:`TensorRTBackend.generate_on_device` returns (times from CUDA events)."""

    image: np.ndarray  # float32 [B, ch, H, W] in [0, 1], the decoder's output
    latents: np.ndarray  # float32 [B, N_S, C]
    stage_seconds: list[float]
    decoder_seconds: float
    graph_seconds: dict[str, float] = field(default_factory=dict)
    graph_calls: dict[str, int] = field(default_factory=dict)
    total_seconds: float = 0.0


# ----------------------------------------------------------------------------- backend
class TensorRTBackend:
    """Runs a build's TensorRT plans. See the module docstring for threading and the device path."""

    name = "tensorrt"

    def __init__(
        self,
        manifest: Manifest,
        device_index: int = 0,
        cuda_graphs: bool = False,
        *,
        trt_module: ModuleType | None = None,
        cuda: gpu.CudaDriver | None = None,
        environment: RunningEnvironment | None = None,
    ) -> None:
        # trt_module / cuda / environment: test seams (fakes); normally discovered here.
        if manifest.backend != "tensorrt":
            raise ManifestError(
                f"'{manifest.root}' holds no TensorRT plans (built for {manifest.backend}); "
                "rebuild with `ecar-export build --backend tensorrt` on a machine with TensorRT"
            )
        self.trt = trt_module or load_tensorrt()
        self.cuda = cuda or gpu.driver()
        self.device_index = device_index
        self.cuda.use_device(device_index)
        if environment is None:
            info = self.cuda.info(device_index)
            environment = RunningEnvironment(str(self.trt.__version__), info.name, info.compute_capability)
        self.environment = environment
        self.warnings = check_plan_compatibility(manifest.raw.get("tensorrt"), environment)
        for text in self.warnings:
            LOG.warning("%s", text)
        missing = [name for name, entry in manifest.graphs.items() if not entry.plan_file]
        if missing:
            raise ManifestError(f"the manifest names no TensorRT plan for {', '.join(missing)}; {REBUILD}")
        self.manifest = manifest
        self.config = manifest.config
        self.cuda_graphs = cuda_graphs
        self._lock = threading.RLock()
        self._logger, self._book = tensorrt_logger(self.trt)
        self._runtime: trt.Runtime = self.trt.Runtime(self._logger)
        self.runners: dict[str, _EngineRunner] = {}
        self._stream = 0
        self._host_buffers: dict[tuple[str, tuple[tuple[str, int], ...]], dict[str, int]] = {}
        self._host_memory = _Allocations(self.cuda)
        self._workspaces: dict[int, _Workspace] = {}
        try:
            for name, entry in manifest.graphs.items():
                assert entry.plan_file is not None
                path = manifest.path(entry.plan_file)
                try:
                    data = path.read_bytes()  # the manifest loader verified its sha256
                except OSError as exc:
                    raise ManifestError(f"cannot read TensorRT plan '{path}': {exc}; {REBUILD}") from None
                mark = self._book.mark()
                engine: trt.ICudaEngine | None = self._runtime.deserialize_cuda_engine(data)
                if engine is None:
                    raise EngineError(
                        f"TensorRT {self.environment.tensorrt_version} cannot deserialize the plan of graph '{name}' "
                        f"('{path}'); {REBUILD}" + log_tail_text(self._book, mark)
                    )
                self.runners[name] = _EngineRunner(name, entry.spec, engine, self.trt, self._book)
            self._stream = self.cuda.stream_create()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ Backend protocol
    def run(self, graph: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        runner = self.runners.get(graph)
        if runner is None:
            raise EngineError(f"this build has no graph '{graph}'")
        dims = resolve_dims(runner.spec, {name: np.shape(value) for name, value in feeds.items()})
        key = (graph, tuple(sorted(dims.items())))
        with self._lock:
            self._check_open()
            self.cuda.use_device(self.device_index)
            buffers = self._host_buffers.get(key)
            if buffers is None:
                buffers = {
                    name: self._host_memory.new(_nbytes(runner.shape(name, dims), runner.dtypes[name]))
                    for name in (*runner.inputs, *runner.outputs)
                }
                self._host_buffers[key] = buffers
            held = []
            for name in runner.inputs:
                array = np.ascontiguousarray(feeds[name], dtype=runner.dtypes[name])
                held.append(array)
                self.cuda.copy_to_device(buffers[name], array, self._stream)
            runner.enqueue(runner.context, dims, buffers, self._stream)
            outputs = [np.empty(runner.shape(name, dims), dtype=runner.dtypes[name]) for name in runner.outputs]
            for name, array in zip(runner.outputs, outputs):
                self.cuda.copy_to_host(array, buffers[name], self._stream)
            self.cuda.stream_synchronize(self._stream)
            del held
        return outputs

    def describe(self) -> dict[str, object]:
        return {
            "backend": self.name,
            "tensorrt": self.environment.tensorrt_version,
            "gpu": self.environment.gpu_name,
            "compute_capability": self.environment.compute_capability,
            "device_index": self.device_index,
            "plans": {name: entry.plan_file for name, entry in self.manifest.graphs.items()},
            "device_resident": True,
            "cuda_graphs": self.cuda_graphs,
            "threading": "one lock: concurrent calls are safe and run one at a time on the GPU",
            "warnings": list(self.warnings),
        }

    # ------------------------------------------------------------------ device-resident request
    def generate_on_device(
        self,
        labels: np.ndarray | Sequence[int],
        noise: Sequence[np.ndarray],
        cfg_weights: Sequence[float],
        on_stage: Callable[[int, int], None] | None = None,
    ) -> DeviceRunResult:
        """One whole request with every intermediate on the device.

        ``labels`` int [B]; ``noise`` one float32 [B, N_s, C] array per stage (as
        :func:`runtime.schedule.draw_noise` makes them); ``cfg_weights`` one guidance weight per
        stage (:func:`runtime.schedule.cfg_weights`). Copies in: labels, noise and the scalars;
        copies out: the image and the final latents. ``on_stage`` (stages done, stages in all)
        is called after each stage has finished on the GPU (that costs one stream sync per stage).
        """
        config = self.config
        label_array = np.ascontiguousarray(labels, dtype=np.int64)
        batch = int(label_array.shape[0]) if label_array.ndim == 1 else 0
        if not 1 <= batch <= self.manifest.max_batch:
            raise InvalidRequestError(
                f"batch of {batch} samples is outside this build's profile (1..{self.manifest.max_batch})"
            )
        if len(noise) != config.num_stages or len(cfg_weights) != config.num_stages:
            raise InvalidRequestError(f"need noise and a cfg weight for each of the {config.num_stages} stages")
        noise_arrays = []
        for index, (array, tokens) in enumerate(zip(noise, config.tokens_per_stage)):
            expected = (batch, tokens, config.latent_channels)
            if tuple(np.shape(array)) != expected:
                raise InvalidRequestError(
                    f"noise of stage {index + 1} must have shape {expected}, got {np.shape(array)}"
                )
            noise_arrays.append(np.ascontiguousarray(array, dtype=np.float32))
        begin = time.perf_counter()
        with self._lock:
            self._check_open()
            self.cuda.use_device(self.device_index)
            workspace = self._workspace(batch)
            return self._generate(workspace, label_array, noise_arrays, list(cfg_weights), on_stage, begin)

    def _workspace(self, batch: int) -> _Workspace:
        workspace = self._workspaces.get(batch)
        if workspace is None:
            workspace = _Workspace(self, batch)
            self._workspaces[batch] = workspace
        return workspace

    def _generate(
        self,
        ws: _Workspace,
        labels: np.ndarray,
        noise: list[np.ndarray],
        cfg_weights: list[float],
        on_stage: Callable[[int, int], None] | None,
        begin: float,
    ) -> DeviceRunResult:
        config, cuda, stream, timer = self.config, self.cuda, self._stream, ws.timer
        dims = ws.dims
        timer.reset()
        calls: list[tuple[str, int, int, int]] = []  # graph, start event, end event, engine calls
        stage_marks: list[tuple[int, int]] = []
        scalars = ws.host_scalars.copy()
        for index, weight in enumerate(cfg_weights):
            scalars[index * ws.slot_floats] = np.float32(weight)
        cuda.copy_to_device(ws.labels, labels, stream)
        for pointer, array in zip(ws.noise, noise):
            cuda.copy_to_device(pointer, array, stream)
        cuda.copy_to_device(ws.scalars, scalars, stream)

        def call(
            runner: _EngineRunner, context: trt.IExecutionContext, call_dims: Mapping[str, int], bind: dict[str, int]
        ) -> None:
            start = timer.mark(stream)
            runner.enqueue(context, call_dims, bind, stream)
            calls.append((runner.name, start, timer.mark(stream), 1))

        final = 0
        for index in range(config.num_stages):
            stage = index + 1
            stage_start = timer.mark(stream)
            bind = {"labels": ws.labels, "noise": ws.noise[index], "z": ws.z[index], "x": ws.x[index]}
            bind["present_kv"] = ws.kv[index]
            if index:
                bind["prev"], bind["past_kv"] = final, ws.kv[index - 1]
            backbone = self.runners[f"backbone_{stage}"]
            call(backbone, backbone.context, dims, bind)
            flow_dims = {"M": ws.batch * config.tokens_per_stage[index]}
            flow_dims["2M"] = 2 * flow_dims["M"]
            cfg_slot = ws.slot(index)
            if self.manifest.fuse_flow_loop:
                loop = self.runners[f"flow_loop_{stage}"]
                bind = {"x": ws.x[index], "z": ws.z[index], "cfg": cfg_slot, "x_end": ws.scratch[index]}
                call(loop, loop.context, flow_dims, bind)
                final = ws.scratch[index]
            else:
                final = self._flow_loop(ws, index, flow_dims, cfg_slot, calls)
            stage_marks.append((stage_start, timer.mark(stream)))
            if on_stage:
                cuda.stream_synchronize(stream)
                on_stage(stage, config.num_stages)
        decoder = self.runners["decoder"]
        decode_start = timer.mark(stream)
        call(decoder, decoder.context, dims, {"x": final, "image": ws.image})
        decode_end = timer.mark(stream)
        image = np.empty(ws.image_shape, dtype=np.float32)
        latents = np.empty((ws.batch, config.tokens_per_stage[-1], config.latent_channels), dtype=np.float32)
        cuda.copy_to_host(image, ws.image, stream)
        cuda.copy_to_host(latents, final, stream)
        cuda.stream_synchronize(stream)
        graph_seconds: dict[str, float] = {}
        graph_calls: dict[str, int] = {}
        for name, start, end, count in calls:
            graph_seconds[name] = graph_seconds.get(name, 0.0) + timer.seconds(start, end)
            graph_calls[name] = graph_calls.get(name, 0) + count
        return DeviceRunResult(
            image=image,
            latents=latents,
            stage_seconds=[timer.seconds(a, b) for a, b in stage_marks],
            decoder_seconds=timer.seconds(decode_start, decode_end),
            graph_seconds=graph_seconds,
            graph_calls=graph_calls,
            total_seconds=time.perf_counter() - begin,
        )

    def _flow_loop(
        self,
        ws: _Workspace,
        index: int,
        dims: Mapping[str, int],
        cfg_slot: int,
        calls: list[tuple[str, int, int, int]],
    ) -> int:
        """Enqueue stage ``index``'s Euler loop (x ping-pongs between two buffers); returns the final buffer."""
        runner = self.runners["flow_step"]
        timer, stream = ws.timer, self._stream
        steps = ws.time_slot[index]
        buffers = (ws.x[index], ws.scratch[index])
        final = buffers[len(steps) % 2]

        def enqueue_all(context: trt.IExecutionContext, timed: bool) -> None:
            for step, (t_slot, dt_slot) in enumerate(steps):
                bind = {
                    "x": buffers[step % 2],
                    "x_next": buffers[(step + 1) % 2],
                    "z": ws.z[index],
                    "t": ws.slot(t_slot),
                    "dt": ws.slot(dt_slot),
                    "cfg": cfg_slot,
                }
                start = timer.mark(stream) if timed else -1
                runner.enqueue(context, dims, bind, stream)
                if timed:
                    calls.append((runner.name, start, timer.mark(stream), 1))

        if not self.cuda_graphs or not steps:
            enqueue_all(runner.context, timed=True)
            return final
        stage_graph = ws.stage_graphs.get(index)
        if stage_graph is None:
            stage_graph = _StageGraph(context=runner.new_context())
            ws.stage_graphs[index] = stage_graph
        if stage_graph.executable:
            start = timer.mark(stream)
            self.cuda.graph_launch(stage_graph.executable, stream)
            calls.append((runner.name, start, timer.mark(stream), len(steps)))
            return final
        # eager on the stage's own context; after the first (warm-up) run, capture the loop
        enqueue_all(stage_graph.context, timed=True)
        if stage_graph.failed is None:
            if stage_graph.warmed:
                self._capture(stage_graph, lambda: enqueue_all(stage_graph.context, timed=False), index)
            else:
                stage_graph.warmed = True
        return final

    def _capture(self, stage_graph: _StageGraph, enqueue: Callable[[], None], index: int) -> None:
        """Record the stage's flow loop into a CUDA graph (UNTESTED with real TensorRT)."""
        cuda, stream = self.cuda, self._stream
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
            message = f"CUDA graph capture of stage {index + 1}'s flow loop failed; running it eagerly ({exc})"
            self.warnings.append(message)
            LOG.warning("%s", message)

    # ------------------------------------------------------------------ lifetime
    def _check_open(self) -> None:
        if not self._stream:
            raise EngineError("this TensorRT backend is closed")

    def release_buffers(self) -> None:
        """Free the cached per-batch-size device buffers (they are re-made on the next call)."""
        with self._lock:
            self.cuda.use_device(self.device_index)
            for workspace in self._workspaces.values():
                workspace.release(self.cuda)
            self._workspaces.clear()
            self._host_buffers.clear()
            self._host_memory.free()

    def close(self) -> None:
        """Free every device resource; the backend cannot run afterwards."""
        with self._lock:
            if self._stream:
                self.cuda.stream_synchronize(self._stream)
            self.release_buffers()
            self.runners.clear()
            if self._stream:
                self.cuda.stream_destroy(self._stream)
                self._stream = 0

    def __enter__(self) -> TensorRTBackend:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
