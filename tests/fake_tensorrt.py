"""Stand-ins for TensorRT and the CUDA driver, for tests on machines without either.

* :class:`FakeCuda` — the :class:`runtime.backends.tensorrt.gpu.CudaDriver` interface; "device memory" and pinned
  host memory are host memory, streams run work at once (or record it while capturing).
* :func:`make_fake_trt` — a ``tensorrt`` module: its builder parses ONNX files and writes "plans"
  (JSON naming the ONNX file and the optimisation profiles it was given); its runtime
  deserializes those plans into engines that run the ONNX graph with ONNX Runtime, reading and
  writing :class:`FakeCuda` memory at the addresses the backend bound. Outputs therefore equal
  ONNX Runtime's exactly, so any mis-binding shows.
* :func:`install` — put both in place (``sys.modules["tensorrt"]``, ``runtime.backends.tensorrt.gpu.driver``), so
  the real entry points (``build_engines``, ``ecar-export build --backend tensorrt``,
  ``Pipeline.from_dir``) run on them, also in a subprocess (``python tests/fake_tensorrt.py
  ecar-export build ...``).
"""

from __future__ import annotations

import ctypes
import importlib.machinery
import json
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import numpy as np

from runtime.backends.tensorrt import gpu

FAKE_VERSION = "10.13.3.9"
FAKE_GPU = gpu.GpuInfo(0, "NVIDIA Fake H100", "9.0", 80 << 30, 12080)
NULLPTR = "pybind11::init(): factory function returned nullptr"


class FakeCuda:
    """CUDA driver double: device and pinned memory are host memory, streams run work at once (or record it)."""

    def __init__(self) -> None:
        self.buffers: dict[int, np.ndarray] = {}
        self.pinned: dict[int, np.ndarray] = {}
        self.capturing: list[Callable[[], None]] | None = None
        self.graphs: dict[int, list[Callable[[], None]]] = {}
        self.launches = 0
        self.captures = 0
        self.events: dict[int, float] = {}
        self.streams = 0
        self.current: dict[int, int] = {}
        self.pageable_copies = 0

    def use_device(self, index: int) -> None:
        self.current[threading.get_ident()] = index

    def info(self, index: int = 0) -> gpu.GpuInfo:
        return FAKE_GPU

    def device_count(self) -> int:
        return 1

    @staticmethod
    def _aligned(nbytes: int) -> tuple[np.ndarray, int]:
        array = np.full(nbytes + 256, 0xCD, dtype=np.uint8)  # garbage, as fresh device memory would be
        return array, -(-array.ctypes.data // 256) * 256  # cuMemAlloc returns (at least) 256-byte aligned memory

    def malloc(self, nbytes: int) -> int:
        array, pointer = self._aligned(nbytes)
        self.buffers[pointer] = array
        return int(pointer)

    def free(self, pointer: int) -> None:
        del self.buffers[pointer]

    def host_alloc(self, nbytes: int) -> int:
        array, pointer = self._aligned(nbytes)
        self.pinned[pointer] = array
        return int(pointer)

    def host_free(self, pointer: int) -> None:
        del self.pinned[pointer]

    def _is_pinned(self, array: np.ndarray) -> bool:
        address = array.ctypes.data
        return any(p <= address < p + len(buf) - 256 for p, buf in self.pinned.items())

    def _do(self, work: Callable[[], None]) -> None:
        if self.capturing is not None:
            self.capturing.append(work)
        else:
            work()

    def copy_to_device(self, pointer: int, array: np.ndarray, stream: int) -> None:
        if not self._is_pinned(array):
            self.pageable_copies += 1
        data = array.copy()  # the copy is staged when issued, like a pageable cuMemcpyHtoDAsync
        self._do(lambda: ctypes.memmove(pointer, data.ctypes.data, data.nbytes))

    def copy_to_host(self, array: np.ndarray, pointer: int, stream: int) -> None:
        if not self._is_pinned(array):
            self.pageable_copies += 1
        self._do(lambda: ctypes.memmove(array.ctypes.data, pointer, array.nbytes))

    def copy_device(self, destination: int, source: int, nbytes: int, stream: int) -> None:
        self._do(lambda: ctypes.memmove(destination, source, nbytes))

    def memset(self, pointer: int, value: int, nbytes: int, stream: int) -> None:
        self._do(lambda: ctypes.memset(pointer, value, nbytes))

    def stream_create(self) -> int:
        self.streams += 1
        return 1000 + self.streams

    def stream_synchronize(self, stream: int) -> None:
        assert self.capturing is None, "synchronize during capture"

    def stream_destroy(self, stream: int) -> None:
        self.streams -= 1

    def event_create(self) -> int:
        event = len(self.events) + 1
        self.events[event] = 0.0
        return event

    def event_record(self, event: int, stream: int) -> None:
        assert self.capturing is None, "events are not recorded inside captures here"
        self.events[event] = time.perf_counter()

    def event_elapsed_ms(self, start: int, end: int) -> float:
        return 1000.0 * (self.events[end] - self.events[start])

    def event_destroy(self, event: int) -> None:
        self.events.pop(event)

    def begin_capture(self, stream: int) -> None:
        self.capturing = []

    def end_capture(self, stream: int) -> int:
        assert self.capturing is not None
        graph = len(self.graphs) + 1
        self.graphs[graph], self.capturing = self.capturing, None
        self.captures += 1
        return graph

    def graph_instantiate(self, graph: int) -> int:
        return graph

    def graph_launch(self, executable: int, stream: int) -> None:
        self.launches += 1
        for work in self.graphs[executable]:
            work()

    def graph_destroy(self, graph: int = 0, executable: int = 0) -> None:
        self.graphs.pop(graph, None)


class HostIO:
    """How fake engines reach FakeCuda's "device" memory (host memory) and its capture queue."""

    def __init__(self, cuda: FakeCuda) -> None:
        self.cuda = cuda

    def read(self, pointer: int, shape: tuple[int, ...], dtype: np.dtype[Any], stream: int) -> np.ndarray:
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        raw = (ctypes.c_char * nbytes).from_address(pointer)
        return np.frombuffer(raw, dtype=dtype).reshape(shape).copy()

    def write(self, pointer: int, array: np.ndarray, stream: int) -> None:
        ctypes.memmove(pointer, array.ctypes.data, array.nbytes)

    def submit(self, work: Callable[[], None]) -> None:
        self.cuda._do(work)


class DeviceIO:
    """Fake engines on a real GPU: inputs copied to the host, ONNX Runtime, outputs copied back (no capture)."""

    def __init__(self, cuda: gpu.CudaDriver) -> None:
        self.cuda = cuda
        self.held: list[np.ndarray] = []

    def read(self, pointer: int, shape: tuple[int, ...], dtype: np.dtype[Any], stream: int) -> np.ndarray:
        array = np.empty(shape, dtype)
        self.cuda.copy_to_host(array, pointer, stream)
        self.cuda.stream_synchronize(stream)
        return array

    def write(self, pointer: int, array: np.ndarray, stream: int) -> None:
        self.held = [*self.held[-64:], array]
        self.cuda.copy_to_device(pointer, array, stream)

    def submit(self, work: Callable[[], None]) -> None:
        work()


class FakeContext:
    def __init__(self, engine: FakeEngine, strategy: Any) -> None:
        self.engine = engine
        self.strategy = strategy
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}
        self.memory: tuple[int, int] | None = None
        self.profile = 0
        self.shape_calls = 0

    def set_device_memory(self, memory: int, size: int) -> None:
        assert memory % 256 == 0 and size >= self.engine.device_memory_size_v2
        self.memory = (memory, size)

    def set_optimization_profile_async(self, index: int, stream: int) -> bool:
        if not 0 <= index < self.engine.num_optimization_profiles or self.shape_calls:
            return False  # TensorRT: an index out of range, or a context already in use on another profile
        self.profile = index
        return True

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        """As TensorRT: refused outside the active profile's [min, max] (empty tensors allowed where it does)."""
        self.shape_calls += 1
        self.shapes[name] = tuple(shape)
        profiles = self.engine.profiles
        if not profiles or name not in profiles[self.profile]:
            return all(d >= 0 for d in shape)
        low, _, high = profiles[self.profile][name]
        return len(shape) == len(low) and all(lo <= d <= hi for lo, d, hi in zip(low, shape, high))

    def set_tensor_address(self, name: str, pointer: int) -> bool:
        self.addresses[name] = pointer
        return pointer % 256 == 0  # TensorRT wants aligned addresses

    def _feeds(self, zero: bool, stream: int = 0) -> dict[str, np.ndarray]:
        feeds = {}
        for name in self.engine.inputs:
            dtype, shape, io = self.engine.dtypes[name], self.shapes[name], self.engine.io
            feeds[name] = np.zeros(shape, dtype) if zero else io.read(self.addresses[name], shape, dtype, stream)
        return feeds

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        index = self.engine.outputs.index(name)
        return tuple(self.engine.session.run(None, self._feeds(zero=True))[index].shape)

    def execute_async_v3(self, stream: int) -> bool:
        if self.strategy == "USER_MANAGED" and self.memory is None:
            raise AssertionError("execute_async_v3 on a user-managed context without device memory")
        snapshot = (dict(self.shapes), dict(self.addresses))

        def work() -> None:
            saved = (self.shapes, self.addresses)
            self.shapes, self.addresses = snapshot
            outputs = self.engine.session.run(self.engine.outputs, self._feeds(zero=False, stream=stream))
            for name, value in zip(self.engine.outputs, outputs):
                value = np.ascontiguousarray(value, dtype=self.engine.dtypes[name])
                self.engine.io.write(self.addresses[name], value, stream)
            self.shapes, self.addresses = saved

        self.engine.executions += 1
        self.engine.io.submit(work)
        return True


class FakeEngine:
    def __init__(self, plan: dict[str, Any], io: HostIO | DeviceIO) -> None:
        import onnxruntime

        self.path = plan["onnx"]
        self.plan = plan
        self.session = onnxruntime.InferenceSession(self.path, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]
        types = {"tensor(float)": np.dtype(np.float32), "tensor(int64)": np.dtype(np.int64)}
        self.dtypes = {i.name: types[i.type] for i in (*self.session.get_inputs(), *self.session.get_outputs())}
        self.io = io
        self.executions = 0
        self.contexts: list[FakeContext] = []
        # per optimisation profile: input -> (min, opt, max), as the builder was given them
        self.profiles = [
            {name: tuple(tuple(d) for d in shapes) for name, shapes in profile.items()}
            for profile in plan.get("profiles", [])
        ]
        self.num_optimization_profiles = max(1, len(self.profiles))
        # activation memory "needed": differs per graph and profile, so the shared buffer must take the largest
        base = 4096 * (1 + len(self.inputs) + len(self.outputs) + len(self.path) % 7)
        self.memory_per_profile = [base + 512 * index for index in range(self.num_optimization_profiles)]
        self.device_memory_size_v2 = max(self.memory_per_profile)

    def get_device_memory_size_for_profile_v2(self, index: int) -> int:
        return self.memory_per_profile[index]

    @property
    def num_io_tensors(self) -> int:
        return len(self.inputs) + len(self.outputs)

    def get_tensor_name(self, index: int) -> str:
        return [*self.inputs, *self.outputs][index]

    def get_tensor_mode(self, name: str) -> str:
        return "INPUT" if name in self.inputs else "OUTPUT"

    def get_tensor_dtype(self, name: str) -> np.dtype[Any]:
        return self.dtypes[name]

    def get_tensor_location(self, name: str) -> str:
        return "DEVICE"

    def create_execution_context(self, strategy: Any = "STATIC") -> FakeContext:
        context = FakeContext(self, strategy)
        self.contexts.append(context)
        return context


class FakeBuilderState:
    """What the fake builder saw, and switches that make it fail the way TensorRT does."""

    def __init__(self) -> None:
        self.profiles: list[dict[str, tuple[Any, Any, Any]]] = []
        self.flags: set[str] = {"TF32"}
        self.network_flags = 0
        self.hardware: Any = None
        self.workspace: int | None = None
        self.cache_in: bytes | None = None
        self.cache_refused: list[bytes] = []
        self.fail_parse = False
        self.fail_build = False
        self.plans_built = 0


def make_fake_trt(
    cuda: FakeCuda | None = None,
    state: FakeBuilderState | None = None,
    io: DeviceIO | None = None,
    cuda_fails: bool = False,
) -> ModuleType:
    """A ``tensorrt`` module double (builder and runtime). ``cuda_fails``: ``Runtime``/``Builder`` raise
    what TensorRT's bindings raise when CUDA cannot start."""
    import onnx

    trt = ModuleType("tensorrt")
    trt.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)  # torch.export looks it up
    trt.__version__ = FAKE_VERSION
    state = state or FakeBuilderState()
    engines: list[FakeEngine] = []

    class ILogger:
        def __init__(self) -> None:
            pass

    class Runtime:
        def __init__(self, logger: ILogger) -> None:
            if cuda_fails:
                raise TypeError(NULLPTR)
            self.logger = logger

        def deserialize_cuda_engine(self, data: bytes) -> FakeEngine | None:
            try:
                plan = json.loads(data)
            except ValueError:
                self.logger.log(SimpleNamespace(name="ERROR"), "Serialization assertion failed: magic tag mismatch")
                return None
            engine = FakeEngine(plan, io or HostIO(cuda or FakeCuda()))
            engines.append(engine)
            return engine

    class Network:
        def __init__(self) -> None:
            self.inputs: list[SimpleNamespace] = []
            self.path = ""

        @property
        def num_inputs(self) -> int:
            return len(self.inputs)

        def get_input(self, index: int) -> SimpleNamespace:
            return self.inputs[index]

    class Parser:
        def __init__(self, network: Network, logger: Any) -> None:
            self.network, self.logger = network, logger
            self.num_errors = 0

        def parse_from_file(self, path: str) -> bool:
            if state.fail_parse:
                self.num_errors = 2
                self.logger.log(SimpleNamespace(name="ERROR"), "ModelImporter.cpp:1234: failed to import node")
                return False
            model = onnx.load(path, load_external_data=False)
            self.network.path = str(Path(path).resolve())
            for value in model.graph.input:
                dims = [d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim]
                self.network.inputs.append(SimpleNamespace(name=value.name, shape=dims))
            return True

        def get_error(self, index: int) -> Any:
            return SimpleNamespace(
                node_name=lambda: f"/blocks.{index}/attn/Softmax",
                node_operator=lambda: "Softmax",
                desc=lambda: "unsupported data type",
                code=lambda: "UNSUPPORTED_NODE",
                node=lambda: index,
            )

    class Cache:
        def __init__(self, data: bytes) -> None:
            self.data = data

        def serialize(self) -> bytes:
            return b"timing-cache:" + self.data.replace(b"other-gpu:", b"")

    class Config:
        hardware_compatibility_level = None

        def __init__(self) -> None:
            self.profiles: list[dict[str, Any]] = []

        def set_memory_pool_limit(self, pool: str, size: int) -> None:
            state.workspace = size

        def clear_flag(self, flag: str) -> None:
            state.flags.discard(flag)

        def set_flag(self, flag: str) -> None:
            state.flags.add(flag)

        def add_optimization_profile(self, profile: dict[str, Any]) -> int:
            state.profiles.append(profile)
            self.profiles.append(profile)
            return len(self.profiles) - 1

        def create_timing_cache(self, data: bytes) -> Cache:
            state.cache_in = bytes(data)
            return Cache(bytes(data))

        def set_timing_cache(self, cache: Cache, ignore_mismatch: bool) -> bool:
            if cache.data.startswith(b"other-gpu:") and not ignore_mismatch:
                state.cache_refused.append(cache.data)
                return False  # what TensorRT answers for a cache made on another device
            self.cache = cache
            return True

        def get_timing_cache(self) -> Cache:
            return self.cache

    class Profile(dict[str, Any]):
        def set_shape(self, name: str, low: Any, opt: Any, high: Any) -> None:
            self[name] = (tuple(low), tuple(opt), tuple(high))

    class Builder:
        def __init__(self, logger: Any) -> None:
            if cuda_fails:
                raise TypeError(NULLPTR)
            self.logger = logger

        def create_network(self, flags: int) -> Network:
            state.network_flags = flags
            return Network()

        def create_builder_config(self) -> Config:
            return Config()

        def create_optimization_profile(self) -> Profile:
            return Profile()

        def build_serialized_network(self, network: Network, config: Config) -> bytes | None:
            state.hardware = config.hardware_compatibility_level
            if state.fail_build:
                self.logger.log(SimpleNamespace(name="ERROR"), "Error Code 10: Could not find any implementation")
                return None
            state.plans_built += 1
            plan = {
                "onnx": network.path,
                "inputs": [i.name for i in network.inputs],
                "profiles": [{k: [list(d) for d in v] for k, v in p.items()} for p in config.profiles],
            }
            return json.dumps(plan, sort_keys=True).encode()

    trt.ILogger = ILogger
    trt.Runtime = Runtime
    trt.Builder = Builder
    trt.OnnxParser = Parser
    trt.Dims = tuple
    trt.NetworkDefinitionCreationFlag = SimpleNamespace(STRONGLY_TYPED=1)
    trt.BuilderFlag = SimpleNamespace(FP16="FP16", INT8="INT8", TF32="TF32")
    trt.MemoryPoolType = SimpleNamespace(WORKSPACE="WORKSPACE")
    trt.HardwareCompatibilityLevel = SimpleNamespace(
        NONE="NONE", AMPERE_PLUS="AMPERE_PLUS", SAME_COMPUTE_CAPABILITY="SAME_COMPUTE_CAPABILITY"
    )
    trt.ExecutionContextAllocationStrategy = SimpleNamespace(STATIC="STATIC", USER_MANAGED="USER_MANAGED")
    trt.TensorIOMode = SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT")
    trt.TensorLocation = SimpleNamespace(DEVICE="DEVICE", HOST="HOST")
    trt.nptype = lambda dtype: dtype
    trt.engines = engines
    trt.state = state
    return trt


def install(cuda_fails: bool = False, patch: Any = None) -> tuple[ModuleType, FakeCuda]:
    """Make ``import tensorrt`` and ``runtime.backends.tensorrt.gpu.driver()`` return the fakes.

    ``patch`` is a ``pytest.MonkeyPatch`` (undone after the test); without one the change is
    permanent (a subprocess). Call it after anything that exports ONNX with torch: the exporter
    probes the ``tensorrt`` module it finds.
    """
    from runtime.backends.tensorrt import loader

    cuda = FakeCuda()
    trt = make_fake_trt(cuda, cuda_fails=cuda_fails)
    if patch is not None:
        patch.setitem(sys.modules, "tensorrt", trt)
        patch.setattr(gpu, "driver", lambda: cuda)
        patch.setattr(loader, "_LOGGER", None)
    else:
        sys.modules["tensorrt"] = trt
        gpu.driver = lambda: cuda  # type: ignore[assignment]
        loader._LOGGER = None
    return trt, cuda


if __name__ == "__main__":  # python tests/fake_tensorrt.py ecar-export|ecar-run ARGS...
    tool, sys.argv = sys.argv[1], [sys.argv[1], *sys.argv[2:]]
    if tool == "ecar-export":
        import ecar_export.export  # noqa: F401  (torch's exporter first: it probes `tensorrt`)
        from ecar_export.cli import main
    else:
        from runtime.cli import main
    install()
    main()
