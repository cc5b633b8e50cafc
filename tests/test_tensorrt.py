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

import dataclasses
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import warnings
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import numpy as np
import pytest
from conftest import AUTO_CPU_BACKEND, BuildCache, build_model, engine_model, needs_demo, run_concurrently
from fake_tensorrt import FAKE_GPU, FAKE_VERSION, DeviceIO, FakeBuilderState, FakeCuda, install, make_fake_trt

from ecar_export.backends import tensorrt as tensorrt_build
from ecar_export.backends.tensorrt import PlanOptions, PlanRecord, apply_plans, build_plan, timing_cache_file
from ecar_export.families.ecar import contract as ecar_contract
from ecar_export.families.ecar import schedule
from ecar_export.families.ecar.contract import config_of, graph_specs
from runtime import graphs
from runtime import manifest as manifest_io
from runtime.backends.tensorrt import TensorRTBackend, gpu, loader, probe
from runtime.backends.tensorrt.compat import RunningEnvironment, check_plan_compatibility
from runtime.backends.tensorrt.shapes import resolve_dims
from runtime.errors import BackendUnavailableError, ECARWarning, EngineError, InvalidRequestError, ManifestError
from runtime.graphs import Call, Kind, profile_shapes
from runtime.images import to_uint8
from runtime.pipeline import Pipeline
from runtime.request import RequestInputs

ROOT = Path(__file__).resolve().parents[1]
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
        import runtime.backends.tensorrt.gpu, runtime.backends.tensorrt, runtime.backends.tensorrt.loader as loader
        assert loader.tensorrt_version() is None
        try:
            loader.load_tensorrt()
        except Exception as exc:
            print("ERROR", type(exc).__name__, exc)
        bad = sorted(n for n in sys.modules if n.split(".")[0] in ("torch", "tensorrt"))
        print("LOADED", bad)
        """
    )
    assert result.returncode == 0, result.stderr
    assert "LOADED []" in result.stdout, result.stdout
    assert "ERROR BackendUnavailableError TensorRT is not importable" in result.stdout, result.stdout
    assert "pip install 'ecar-export[tensorrt]'" in result.stdout


def test_build_module_imports_without_tensorrt_and_reports_no_version() -> None:
    result = run_python(
        """
        import sys
        import ecar_export.backends.tensorrt as tb
        print("VERSION", tb.tensorrt_version())
        print("LOADED", "tensorrt_bindings" in sys.modules or getattr(sys.modules.get("tensorrt"), "Builder", None))
        """
    )
    assert result.returncode == 0, result.stderr
    assert "VERSION None" in result.stdout and "LOADED None" in result.stdout, result.stdout


def test_tensorrt_version_is_none_here() -> None:
    # where the stubs are installed, `import tensorrt` finds an empty namespace package: still "not installed"
    if loader.tensorrt_version() is not None:
        pytest.skip("TensorRT is installed here")
    assert tensorrt_build.tensorrt_version() is None
    with pytest.raises(BackendUnavailableError, match=r"TensorRT is not (importable|installed)"):
        loader.load_tensorrt()


@pytest.fixture
def no_tensorrt(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError


def test_build_plan_without_tensorrt_says_how_to_get_it(no_tensorrt: None, tmp_path: Path, tiny_config: Any) -> None:
    config = tiny_config()
    spec = graph_specs(config)[0]
    with pytest.raises(BackendUnavailableError, match=r"TensorRT is not importable.*'tensorrt' extra"):
        build_plan(tmp_path / "x.onnx", tmp_path / "x.plan", spec, config, (1, 2, 4))
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
    backbone, flow = specs["backbone"], specs["flow_step"]
    for stage in (1, 2, 3):
        dims = ecar_contract.request_plan(config).dims(stage, 3)
        shapes = {t.name: t.concrete(dims) for t in backbone.inputs}
        expected = {k: dims[k] for k in ("B", "2B", "P", "N", "T", "E")}
        assert resolve_dims(backbone, shapes) == expected  # T = 0 at stage 1, E = 0 at stage 3
    with pytest.raises(InvalidRequestError, match="dim N=0"):
        resolve_dims(backbone, {**shapes, "noise": (3, 0, 4), "fresh": (0, 0), "up": (0, 4), "positions": (0,)})
    shapes = {"x": (3, 4, 4), "z": (6, 4, 32), "t": (1,), "dt": (1,), "cfg": (1,)}
    assert resolve_dims(flow, shapes) == {"B": 3, "2B": 6, "N": 4}
    with pytest.raises(InvalidRequestError, match="inconsistent"):
        resolve_dims(flow, {**shapes, "z": (8, 4, 32)})
    with pytest.raises(InvalidRequestError, match="contract"):
        resolve_dims(flow, {**shapes, "x": (3, 4, 5)})
    with pytest.raises(InvalidRequestError, match="needs input 'cfg'"):
        resolve_dims(flow, {k: v for k, v in shapes.items() if k != "cfg"})


def fake_tensorrt_build(source: Path, target: Path, tensorrt: dict[str, Any] | None = None) -> manifest_io.Manifest:
    """Copy an ONNX build and give it fake plans (JSON naming each ONNX file) and a tensorrt block."""
    shutil.copytree(source, target)
    manifest = manifest_io.load(target)
    batches = (manifest.min_batch, manifest.opt_batch, manifest.max_batch)
    records = {}
    for name, entry in manifest.graphs.items():
        profiles = tensorrt_build.stage_profiles(entry.spec, manifest.plan, batches)
        plan_data = {"onnx": str(target / entry.file), "profiles": [p["shapes"] for p in profiles]}
        data = json.dumps(plan_data).encode()
        plan = f"{name}-fake.plan"
        (target / plan).write_bytes(data)
        records[name] = PlanRecord(
            name, plan, hashlib.sha256(data).hexdigest(), len(data), FAKE_VERSION, FAKE_GPU.name, "9.0",
            PlanOptions(), batches, 0.1, None, profiles=tuple(profiles),
        )  # fmt: skip
    meta = tensorrt or block()
    manifest_io.write(target, apply_plans(manifest.document(), records, meta))
    return manifest_io.load(target)


@pytest.fixture
def fresh_logger(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loader, "_LOGGER", None)


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
    keys = schedule.noise_keys(seed, len(labels))
    return backend.run_request(RequestInputs.draw(backend.plan, np.asarray(labels), keys, cfg))


# ============================================================================ backend with fakes
def test_fake_backend_takes_weight_one_above_the_plans_guidance_threshold(
    build_cache: BuildCache, tmp_path: Path, fresh_logger: None
) -> None:
    """A plan whose steps above ``guidance_below`` run unguided: the device path binds the weight-1 slot where the
    host path feeds 1, and both give the same latents (which differ from the always-guided plan's)."""
    build = build_cache.get(TINY)
    manifest = fake_tensorrt_build(build.dir, tmp_path / "trt")
    stage2 = manifest.plan.stage(2).times
    plan = dataclasses.replace(manifest.plan, guidance_below=(stage2[0] + stage2[1]) / 2)
    guided = [(c.stage, c.step, c.guided) for c in plan.calls() if c.graph == Kind.FLOW_STEP]
    assert {g for _, _, g in guided} == {True, False}, guided  # the threshold splits the request
    thresholded = dataclasses.replace(manifest, plan=plan)
    ort = reference(build.dir).backend
    fed: list[tuple[Call, float]] = []

    class Feeds:
        name = ort.name

        def run(self, call: Call, feeds: Any) -> list[np.ndarray]:
            if call.graph == Kind.FLOW_STEP:
                fed.append((call, float(feeds["cfg"][0])))
            return ort.run(call, feeds)

        def describe(self) -> dict[str, object]:
            return ort.describe()

    host = Pipeline(thresholded, Feeds()).generate([1, 4], seed=3, cfg=3.0)
    assert [(c.stage, c.step, w) for c, w in fed] == [(s, k, 3.0 if g else 1.0) for s, k, g in guided]
    backend, _ = fake_backend(thresholded)
    device = on_device(backend, [1, 4], 3, cfg=3.0)
    assert np.array_equal(device.latents, host.latents)
    always = Pipeline(manifest, ort).generate([1, 4], seed=3, cfg=3.0)
    assert not np.allclose(always.latents, host.latents, atol=1e-4), "the threshold changed the weights"
    backend.close()


@pytest.mark.parametrize("case", [(TINY, False), (TWO_STAGE, True)], ids=["tiny", "two-stage-fused"])
def test_fake_backend_matches_onnxruntime_on_both_paths(
    case: tuple[str, bool], build_cache: BuildCache, tmp_path: Path, rng: np.random.Generator, fresh_logger: None
) -> None:
    build = build_cache.get(*case)
    manifest = fake_tensorrt_build(build.dir, tmp_path / "trt")
    ort = reference(build.dir)
    backend, cuda = fake_backend(manifest)
    host_pipeline = Pipeline(manifest, backend, device_resident=False)  # every graph call through run()
    device_pipeline = Pipeline(manifest, backend)
    config = config_of(manifest)
    runs = {e.path: e for e in backend.trt.engines}
    for batch in (1, build.max_batch, 2, build.max_batch):
        labels, seed = request(rng, config.num_classes, batch)
        where = f"{case} labels={labels} seed={seed}"
        ref = ort.generate(labels, seed=seed)
        before = sum(e.executions for e in runs.values())
        host = host_pipeline.generate(labels, seed=seed)
        assert sum(e.executions for e in runs.values()) - before == sum(ref.timings.calls.values())
        assert np.array_equal(host.latents, ref.latents), where
        assert np.array_equal(host.images, ref.images), where
        assert dict(host.timings.calls) == dict(ref.timings.calls)
        assert np.array_equal(device_pipeline.generate(labels, seed=seed).images, ref.images), where
        device = on_device(backend, labels, seed)
        assert device.latents.dtype == np.float32 and device.image.dtype == np.float32
        assert np.array_equal(device.latents, ref.latents), where
        assert np.array_equal(to_uint8(device.image), ref.images), where
        assert device.graph_calls == dict(ref.timings.calls), where
        assert len(device.stage_seconds) == config.num_stages and device.total_seconds > 0
        assert set(device.graph_seconds) == set(device.graph_calls)
    # one workspace per batch size, reused
    assert sorted(backend._workspaces) == sorted({1, 2, build.max_batch})
    # one engine per graph kind, one profile per stage it runs at, one context bound to each profile
    engines = {Path(e.path).name.split("-")[0]: e for e in backend.trt.engines}
    assert set(engines) == set(manifest.graphs)
    for name, engine in engines.items():
        stages = manifest.plan.graph_stages(manifest.graphs[name].spec.kind)
        assert engine.num_optimization_profiles == len(stages), name
        assert sorted(c.profile for c in engine.contexts) == list(range(len(stages))), name
    flow = engines[graphs.flow_graph(manifest.fuse_flow_loop)]
    for index, tokens in enumerate(config.tokens_per_stage):  # each stage's profile is tuned at its own grid
        low, opt, high = flow.profiles[index]["x"]
        assert (low[:2], opt[:2], high[:2]) == (
            (manifest.min_batch, tokens),
            (manifest.opt_batch, tokens),
            (manifest.max_batch, tokens),
        )
    assert engines["backbone"].profiles[0]["past_kv"][1][0] == 0, "stage 1 reads an empty cache"
    assert engines["backbone"].profiles[-1]["kv_tokens"][1] == (0,), "the last stage emits no cache"
    # every copy in and out went through pinned host memory
    assert cuda.pageable_copies == 0, "copies from pageable host memory"
    # every context has no memory of its own: all share one buffer sized to the largest need
    contexts = [c for e in backend.trt.engines for c in e.contexts]
    assert contexts and all(c.strategy == "USER_MANAGED" for c in contexts)
    needed = max(e.device_memory_size_v2 for e in backend.trt.engines)
    assert {c.memory for c in contexts} == {(contexts[0].memory[0], backend.scratch_bytes)}
    assert needed <= backend.scratch_bytes < needed + 256
    assert backend.describe()["shared_activation_bytes"] == backend.scratch_bytes
    described = backend.describe()
    assert described["backend"] == "tensorrt" and described["tensorrt"] == FAKE_VERSION
    assert described["plans"] == {name: f"{name}-fake.plan" for name in manifest.graphs}
    backend.close()
    assert not cuda.buffers and not cuda.pinned and cuda.streams == 0, "close() leaks memory or streams"
    with pytest.raises(EngineError, match="closed"):
        on_device(backend, [1], 0)


def test_fake_cuda_graphs_capture_then_replay(
    build_cache: BuildCache, tmp_path: Path, rng: np.random.Generator, fresh_logger: None
) -> None:
    build = build_cache.get(TINY)
    manifest = fake_tensorrt_build(build.dir, tmp_path / "trt")
    ort = reference(build.dir)
    backend, cuda = fake_backend(manifest, cuda_graphs=True)
    stages = config_of(manifest).num_stages
    for number in range(4):
        labels, seed = request(rng, config_of(manifest).num_classes, 3)
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
    assert len(flow.contexts) == 2 * stages  # one per profile, and one per stage for the captured loops
    assert len({c.memory for e in backend.trt.engines for c in e.contexts}) == 1, "one shared activation buffer"
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

    def work(index: int) -> np.ndarray:  # the device path and the pipeline path, interleaved
        labels, seed = jobs[index]
        return on_device(backend, labels, seed).latents if index % 2 else pipeline.generate(labels, seed).latents

    results = run_concurrently(work, len(jobs), threads=len(jobs))
    for index, latents in enumerate(expected):
        assert np.array_equal(results[index], latents), f"job {index}"


def test_fake_backend_refuses_bad_requests_and_plans(
    build_cache: BuildCache, tmp_path: Path, fresh_logger: None
) -> None:
    build = build_cache.get(TINY)
    manifest = fake_tensorrt_build(build.dir, tmp_path / "trt")
    backend, _ = fake_backend(manifest)
    config = config_of(manifest)
    with pytest.raises(InvalidRequestError, match="outside this build's profile"):
        on_device(backend, [1] * (build.max_batch + 1), 0)
    noise = schedule.draw_noise(config, schedule.noise_keys(0, 2))
    with pytest.raises(InvalidRequestError, match="noise of stage 2"):
        backend.run_request(RequestInputs(np.array([1, 2]), (noise[0], noise[1][:, :1], noise[2]), (2.0,) * 3))
    with pytest.raises(EngineError, match="no graph 'nope'"):
        backend.run(Call("nope", 1), {})  # type: ignore[arg-type]
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
@pytest.fixture
def fake_builder(monkeypatch: pytest.MonkeyPatch, build_cache: BuildCache) -> FakeBuilderState:
    build_cache.get(TINY)  # export before the fake `tensorrt` module exists: torch.export probes for TensorRT
    trt, _ = install(patch=monkeypatch)
    state: FakeBuilderState = trt.state
    return state


def test_fake_build_plans_profiles_cache_and_manifest(
    fake_builder: FakeBuilderState, build_cache: BuildCache, tmp_path: Path
) -> None:
    build = build_cache.get(TINY)
    target = tmp_path / "engines"
    shutil.copytree(build.dir, target)
    cache_dir = tmp_path / "cache"
    path = tensorrt_build.build_plans_for_dir(
        target, PlanOptions(timing_cache_dir=str(cache_dir), workspace_bytes=1 << 28)
    )
    manifest = manifest_io.load(path.parent)  # verifies every plan's sha256
    assert manifest.backend == "tensorrt"
    assert manifest.raw["tensorrt"] == block(hardware_compatibility="none")
    assert manifest.raw["toolchain"]["tensorrt"] == FAKE_VERSION
    profile = (manifest.min_batch, manifest.opt_batch, manifest.max_batch)
    seen = list(fake_builder.profiles)
    for name, entry in manifest.graphs.items():
        assert entry.plan_file and entry.plan_file.startswith(f"{name}-") and entry.plan_file.endswith(".plan")
        assert json.loads((target / entry.plan_file).read_bytes())["onnx"] == str((target / entry.file).resolve())
        stages = manifest.plan.graph_stages(entry.spec.kind)
        assert stages == ([config_of(manifest).num_stages] if name == "decoder" else [1, 2, 3])
        for stage in stages:  # one profile per stage: that stage's exact shapes, the batch range around them
            exact = profile_shapes(entry.spec, manifest.plan, stage, *profile)
            dynamic = {k: v for k, v in exact.items() if k not in ("renoise", "level", "t", "dt", "cfg")}
            assert seen.pop(0) == dynamic, (name, stage)
        assert entry.tensorrt_builder is not None and entry.tensorrt_builder["batch_profile"] == list(profile)
        assert [p["stage"] for p in entry.tensorrt_builder["profiles"]] == stages
    assert not seen
    assert fake_builder.network_flags == 1 << 1, "networks must be created strongly typed"
    assert "TF32" not in fake_builder.flags and "FP16" not in fake_builder.flags
    assert fake_builder.workspace == 1 << 28 and fake_builder.hardware is None
    cache = timing_cache_file(cache_dir, FAKE_GPU.name, "9.0", FAKE_VERSION)
    assert cache.read_bytes().startswith(b"timing-cache:"), "the timing cache was not saved"
    assert fake_builder.cache_in and fake_builder.cache_in.startswith(b"timing-cache:"), "...nor reloaded"
    assert not list(target.glob(".*.building")) + list(target.glob(".*.tmp")), "staging files left behind"
    # a second build replaces the plans and removes the old ones after the commit
    fake_builder.flags = {"TF32"}
    tensorrt_build.build_plans_for_dir(
        target, PlanOptions(timing_cache_dir=str(cache_dir), hardware_compatibility="ampere_plus")
    )
    assert fake_builder.hardware == "AMPERE_PLUS"
    again = manifest_io.load(target)
    assert again.raw["tensorrt"]["hardware_compatibility"] == "ampere_plus"
    assert sorted(p.name for p in target.glob("*.plan")) == sorted(e.plan_file or "" for e in again.graphs.values())


def test_fake_build_weakly_typed_option(
    fake_builder: FakeBuilderState, build_cache: BuildCache, tmp_path: Path
) -> None:
    build = build_cache.get(TINY)
    loaded = manifest_io.load(build.dir)
    entry, config = loaded.graphs["decoder"], loaded.plan
    weak_int8 = PlanOptions(strongly_typed=False, weakly_typed_precision="int8")
    record = build_plan(build.dir / entry.file, tmp_path / "d.plan", entry.spec, config, (1, 2, 5), weak_int8)
    assert fake_builder.network_flags == 0 and {"FP16", "INT8"} <= fake_builder.flags
    assert record.options == weak_int8 and record.timing_cache is None
    assert record.manifest_fields()["tensorrt_builder"]["weakly_typed_precision"] == "int8"  # type: ignore[index]
    source, spec = build.dir / entry.file, entry.spec
    with pytest.raises(InvalidRequestError, match="strongly_typed=False"):
        build_plan(source, tmp_path / "e.plan", spec, config, (1, 2, 5), PlanOptions(weakly_typed_precision="fp16"))
    with pytest.raises(InvalidRequestError, match="hardware compatibility"):
        build_plan(source, tmp_path / "e.plan", spec, config, (1, 2, 5), PlanOptions(hardware_compatibility="all"))
    sys.modules["tensorrt"].__version__ = "11.0.0.9"
    with pytest.raises(InvalidRequestError, match="11.0.0.9 builds strongly typed networks only"):
        build_plan(
            source,
            tmp_path / "e.plan",
            spec,
            config,
            (1, 2, 5),
            PlanOptions(strongly_typed=False, weakly_typed_precision="fp16"),
        )


def test_fake_build_failures_show_nodes_and_log(
    fake_builder: FakeBuilderState, build_cache: BuildCache, tmp_path: Path
) -> None:
    build = build_cache.get(TINY)
    loaded = manifest_io.load(build.dir)
    entry, config = loaded.graphs["backbone"], loaded.plan
    fake_builder.fail_parse = True
    with pytest.raises(EngineError) as error:
        build_plan(build.dir / entry.file, tmp_path / "b.plan", entry.spec, config, (1, 2, 5))
    text = str(error.value)
    assert "cannot parse" in text and "node /blocks.0/attn/Softmax (Softmax): unsupported data type" in text
    assert "/blocks.1/attn/Softmax" in text and "ModelImporter.cpp:1234" in text
    fake_builder.fail_parse, fake_builder.fail_build = False, True
    with pytest.raises(EngineError, match=r"failed to build a plan for graph 'backbone'[\s\S]*Error Code 10"):
        build_plan(build.dir / entry.file, tmp_path / "b.plan", entry.spec, config, (1, 2, 5))
    assert not (tmp_path / "b.plan").exists() and not list(tmp_path.iterdir())


# ============================================================================ through the real entry points
@pytest.fixture
def fake_trt(monkeypatch: pytest.MonkeyPatch) -> tuple[ModuleType, FakeCuda]:
    """The fake TensorRT and CUDA driver behind ``build_engines`` and ``Pipeline.from_dir``."""
    import ecar_export.export  # noqa: F401  (torch's exporter first: it probes the `tensorrt` module)

    return install(patch=monkeypatch)


def unnamed_files(out: Path) -> list[str]:
    """Entries of an engine directory that its manifest does not name."""
    named = manifest_io.named_files(json.loads((out / manifest_io.MANIFEST_NAME).read_text()))
    return sorted(set(os.listdir(out)) - named)


def test_unchanged_tensorrt_rebuild_keeps_its_plans(
    fake_trt: tuple[ModuleType, FakeCuda], tmp_path: Path, rng: np.random.Generator
) -> None:
    model, out = engine_model(TINY), tmp_path / "engines"
    build_model(model, out, backend="tensorrt", max_batch=4)
    first = json.loads((out / "manifest.json").read_text())
    build_model(model, out, backend="tensorrt", max_batch=4)
    second = json.loads((out / "manifest.json").read_text())
    assert all(record["reused"] for record in second["graphs"].values())
    plans = {name: record["plan_file"] for name, record in second["graphs"].items()}
    assert plans == {name: record["plan_file"] for name, record in first["graphs"].items()}
    assert all((out / plan).is_file() for plan in plans.values()), "the rebuild deleted its own plans"
    assert unnamed_files(out) == []
    labels, seed = request(rng, model.config.num_classes, 3)
    trt_pipe = Pipeline.from_dir(out, backend="tensorrt")
    assert trt_pipe.backend.name == "tensorrt"
    expected = reference(out).generate(labels, seed=seed)
    got = trt_pipe.generate(labels, seed=seed)
    assert np.array_equal(got.latents, expected.latents) and np.array_equal(got.images, expected.images)


def test_tensorrt_then_onnxruntime_then_tensorrt_builds_each_describe_themselves(
    fake_trt: tuple[ModuleType, FakeCuda], tmp_path: Path, rng: np.random.Generator
) -> None:
    model, out = engine_model(TINY), tmp_path / "engines"
    labels, seed = request(rng, model.config.num_classes, 4)
    expected = None
    for backend in ("tensorrt", "onnxruntime", "tensorrt"):
        build_model(model, out, backend=backend, max_batch=4)
        data = json.loads((out / "manifest.json").read_text())
        assert data["backend"] == backend and ("tensorrt" in data) == (backend == "tensorrt")
        for name, record in data["graphs"].items():
            for key in ("plan_file", "plan_sha256", "tensorrt_builder"):
                assert (key in record) == (backend == "tensorrt"), f"{backend} build, graph {name}: {key}"
        assert unnamed_files(out) == [], backend
        pipe = Pipeline.from_dir(out, backend=backend)
        assert pipe.backend.name == backend
        result = pipe.generate(labels, seed=seed)
        expected = expected if expected is not None else result.images
        assert np.array_equal(result.images, expected), backend


def test_int8_build_for_tensorrt_gives_the_float_graphs_the_fp16_recipe(
    fake_trt: tuple[ModuleType, FakeCuda], tmp_path: Path, rng: np.random.Generator
) -> None:
    """int8 builds keep the flow step float (``int8.FLOAT_KINDS``). TensorRT builds strongly typed networks, so an
    fp32 graph there is an fp32 engine: a build for TensorRT gives the flow step the fp16 recipe, a build for a CPU
    engine keeps it fp32; the backbone is quantized alike in both. The flow step's build key says which, so a
    rebuild for the other engine redoes that graph. The TensorRT build (fake plans over its ONNX graphs) generates
    what the CPU build generates, within the flow head's fp16 rounding."""
    import onnx

    model = engine_model(TINY)
    manifests = {}
    for backend in ("tensorrt", "onnxruntime"):
        build_model(model, tmp_path / backend, backend=backend, precision="int8", max_batch=4, calibration_requests=9)
        manifests[backend] = manifest_io.load(tmp_path / backend)
    for backend, manifest in manifests.items():
        for name, entry in manifest.graphs.items():
            graph = onnx.load(str(manifest.path(entry.file)), load_external_data=False)
            halves = [t.name for t in graph.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16]
            quantized = any(node.op_type == "QuantizeLinear" for node in graph.graph.node)
            if entry.spec.kind == Kind.FLOW_STEP:
                assert not quantized and bool(halves) == (backend == "tensorrt"), (backend, name, len(halves))
                assert ("float_recipe" in entry.builder) == (backend == "tensorrt"), entry.builder
            elif entry.spec.kind == Kind.BACKBONE:
                assert quantized and not halves, (backend, name)
    trt_graphs, cpu_graphs = manifests["tensorrt"].graphs, manifests["onnxruntime"].graphs
    assert trt_graphs["flow_step"].build_key != cpu_graphs["flow_step"].build_key
    assert trt_graphs["backbone"].build_key == cpu_graphs["backbone"].build_key
    labels, seed = request(rng, model.config.num_classes, 3)
    got = Pipeline.from_dir(tmp_path / "tensorrt", backend="tensorrt").generate(labels, seed=seed).latents
    want = reference(tmp_path / "onnxruntime").generate(labels, seed=seed).latents
    assert np.isfinite(got).all()
    cosine = float((got * want).sum() / (np.linalg.norm(got) * np.linalg.norm(want)))
    assert 0.999 <= cosine and not np.array_equal(got, want), cosine


def test_probe_really_starts_tensorrt_and_auto_falls_back_with_one_line(
    monkeypatch: pytest.MonkeyPatch, build_cache: BuildCache, tmp_path: Path
) -> None:
    build = build_cache.get(TINY)
    fake_tensorrt_build(build.dir, tmp_path / "trt")
    import ecar_export.export  # noqa: F401

    install(patch=monkeypatch)
    assert probe(manifest_io.load(tmp_path / "trt")) is None
    trt, _ = install(cuda_fails=True, patch=monkeypatch)  # trt.Runtime(...) raises as TensorRT's bindings do
    reason = probe(manifest_io.load(tmp_path / "trt"))
    assert reason and reason.startswith("TensorRT cannot start CUDA here") and "factory function returned" in reason
    assert trt.engines == [], "probe deserialized a plan"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe = Pipeline.from_dir(tmp_path / "trt", backend="auto")
    fallback = AUTO_CPU_BACKEND
    assert pipe.backend.name == fallback
    messages = [str(w.message) for w in caught if issubclass(w.category, ECARWarning)]
    assert len(messages) == 1 and "\n" not in messages[0], messages
    name = {"openvino": "OpenVINO", "onnxruntime": "ONNX Runtime"}[fallback]
    assert f"using {name} instead: TensorRT cannot start CUDA here" in messages[0]
    with pytest.raises(BackendUnavailableError, match="TensorRT cannot start CUDA here"):
        Pipeline.from_dir(tmp_path / "trt", backend="tensorrt")
    loaded = manifest_io.load(build.dir)
    with pytest.raises(BackendUnavailableError, match="TensorRT cannot start CUDA here"):
        decoder = loaded.graphs["decoder"]
        build_plan(build.dir / decoder.file, tmp_path / "d.plan", decoder.spec, loaded.plan, (1, 2, 5))


def test_timing_cache_from_another_gpu_starts_afresh_and_is_replaced(
    fake_builder: FakeBuilderState, build_cache: BuildCache, tmp_path: Path
) -> None:
    target = tmp_path / "engines"
    shutil.copytree(build_cache.get(TINY).dir, target)
    cache_dir = tmp_path / "shared-cache"
    cache = timing_cache_file(cache_dir, FAKE_GPU.name, "9.0", FAKE_VERSION)
    cache.parent.mkdir()
    cache.write_bytes(b"other-gpu:tactics of an A100")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tensorrt_build.build_plans_for_dir(target, PlanOptions(timing_cache_dir=str(cache_dir)))
    messages = [str(w.message) for w in caught if issubclass(w.category, ECARWarning)]
    assert len(messages) == 1 and "made on another GPU or TensorRT version; starting a fresh one" in messages[0]
    assert fake_builder.cache_refused == [b"other-gpu:tactics of an A100"]
    assert cache.read_bytes().startswith(b"timing-cache:") and b"other-gpu" not in cache.read_bytes()
    assert not list(cache_dir.glob(".*.tmp")), "the cache was not replaced atomically"
    assert manifest_io.load(target).backend == "tensorrt"


def test_a_driver_older_than_tensorrts_cuda_build_is_refused_naming_both() -> None:
    with pytest.raises(BackendUnavailableError) as error:
        loader.check_driver(13, 12080, "10.13.3.9")
    text = str(error.value)
    assert "TensorRT 10.13.3.9 is built for CUDA 13" in text and "supports CUDA 12.8" in text
    assert "R580" in text and "tensorrt-cu12==10.13.3.9" in text
    loader.check_driver(12, 12080, "10.13.3.9")
    loader.check_driver(13, 13000, "10.13.3.9")
    loader.check_driver(None, 11040, "10.13.3.9")  # TensorRT's CUDA build unknown: nothing to compare


def test_tensorrts_cuda_build_is_read_from_its_wheel_family(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.metadata

    def dists(*names: str) -> list[SimpleNamespace]:
        return [SimpleNamespace(name=name) for name in names]

    monkeypatch.setattr(importlib.metadata, "distributions", lambda: dists("numpy", "tensorrt", "tensorrt_cu13_libs"))
    assert loader.tensorrt_cuda_major() == 13
    monkeypatch.setattr(importlib.metadata, "distributions", lambda: dists("tensorrt-cu12", "tensorrt-cu12-bindings"))
    assert loader.tensorrt_cuda_major() == 12
    monkeypatch.setattr(importlib.metadata, "distributions", lambda: dists("numpy", "tensorrt"))
    assert loader.tensorrt_cuda_major() is None


def test_probe_refuses_a_driver_too_old_for_tensorrt(
    monkeypatch: pytest.MonkeyPatch, build_cache: BuildCache, tmp_path: Path
) -> None:
    manifest = fake_tensorrt_build(build_cache.get(TINY).dir, tmp_path / "trt")
    import ecar_export.export  # noqa: F401

    trt, _ = install(patch=monkeypatch)
    monkeypatch.setattr(loader, "tensorrt_cuda_major", lambda: 13)  # a CUDA 13 TensorRT; the fake driver is 12.8
    reason = probe(manifest)
    assert reason and "needs an NVIDIA driver for CUDA 13.0" in reason and "supports CUDA 12.8" in reason
    with pytest.raises(BackendUnavailableError, match="R580"):
        TensorRTBackend(manifest)
    assert trt.engines == []


# ============================================================================ real GPU
def gpu_skip_reason() -> str | None:
    if loader.tensorrt_version() is None:
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
    """runtime.backends.tensorrt.gpu on a real GPU (no TensorRT needed): every call the backend makes."""
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
        labels, seed = request(rng, config_of(manifest).num_classes, batch)
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


# ============================================================ FlowAR through the same builder and backend
@pytest.fixture(scope="module")
def flowar_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An fp32 build of flowar-tiny-cross (cross-attention head, 50 steps, guidance only below t = 0.7; rotary
    tables as stage constants of both graphs), every weight drawn at random, none zero."""
    import torch

    from ecar_export.build import build_engines
    from ecar_export.families.flowar.config import FLOWAR_TINY_CROSS
    from ecar_export.families.flowar.model import FlowAR

    torch.manual_seed(int(np.random.default_rng().integers(1 << 31)))
    model = FlowAR(FLOWAR_TINY_CROSS).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    out = tmp_path_factory.mktemp("flowar-trt") / "fp32"
    build_engines(model, out, max_batch=2)
    return out


def test_fake_build_gives_flowar_graphs_one_profile_per_stage(
    flowar_build: Path, fake_builder: FakeBuilderState, tmp_path: Path
) -> None:
    """The TensorRT builder reads FlowAR's graphs as it reads ECAR's: one plan per graph kind, one profile per stage
    the graph runs at, each at that stage's exact shapes (its token grid, cache rows, rotary tables)."""
    target = tmp_path / "engines"
    shutil.copytree(flowar_build, target)
    path = tensorrt_build.build_plans_for_dir(target, PlanOptions(timing_cache_dir=str(tmp_path / "cache")))
    manifest = manifest_io.load(path.parent)
    assert manifest.backend == "tensorrt" and manifest.model.family == "flowar"
    batches = (manifest.min_batch, manifest.opt_batch, manifest.max_batch)
    seen = list(fake_builder.profiles)
    for name, entry in manifest.graphs.items():
        stages = manifest.plan.graph_stages(entry.spec.kind)
        assert stages == ([manifest.plan.num_stages] if name == "decoder" else list(range(1, 6))), name
        fixed = {t.name for t in entry.spec.inputs if all(isinstance(d, int) for d in t.shape)}
        for stage in stages:
            exact = profile_shapes(entry.spec, manifest.plan, stage, *batches)
            assert seen.pop(0) == {k: v for k, v in exact.items() if k not in fixed}, (name, stage)
        assert entry.tensorrt_builder is not None
        assert [p["stage"] for p in entry.tensorrt_builder["profiles"]] == stages
    assert not seen
    assert fake_builder.network_flags == 1 << 1, "networks must be created strongly typed"


def test_fake_backend_runs_flowar_like_onnxruntime(
    flowar_build: Path, tmp_path: Path, rng: np.random.Generator, fresh_logger: None
) -> None:
    """FlowAR's requests through the TensorRT backend's own binding (host path and device-resident path) give
    exactly ONNX Runtime's latents and images: its stage constants, its fresh noise per stage, its guidance
    threshold (weight one above t = 0.7) are data the backend reads from the build, with no FlowAR code path."""
    manifest = fake_tensorrt_build(flowar_build, tmp_path / "trt")
    ort = reference(flowar_build)
    backend, cuda = fake_backend(manifest)
    host_pipeline = Pipeline(manifest, backend, device_resident=False)
    device_pipeline = Pipeline(manifest, backend)
    for batch in (1, 2):
        labels, seed = request(rng, manifest.model.num_classes, batch)
        where = f"labels={labels} seed={seed}"
        ref = ort.generate(labels, seed=seed, cfg=3.0)
        host = host_pipeline.generate(labels, seed=seed, cfg=3.0)
        assert np.array_equal(host.latents, ref.latents), where
        assert np.array_equal(host.images, ref.images), where
        assert np.array_equal(device_pipeline.generate(labels, seed=seed, cfg=3.0).images, ref.images), where
        device = on_device(backend, labels, seed, cfg=3.0)
        assert np.array_equal(device.latents, ref.latents), where
        assert device.graph_calls == dict(ref.timings.calls), where
    engines = {Path(e.path).name.split("-")[0]: e for e in backend.trt.engines}
    for index, tokens in enumerate(manifest.plan.tokens):  # each stage's profile at its own grid
        assert engines["flow_step"].profiles[index]["head_rope_cos"][1][0] == tokens
    assert cuda.pageable_copies == 0
    backend.close()
    assert not cuda.buffers and not cuda.pinned and cuda.streams == 0
