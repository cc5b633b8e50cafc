"""The TensorRT layer: builder, backend, device-resident path (DESIGN §4-§5).

Three kinds of tests:

* Here, without TensorRT or a GPU: imports stay lazy (no torch, no tensorrt), missing TensorRT is
  a clear BackendUnavailableError, timing-cache names, and the manifest-vs-machine compatibility
  rules as a pure function.
* Here, with fakes: a fake ``tensorrt`` module whose "plans" run the build's ONNX graphs through
  ONNX Runtime, and a fake CUDA driver whose "device memory" is host memory. They exercise the
  backend's own logic — contract checks, buffer management, binding every intermediate by
  address between engines, the flow loop's ping-pong buffers, the per-request scalars, CUDA
  graph capture bookkeeping, locking — and the builder's control flow (profiles, timing cache,
  atomic plan files, parser errors with node names). Outputs must equal ONNX Runtime's
  exactly (same sessions, same inputs), so any mis-binding shows.
* ``@pytest.mark.gpu``: real TensorRT plans of the demo model against the ONNX Runtime fp32
  pipeline (skipped with "TensorRT not installed" / "no NVIDIA GPU"). Tolerances: those of
  ``scripts/gpu_smoke.py`` (fp32: latents max |diff| <= 2e-3, mean |pixel diff| <= 0.25 levels;
  fp16: 5e-2 / 2.0; int8: 0.25 / 6.0). Builds of other precisions are compared when
  ECAR_TRT_EXTRA_BUILDS names their directories (comma-separated), against ONNX Runtime running
  the same graphs.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import numpy as np
import onnx
import pytest
from conftest import BuildCache, needs_demo

from ecar_export import tensorrt_build
from ecar_export.tensorrt_build import PlanRecord, apply_plans, build_plan, timing_cache_file
from runtime import gpu, schedule
from runtime import manifest as manifest_io
from runtime.backends import tensorrt_backend
from runtime.backends.tensorrt_backend import (
    RunningEnvironment,
    TensorRTBackend,
    check_plan_compatibility,
    resolve_dims,
)
from runtime.errors import BackendUnavailableError, EngineError, InvalidRequestError, ManifestError
from runtime.graphs import graph_specs, profile_shapes
from runtime.images import to_uint8
from runtime.pipeline import Pipeline

ROOT = Path(__file__).resolve().parents[1]
FAKE_VERSION = "10.13.3.9"
FAKE_GPU = gpu.GpuInfo(0, "NVIDIA Fake H100", "9.0", 80 << 30, 12080)
ENV = RunningEnvironment(FAKE_VERSION, FAKE_GPU.name, FAKE_GPU.compute_capability)
TINY = "tiny-1-2-4"
TWO_STAGE = "two-stage-2-6"


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


# ============================================================================ without TensorRT
def test_modules_import_without_torch_or_tensorrt() -> None:
    result = run_python(
        """
        import importlib.abc, sys

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "tensorrt", "tensorrt_bindings", "cuda", "pycuda"):
                    raise ImportError(f"{name} is blocked in this test")
                return None

        sys.meta_path.insert(0, Block())
        import runtime.gpu, runtime.backends.tensorrt_backend as backend
        assert backend.tensorrt_version() is None
        try:
            backend.load_tensorrt()
        except Exception as exc:
            print("ERROR", type(exc).__name__, exc)
        bad = sorted(n for n in sys.modules if n.split(".")[0] in ("torch", "tensorrt"))
        print("LOADED", bad)
        """
    )
    assert result.returncode == 0, result.stderr
    assert "LOADED []" in result.stdout, result.stdout
    assert "ERROR BackendUnavailableError TensorRT is not importable" in result.stdout, result.stdout
    assert "pip install '.[tensorrt]'" in result.stdout


def test_build_module_imports_without_tensorrt_and_reports_no_version() -> None:
    result = run_python(
        """
        import sys
        import ecar_export.tensorrt_build as tb
        print("VERSION", tb.tensorrt_version())
        print("LOADED", "tensorrt_bindings" in sys.modules or getattr(sys.modules.get("tensorrt"), "Builder", None))
        """
    )
    assert result.returncode == 0, result.stderr
    assert "VERSION None" in result.stdout and "LOADED None" in result.stdout, result.stdout


def test_tensorrt_version_is_none_here() -> None:
    # where the stubs are installed, `import tensorrt` finds an empty namespace package: still "not installed"
    if tensorrt_backend.tensorrt_version() is not None:
        pytest.skip("TensorRT is installed here")
    assert tensorrt_build.tensorrt_version() is None
    with pytest.raises(BackendUnavailableError, match=r"TensorRT is not (importable|installed)"):
        tensorrt_backend.load_tensorrt()


@pytest.fixture
def no_tensorrt(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError


def test_build_plan_without_tensorrt_says_how_to_get_it(no_tensorrt: None, tmp_path: Path, tiny_config: Any) -> None:
    spec = graph_specs(tiny_config())[0]
    with pytest.raises(BackendUnavailableError, match=r"TensorRT is not importable.*'tensorrt' extra"):
        build_plan(tmp_path / "x.onnx", tmp_path / "x.plan", spec, (1, 2, 4))
    assert not (tmp_path / "x.plan").exists()


def test_backend_without_tensorrt_says_how_to_get_it(
    no_tensorrt: None, build_cache: BuildCache, tmp_path: Path
) -> None:
    with pytest.raises(ManifestError, match="holds no TensorRT plans.*--backend tensorrt"):
        TensorRTBackend(manifest_io.load(build_cache.get(TINY).dir))
    manifest = fake_tensorrt_build(build_cache.get(TINY).dir, tmp_path / "trt")
    with pytest.raises(BackendUnavailableError, match=r"TensorRT is not importable.*onnxruntime backend"):
        TensorRTBackend(manifest)


def test_timing_cache_file_is_named_per_gpu_and_version(tmp_path: Path) -> None:
    path = timing_cache_file(tmp_path, "NVIDIA H200 NVL", "9.0", "10.13.3.9")
    assert path == tmp_path / "trt-10.13.3.9-sm90-nvidia-h200-nvl.timing-cache"
    assert timing_cache_file(tmp_path, "NVIDIA H200 NVL", "9.0", "10.13.3.9") == path
    assert (
        timing_cache_file(tmp_path, "NVIDIA A10", "8.6", "10.13.3.9").name
        == "trt-10.13.3.9-sm86-nvidia-a10.timing-cache"
    )
    assert timing_cache_file(tmp_path, "NVIDIA H200 NVL", "9.0", "11.0.0.1") != path
    assert (
        timing_cache_file(tmp_path, "RTX/6000 (Ada)", "8.9", "10.1").name == "trt-10.1-sm89-rtx-6000-ada.timing-cache"
    )
    with pytest.raises(ValueError):
        timing_cache_file(tmp_path, "x", "nine", "10.1")


def test_default_timing_cache_dir_follows_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("ECAR_TENSORRT_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert tensorrt_build.default_timing_cache_dir() == tmp_path / "ecar-export" / "tensorrt"
    monkeypatch.setenv("ECAR_TENSORRT_CACHE", str(tmp_path / "mine"))
    assert tensorrt_build.default_timing_cache_dir() == tmp_path / "mine"


# ----------------------------------------------------------------------------- compatibility
def block(**overrides: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "version": FAKE_VERSION,
        "gpu_name": FAKE_GPU.name,
        "compute_capability": "9.0",
        "hardware_compatibility": "none",
        "strongly_typed": True,
    }
    return {**values, **overrides}


def env(version: str = FAKE_VERSION, name: str = FAKE_GPU.name, cc: str = "9.0") -> RunningEnvironment:
    return RunningEnvironment(version, name, cc)


def test_same_version_and_gpu_is_compatible() -> None:
    assert check_plan_compatibility(block(), env()) == []


def test_other_tensorrt_version_names_both_and_says_rebuild() -> None:
    with pytest.raises(ManifestError) as error:
        check_plan_compatibility(block(version="10.13.3.9"), env(version="10.14.1.48"))
    text = str(error.value)
    assert "10.13.3.9" in text and "10.14.1.48" in text
    assert "rebuild with `ecar-export build --backend tensorrt` on this machine" in text
    with pytest.raises(ManifestError, match="11.0.0.1"):  # build numbers matter too
        check_plan_compatibility(block(version="11.0.0.1"), env(version="11.0.0.2"))


@pytest.mark.parametrize("level", ["none", "same_compute_capability"])
def test_other_compute_capability_is_refused_without_hardware_compatibility(level: str) -> None:
    with pytest.raises(ManifestError) as error:
        check_plan_compatibility(
            block(compute_capability="8.6", gpu_name="NVIDIA A10", hardware_compatibility=level), env()
        )
    text = str(error.value)
    assert "8.6" in text and "9.0" in text and "NVIDIA A10" in text and FAKE_GPU.name in text
    assert "rebuild with `ecar-export build --backend tensorrt` on this machine" in text
    assert "ampere_plus" in text


def test_ampere_plus_runs_on_other_ampere_or_newer_gpus() -> None:
    portable = block(compute_capability="8.6", gpu_name="NVIDIA A10", hardware_compatibility="ampere_plus")
    warnings = check_plan_compatibility(portable, env(cc="9.0"))
    assert len(warnings) == 1 and "NVIDIA A10" in warnings[0] and "tuned" in warnings[0]
    assert check_plan_compatibility(portable, env(name="NVIDIA A10", cc="8.0")) == []
    with pytest.raises(ManifestError, match=r"Ampere or newer.*7\.5"):
        check_plan_compatibility(portable, env(name="Tesla T4", cc="7.5"))


def test_same_compute_capability_other_gpu_model_loads_with_a_warning() -> None:
    warnings = check_plan_compatibility(block(gpu_name="NVIDIA H100 80GB HBM3"), env(name="NVIDIA H200"))
    assert len(warnings) == 1 and "NVIDIA H100 80GB HBM3" in warnings[0]


@pytest.mark.parametrize(
    "bad",
    [None, "x", {}, block(version=None), block(compute_capability="sm90"), block(hardware_compatibility="turing")],
)
def test_missing_or_malformed_block_is_a_manifest_error(bad: Any) -> None:
    with pytest.raises(ManifestError, match="rebuild with `ecar-export build --backend tensorrt`"):
        check_plan_compatibility(bad, env())


# ----------------------------------------------------------------------------- shapes
def test_resolve_dims_reads_batch_and_tokens(tiny_config: Any) -> None:
    config = tiny_config()
    specs = {spec.name: spec for spec in graph_specs(config)}
    backbone, flow = specs["backbone_2"], specs["flow_step"]
    shapes = {t.name: t.concrete(backbone.dims(3)) for t in backbone.inputs}
    assert resolve_dims(backbone, shapes) == {"B": 3, "2B": 6}
    shapes = {"x": (12, 4), "z": (24, 32), "t": (1,), "dt": (1,), "cfg": (1,)}
    assert resolve_dims(flow, shapes) == {"M": 12, "2M": 24}
    with pytest.raises(InvalidRequestError, match="inconsistent"):
        resolve_dims(flow, {**shapes, "z": (26, 32)})
    with pytest.raises(InvalidRequestError, match="contract"):
        resolve_dims(flow, {**shapes, "x": (12, 5)})
    with pytest.raises(InvalidRequestError, match="needs input 'cfg'"):
        resolve_dims(flow, {k: v for k, v in shapes.items() if k != "cfg"})


# ============================================================================ fakes
class FakeCuda:
    """CUDA driver double: "device memory" is host memory, streams run work at once (or record it)."""

    def __init__(self) -> None:
        self.buffers: dict[int, np.ndarray] = {}
        self.capturing: list[Callable[[], None]] | None = None
        self.graphs: dict[int, list[Callable[[], None]]] = {}
        self.launches = 0
        self.captures = 0
        self.events: dict[int, float] = {}
        self.streams = 0
        self.current: dict[int, int] = {}

    def use_device(self, index: int) -> None:
        self.current[threading.get_ident()] = index

    def info(self, index: int = 0) -> gpu.GpuInfo:
        return FAKE_GPU

    def device_count(self) -> int:
        return 1

    def malloc(self, nbytes: int) -> int:
        array = np.full(nbytes + 256, 0xCD, dtype=np.uint8)  # garbage, as fresh device memory would be
        pointer = -(-array.ctypes.data // 256) * 256  # cuMemAlloc returns (at least) 256-byte aligned memory
        self.buffers[pointer] = array
        return int(pointer)

    def free(self, pointer: int) -> None:
        del self.buffers[pointer]

    def _do(self, work: Callable[[], None]) -> None:
        if self.capturing is not None:
            self.capturing.append(work)
        else:
            work()

    def copy_to_device(self, pointer: int, array: np.ndarray, stream: int) -> None:
        data = array.copy()  # the copy is staged when issued, like a pageable cuMemcpyHtoDAsync
        self._do(lambda: ctypes.memmove(pointer, data.ctypes.data, data.nbytes))

    def copy_to_host(self, array: np.ndarray, pointer: int, stream: int) -> None:
        self._do(lambda: ctypes.memmove(array.ctypes.data, pointer, array.nbytes))

    def copy_device(self, destination: int, source: int, nbytes: int, stream: int) -> None:
        self._do(lambda: ctypes.memmove(destination, source, nbytes))

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
    def __init__(self, engine: FakeEngine) -> None:
        self.engine = engine
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        self.shapes[name] = tuple(shape)
        return all(d > 0 for d in shape)

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
    def __init__(self, onnx_path: str, io: HostIO | DeviceIO) -> None:
        import onnxruntime

        self.path = onnx_path
        self.session = onnxruntime.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]
        types = {"tensor(float)": np.dtype(np.float32), "tensor(int64)": np.dtype(np.int64)}
        self.dtypes = {i.name: types[i.type] for i in (*self.session.get_inputs(), *self.session.get_outputs())}
        self.io = io
        self.executions = 0
        self.contexts = 0

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

    def create_execution_context(self) -> FakeContext:
        self.contexts += 1
        return FakeContext(self)


def make_fake_trt(cuda: FakeCuda | None, builder: Any = None, io: DeviceIO | None = None) -> ModuleType:
    """A ``tensorrt`` module double: plans are JSON naming an ONNX file, run by ONNX Runtime."""
    trt = ModuleType("tensorrt")
    trt.__version__ = FAKE_VERSION
    engines: list[FakeEngine] = []

    class ILogger:
        def __init__(self) -> None:
            pass

    class Runtime:
        def __init__(self, logger: ILogger) -> None:
            self.logger = logger

        def deserialize_cuda_engine(self, data: bytes) -> FakeEngine | None:
            try:
                plan = json.loads(data)
            except ValueError:
                self.logger.log(SimpleNamespace(name="ERROR"), "Serialization assertion failed: magic tag mismatch")
                return None
            engine = FakeEngine(plan["onnx"], io or HostIO(cuda or FakeCuda()))
            engines.append(engine)
            return engine

    trt.ILogger = ILogger
    trt.Runtime = Runtime
    trt.Builder = builder or object
    trt.TensorIOMode = SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT")
    trt.TensorLocation = SimpleNamespace(DEVICE="DEVICE", HOST="HOST")
    trt.nptype = lambda dtype: dtype
    trt.engines = engines
    return trt


def fake_tensorrt_build(source: Path, target: Path, tensorrt: dict[str, Any] | None = None) -> manifest_io.Manifest:
    """Copy an ONNX build and give it fake plans (JSON naming each ONNX file) and a tensorrt block."""
    shutil.copytree(source, target)
    manifest = manifest_io.load(target)
    records = {}
    for name, entry in manifest.graphs.items():
        data = json.dumps({"onnx": str(target / entry.file), "max_batch": manifest.max_batch}).encode()
        plan = f"{name}-fake.plan"
        (target / plan).write_bytes(data)
        records[name] = PlanRecord(
            name, plan, hashlib.sha256(data).hexdigest(), len(data), FAKE_VERSION, FAKE_GPU.name, "9.0", "none",
            True, None, (manifest.min_batch, manifest.opt_batch, manifest.max_batch), 0.1, None,
        )  # fmt: skip
    meta = tensorrt or block()
    manifest_io.write(target, apply_plans(manifest.raw, records, meta))
    return manifest_io.load(target)


@pytest.fixture
def fresh_logger(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tensorrt_backend, "_LOGGER", None)


def fake_backend(manifest: manifest_io.Manifest, cuda_graphs: bool = False) -> tuple[TensorRTBackend, FakeCuda]:
    cuda = FakeCuda()
    backend = TensorRTBackend(
        manifest, cuda_graphs=cuda_graphs, trt_module=make_fake_trt(cuda), cuda=cuda, environment=ENV
    )
    return backend, cuda


def reference(build_dir: Path) -> Pipeline:
    return Pipeline.from_dir(build_dir, backend="onnxruntime", device="cpu")


def request(rng: np.random.Generator, classes: int, batch: int) -> tuple[list[int], int]:
    return rng.integers(0, classes, size=batch).tolist(), int(rng.integers(0, 2**62))


def on_device(backend: TensorRTBackend, labels: list[int], seed: int, cfg: float | None = None) -> Any:
    config = backend.config
    noise = schedule.draw_noise(config, schedule.noise_keys(seed, len(labels)))
    return backend.generate_on_device(np.asarray(labels), noise, schedule.cfg_weights(config, cfg))


# ============================================================================ backend with fakes
@pytest.mark.parametrize("case", [(TINY, False), (TWO_STAGE, True)], ids=["tiny", "two-stage-fused"])
def test_fake_backend_matches_onnxruntime_on_both_paths(
    case: tuple[str, bool], build_cache: BuildCache, tmp_path: Path, rng: np.random.Generator, fresh_logger: None
) -> None:
    build = build_cache.get(*case)
    manifest = fake_tensorrt_build(build.dir, tmp_path / "trt")
    ort = reference(build.dir)
    backend, cuda = fake_backend(manifest)
    pipeline = Pipeline(manifest, backend)
    config = manifest.config
    for batch in (1, build.max_batch, 2, build.max_batch):
        labels, seed = request(rng, config.num_classes, batch)
        where = f"{case} labels={labels} seed={seed}"
        ref = ort.generate(labels, seed=seed)
        host = pipeline.generate(labels, seed=seed)
        assert np.array_equal(host.latents, ref.latents), where
        assert np.array_equal(host.images, ref.images), where
        device = on_device(backend, labels, seed)
        assert device.latents.dtype == np.float32 and device.image.dtype == np.float32
        assert np.array_equal(device.latents, ref.latents), where
        assert np.array_equal(to_uint8(device.image), ref.images), where
        assert device.graph_calls == dict(ref.timings.calls), where
        assert len(device.stage_seconds) == config.num_stages and device.total_seconds > 0
        assert set(device.graph_seconds) == set(device.graph_calls)
    # one workspace per batch size, reused
    assert sorted(backend._workspaces) == sorted({1, 2, build.max_batch})
    described = backend.describe()
    assert described["backend"] == "tensorrt" and described["tensorrt"] == FAKE_VERSION
    assert described["plans"] == {name: f"{name}-fake.plan" for name in manifest.graphs}
    backend.close()
    assert not cuda.buffers and cuda.streams == 0, "close() leaks device memory or streams"
    with pytest.raises(EngineError, match="closed"):
        on_device(backend, [1], 0)


def test_fake_cuda_graphs_capture_then_replay(
    build_cache: BuildCache, tmp_path: Path, rng: np.random.Generator, fresh_logger: None
) -> None:
    build = build_cache.get(TINY)
    manifest = fake_tensorrt_build(build.dir, tmp_path / "trt")
    ort = reference(build.dir)
    backend, cuda = fake_backend(manifest, cuda_graphs=True)
    stages = manifest.config.num_stages
    for number in range(4):
        labels, seed = request(rng, manifest.config.num_classes, 3)
        cfg = float(rng.uniform(1.0, 3.0))  # a new cfg each time: replays must read the new scalars
        ref = ort.generate(labels, seed=seed, cfg=cfg)
        device = on_device(backend, labels, seed, cfg)
        assert np.array_equal(device.latents, ref.latents), f"request {number}"
        assert device.graph_calls == dict(ref.timings.calls)
        # request 0 warms each stage's own context up, request 1 captures after its eager run, 2+ replay
        assert cuda.captures == (stages if number >= 1 else 0)
        assert cuda.launches == stages * max(0, number - 1)
    assert not backend.warnings
    flow = next(e for e in backend.trt.engines if "flow_step" in e.path)
    assert flow.contexts == 1 + stages  # the shared one, and one per stage for the batch size used
    backend.close()
    assert not cuda.graphs and not cuda.buffers


def test_fake_backend_is_thread_safe(
    build_cache: BuildCache, tmp_path: Path, rng: np.random.Generator, fresh_logger: None
) -> None:
    build = build_cache.get(TINY)
    backend, _ = fake_backend(fake_tensorrt_build(build.dir, tmp_path / "trt"))
    pipeline = Pipeline(backend.manifest, backend)
    jobs = [request(rng, 10, int(rng.integers(1, build.max_batch + 1))) for _ in range(8)]
    expected = [on_device(backend, labels, seed).latents for labels, seed in jobs]
    results: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []

    def work(index: int) -> None:
        try:
            labels, seed = jobs[index]
            latents = on_device(backend, labels, seed).latents if index % 2 else pipeline.generate(labels, seed).latents
            results[index] = latents
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for index, latents in enumerate(expected):
        assert np.array_equal(results[index], latents), f"job {index}"


def test_fake_backend_refuses_bad_requests_and_plans(
    build_cache: BuildCache, tmp_path: Path, fresh_logger: None
) -> None:
    build = build_cache.get(TINY)
    manifest = fake_tensorrt_build(build.dir, tmp_path / "trt")
    backend, _ = fake_backend(manifest)
    config = manifest.config
    with pytest.raises(InvalidRequestError, match="outside this build's profile"):
        on_device(backend, [1] * (build.max_batch + 1), 0)
    noise = schedule.draw_noise(config, schedule.noise_keys(0, 2))
    with pytest.raises(InvalidRequestError, match="noise of stage 2"):
        backend.generate_on_device(np.array([1, 2]), [noise[0], noise[1][:, :1], noise[2]], [2.0] * 3)
    with pytest.raises(EngineError, match="no graph 'nope'"):
        backend.run("nope", {})
    backend.close()

    # a plan TensorRT cannot deserialize (sha256 updated to match): the error shows TensorRT's log
    name = "flow_step"
    plan = manifest.path(manifest.graphs[name].plan_file or "")
    plan.write_bytes(b"\x00garbage")
    raw = json.loads((manifest.root / manifest_io.MANIFEST_NAME).read_text())
    raw["graphs"][name]["plan_sha256"] = hashlib.sha256(plan.read_bytes()).hexdigest()
    manifest_io.write(manifest.root, raw)
    with pytest.raises(EngineError, match=r"cannot deserialize the plan of graph 'flow_step'[\s\S]*magic tag mismatch"):
        fake_backend(manifest_io.load(manifest.root))


def test_fake_backend_checks_the_machine_before_loading(
    build_cache: BuildCache, tmp_path: Path, fresh_logger: None
) -> None:
    build = build_cache.get(TINY)
    manifest = fake_tensorrt_build(build.dir, tmp_path / "trt", tensorrt=block(version="10.12.0.36"))
    cuda = FakeCuda()
    trt = make_fake_trt(cuda)
    with pytest.raises(ManifestError, match=r"10\.12\.0\.36.*10\.13\.3\.9.*on this machine"):
        TensorRTBackend(manifest, trt_module=trt, cuda=cuda, environment=ENV)
    assert trt.engines == [], "plans were deserialized before the compatibility check"
    # the real environment probe: the fake driver reports the fake GPU
    backend = TensorRTBackend(fake_tensorrt_build(build.dir, tmp_path / "ok"), trt_module=trt, cuda=cuda)
    assert backend.environment == ENV
    backend.close()


# ============================================================================ builder with a fake TensorRT
class FakeBuilderState:
    def __init__(self) -> None:
        self.profiles: list[dict[str, tuple[Any, Any, Any]]] = []
        self.flags: set[str] = {"TF32"}
        self.network_flags = 0
        self.hardware: Any = None
        self.workspace: int | None = None
        self.cache_in: bytes | None = None
        self.fail_parse = False
        self.fail_build = False


def make_fake_builder_trt(state: FakeBuilderState) -> ModuleType:
    cuda = FakeCuda()

    class Network:
        def __init__(self) -> None:
            self.inputs: list[SimpleNamespace] = []

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
            return b"timing-cache:" + self.data

    class Config:
        hardware_compatibility_level = None

        def set_memory_pool_limit(self, pool: str, size: int) -> None:
            state.workspace = size

        def clear_flag(self, flag: str) -> None:
            state.flags.discard(flag)

        def set_flag(self, flag: str) -> None:
            state.flags.add(flag)

        def add_optimization_profile(self, profile: dict[str, Any]) -> int:
            state.profiles.append(profile)
            return 0

        def create_timing_cache(self, data: bytes) -> Cache:
            state.cache_in = bytes(data)
            return Cache(bytes(data))

        def set_timing_cache(self, cache: Cache, ignore_mismatch: bool) -> bool:
            self.cache = cache
            return True

        def get_timing_cache(self) -> Cache:
            return self.cache

    class Profile(dict[str, Any]):
        def set_shape(self, name: str, low: Any, opt: Any, high: Any) -> None:
            self[name] = (tuple(low), tuple(opt), tuple(high))

    class Builder:
        def __init__(self, logger: Any) -> None:
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
            return b"PLAN:" + ",".join(i.name for i in network.inputs).encode()

    trt = make_fake_trt(cuda, builder=Builder)
    trt.OnnxParser = Parser
    trt.Dims = tuple
    trt.NetworkDefinitionCreationFlag = SimpleNamespace(STRONGLY_TYPED=1)
    trt.BuilderFlag = SimpleNamespace(FP16="FP16", INT8="INT8", TF32="TF32")
    trt.MemoryPoolType = SimpleNamespace(WORKSPACE="WORKSPACE")
    trt.HardwareCompatibilityLevel = SimpleNamespace(
        NONE="NONE", AMPERE_PLUS="AMPERE_PLUS", SAME_COMPUTE_CAPABILITY="SAME_COMPUTE_CAPABILITY"
    )
    return trt


@pytest.fixture
def fake_builder(monkeypatch: pytest.MonkeyPatch, fresh_logger: None, build_cache: BuildCache) -> FakeBuilderState:
    build_cache.get(TINY)  # export before the fake `tensorrt` module exists: torch.export probes for TensorRT
    state = FakeBuilderState()
    monkeypatch.setitem(sys.modules, "tensorrt", make_fake_builder_trt(state))
    monkeypatch.setattr(gpu, "driver", lambda: FakeCuda())
    return state


def test_fake_build_plans_profiles_cache_and_manifest(
    fake_builder: FakeBuilderState, build_cache: BuildCache, tmp_path: Path
) -> None:
    build = build_cache.get(TINY)
    target = tmp_path / "engines"
    shutil.copytree(build.dir, target)
    cache_dir = tmp_path / "cache"
    path = tensorrt_build.build_plans_for_dir(target, timing_cache_dir=cache_dir, workspace_bytes=1 << 28)
    manifest = manifest_io.load(path.parent)  # verifies every plan's sha256
    assert manifest.backend == "tensorrt"
    assert manifest.raw["tensorrt"] == block(hardware_compatibility="none")
    assert manifest.raw["toolchain"]["tensorrt"] == FAKE_VERSION
    profile = (manifest.min_batch, manifest.opt_batch, manifest.max_batch)
    for (name, entry), seen in zip(manifest.graphs.items(), fake_builder.profiles):
        assert entry.plan_file and entry.plan_file.startswith(f"{name}-") and entry.plan_file.endswith(".plan")
        assert (target / entry.plan_file).read_bytes().startswith(b"PLAN:")
        dynamic = {k: v for k, v in profile_shapes(entry.spec, *profile).items() if k not in ("t", "dt", "cfg")}
        assert seen == dynamic, name
        assert manifest.raw["graphs"][name]["tensorrt_builder"]["profile"] == list(profile)
    assert fake_builder.network_flags == 1 << 1, "networks must be created strongly typed"
    assert "TF32" not in fake_builder.flags and "FP16" not in fake_builder.flags
    assert fake_builder.workspace == 1 << 28 and fake_builder.hardware is None
    cache = timing_cache_file(cache_dir, FAKE_GPU.name, "9.0", FAKE_VERSION)
    assert cache.read_bytes().startswith(b"timing-cache:"), "the timing cache was not saved"
    assert fake_builder.cache_in and fake_builder.cache_in.startswith(b"timing-cache:"), "...nor reloaded"
    assert not list(target.glob(".*.building")) + list(target.glob(".*.tmp")), "staging files left behind"
    # a second build replaces the plans and removes the old ones after the commit
    fake_builder.flags = {"TF32"}
    tensorrt_build.build_plans_for_dir(target, timing_cache_dir=cache_dir, hardware_compatibility="ampere_plus")
    assert fake_builder.hardware == "AMPERE_PLUS"
    again = manifest_io.load(target)
    assert again.raw["tensorrt"]["hardware_compatibility"] == "ampere_plus"
    assert sorted(p.name for p in target.glob("*.plan")) == sorted(e.plan_file or "" for e in again.graphs.values())


def test_fake_build_weakly_typed_option(
    fake_builder: FakeBuilderState, build_cache: BuildCache, tmp_path: Path
) -> None:
    build = build_cache.get(TINY)
    entry = manifest_io.load(build.dir).graphs["decoder"]
    record = build_plan(
        build.dir / entry.file, tmp_path / "d.plan", entry.spec, (1, 2, 5), None, strongly_typed=False,
        weakly_typed_precision="int8",
    )  # fmt: skip
    assert fake_builder.network_flags == 0 and {"FP16", "INT8"} <= fake_builder.flags
    assert record.weakly_typed_precision == "int8" and not record.strongly_typed and record.timing_cache is None
    with pytest.raises(InvalidRequestError, match="strongly_typed=False"):
        build_plan(build.dir / entry.file, tmp_path / "e.plan", entry.spec, (1, 2, 5), weakly_typed_precision="fp16")
    with pytest.raises(InvalidRequestError, match="hardware compatibility"):
        build_plan(build.dir / entry.file, tmp_path / "e.plan", entry.spec, (1, 2, 5), hardware_compatibility="all")
    sys.modules["tensorrt"].__version__ = "11.0.0.9"
    with pytest.raises(InvalidRequestError, match="11.0.0.9 builds strongly typed networks only"):
        build_plan(
            build.dir / entry.file, tmp_path / "e.plan", entry.spec, (1, 2, 5), strongly_typed=False,
            weakly_typed_precision="fp16",
        )  # fmt: skip


def test_fake_build_failures_show_nodes_and_log(
    fake_builder: FakeBuilderState, build_cache: BuildCache, tmp_path: Path
) -> None:
    build = build_cache.get(TINY)
    entry = manifest_io.load(build.dir).graphs["backbone_1"]
    fake_builder.fail_parse = True
    with pytest.raises(EngineError) as error:
        build_plan(build.dir / entry.file, tmp_path / "b.plan", entry.spec, (1, 2, 5))
    text = str(error.value)
    assert "cannot parse" in text and "node /blocks.0/attn/Softmax (Softmax): unsupported data type" in text
    assert "/blocks.1/attn/Softmax" in text and "ModelImporter.cpp:1234" in text
    fake_builder.fail_parse, fake_builder.fail_build = False, True
    with pytest.raises(EngineError, match=r"failed to build a plan for graph 'backbone_1'[\s\S]*Error Code 10"):
        build_plan(build.dir / entry.file, tmp_path / "b.plan", entry.spec, (1, 2, 5))
    assert not (tmp_path / "b.plan").exists() and not list(tmp_path.iterdir())


# ============================================================================ real GPU
def gpu_skip_reason() -> str | None:
    if tensorrt_backend.tensorrt_version() is None:
        return "TensorRT not installed"
    if not gpu.gpu_available():
        return "no NVIDIA GPU"
    return None


needs_gpu = pytest.mark.skipif(gpu_skip_reason() is not None, reason=gpu_skip_reason() or "")


def load_smoke() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_smoke", ROOT / "scripts" / "gpu_smoke.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


needs_nvidia = pytest.mark.skipif(not gpu.gpu_available(), reason="no NVIDIA GPU")


@pytest.mark.gpu
@needs_nvidia
def test_cuda_driver_memory_streams_events_and_graphs() -> None:
    """runtime.gpu on a real GPU (no TensorRT needed): every call the backend makes."""
    cuda = gpu.driver()
    info = gpu.gpu_info(0)
    assert info.name and info.total_memory > 1 << 30 and gpu.parse_compute_capability(info.compute_capability) >= (3, 0)
    cuda.use_device(0)
    stream = cuda.stream_create()
    rng = np.random.default_rng()
    data = rng.standard_normal((257, 33)).astype(np.float32)
    a, b, c = (cuda.malloc(data.nbytes) for _ in range(3))
    assert all(pointer % 256 == 0 for pointer in (a, b, c))
    start, end = cuda.event_create(), cuda.event_create()
    cuda.event_record(start, stream)
    cuda.copy_to_device(a, data, stream)
    cuda.copy_device(b, a, data.nbytes, stream)
    cuda.event_record(end, stream)
    back = np.empty_like(data)
    cuda.copy_to_host(back, b, stream)
    cuda.stream_synchronize(stream)
    assert np.array_equal(back, data)
    assert cuda.event_elapsed_ms(start, end) >= 0.0
    cuda.memset(c, 0, data.nbytes, stream)
    cuda.copy_to_host(back, c, stream)
    cuda.stream_synchronize(stream)
    assert not back.any()
    # capture "c <- b" once, change b, replay: the graph reads b's current contents
    cuda.begin_capture(stream)
    cuda.copy_device(c, b, data.nbytes, stream)
    graph = cuda.end_capture(stream)
    executable = cuda.graph_instantiate(graph)
    fresh = rng.standard_normal(data.shape).astype(np.float32)
    cuda.copy_to_device(b, fresh, stream)
    cuda.graph_launch(executable, stream)
    cuda.copy_to_host(back, c, stream)
    cuda.stream_synchronize(stream)
    assert np.array_equal(back, fresh)
    # another thread makes the same context current and sees the same memory
    seen: list[np.ndarray] = []

    def other() -> None:
        cuda.use_device(0)
        out = np.empty_like(data)
        cuda.copy_to_host(out, c, stream)
        cuda.stream_synchronize(stream)
        seen.append(out)

    thread = threading.Thread(target=other)
    thread.start()
    thread.join()
    assert seen and np.array_equal(seen[0], fresh)
    with pytest.raises(EngineError, match="cuMemAlloc"):
        cuda.malloc(1 << 62)
    cuda.graph_destroy(graph, executable)
    for event in (start, end):
        cuda.event_destroy(event)
    for pointer in (a, b, c):
        cuda.free(pointer)
    cuda.stream_destroy(stream)


@pytest.mark.gpu
@needs_nvidia
def test_device_path_on_a_real_gpu_with_onnxruntime_engines(
    build_cache: BuildCache, tmp_path: Path, rng: np.random.Generator, fresh_logger: None
) -> None:
    """The backend's device buffers, bindings and scalars on real CUDA memory (engines: ORT through copies).

    ECAR_TEST_TINY_BUILD may name a build of the tiny config made elsewhere, for GPU machines
    without the export stack.
    """
    prebuilt = os.environ.get("ECAR_TEST_TINY_BUILD")
    build_dir = Path(prebuilt) if prebuilt else build_cache.get(TINY).dir
    manifest = fake_tensorrt_build(build_dir, tmp_path / "trt")
    cuda = gpu.driver()
    backend = TensorRTBackend(manifest, trt_module=make_fake_trt(None, io=DeviceIO(cuda)), cuda=cuda, environment=ENV)
    ort, pipeline = reference(build_dir), Pipeline(manifest, backend)
    for batch in (1, manifest.max_batch, 3):
        labels, seed = request(rng, manifest.config.num_classes, batch)
        ref = ort.generate(labels, seed=seed)
        device = on_device(backend, labels, seed)
        assert np.array_equal(device.latents, ref.latents), f"labels={labels} seed={seed}"
        assert np.array_equal(to_uint8(device.image), ref.images)
        assert all(seconds > 0 for seconds in device.stage_seconds) and device.decoder_seconds > 0
        host = pipeline.generate(labels, seed=seed)
        assert np.array_equal(host.latents, ref.latents)
    backend.close()


def test_smoke_script_exits_77_without_tensorrt_or_gpu(tmp_path: Path) -> None:
    if gpu_skip_reason() is None:
        pytest.skip("TensorRT and a GPU are present")
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gpu_smoke.py"), "--engine-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 77, result.stderr
    assert f"skipped: {gpu_skip_reason()}" in result.stderr


@pytest.mark.gpu
@needs_gpu
@needs_demo
@pytest.mark.parametrize("cuda_graphs", [False, True], ids=["eager", "cuda-graphs"])
def test_tensorrt_demo_matches_onnxruntime(build_cache: BuildCache, tmp_path: Path, cuda_graphs: bool) -> None:
    smoke = load_smoke()
    build = build_cache.get("demo")
    rows, summary = smoke.run_smoke(build.dir, tmp_path / "trt", requests=3, cuda_graphs=cuda_graphs,
                                    timing_cache_dir=tmp_path / "cache")  # fmt: skip
    bad = [row for row in rows if not row.ok]
    assert not bad, f"{summary['tolerances']}: {bad}"
    # requests 0-1 run each stage's loop eagerly (warm-up, then capture), request 2 replays the CUDA graphs
    assert not [w for w in summary["backend"]["warnings"] if "capture" in w], summary["backend"]["warnings"]


@pytest.mark.gpu
@needs_gpu
@needs_demo
@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_tensorrt_reduced_precision_demo_matches_onnxruntime(
    build_cache: BuildCache, tmp_path: Path, precision: str
) -> None:
    """fp16 and int8 plans compiled from the same strongly typed graphs ORT runs, compared with ORT."""
    smoke = load_smoke()
    build = build_cache.get("demo", precision=precision)
    rows, summary = smoke.run_smoke(build.dir, tmp_path / "trt", requests=2)
    bad = [row for row in rows if not row.ok]
    assert not bad, f"{precision} ({summary['precision']}, {summary['tolerances']}): {bad}"
