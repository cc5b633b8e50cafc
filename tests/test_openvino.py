"""The OpenVINO backend: the build's ONNX graphs compiled by OpenVINO for the CPU (optional extra).

Parity is with ONNX Runtime running the same fp32 graphs, on fresh seeds, with the parity tests'
tolerances; half precision and int8 builds run at OpenVINO's half precision and are judged by
the quality yardstick and by cosine. The error-table rows "OpenVINO not installed" and "graph
OpenVINO cannot read" go through the CLI.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import mmap
import os
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from conftest import ENGINE_CONFIGS, BuildCache, demo_checkpoint_present, needs_demo, run_concurrently
from onnx import TensorProto, helper
from typer.testing import CliRunner

from ecar_export import random_inputs
from runtime import manifest as manifest_io
from runtime.backends import selection
from runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
from runtime.backends.openvino_backend import OpenVINOBackend
from runtime.errors import BackendUnavailableError, ECARWarning, EngineError
from runtime.fileio import sha256_file
from runtime.graphs import Call, Kind
from runtime.pipeline import Pipeline

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("openvino") is None, reason="OpenVINO not installed (the 'openvino' extra)"
)
TINY = "tiny-1-2-4"
LATENT_ATOL = 1e-4  # the parity tests' bound
PARITY = [pytest.param((key, False), id=key) for key in sorted(ENGINE_CONFIGS)] + [
    pytest.param(("two-stage-2-6", True), id="two-stage-fused"),
    pytest.param(("demo", False), id="demo", marks=needs_demo),
]


def openvino(build_dir: Path, threads: int | None = None) -> Pipeline:
    return Pipeline.from_dir(build_dir, backend="openvino", threads=threads)


def onnxruntime(build_dir: Path) -> Pipeline:
    return Pipeline.from_dir(build_dir, backend="onnxruntime", device="cpu")


@pytest.mark.parametrize("case", PARITY)
def test_fp32_equals_onnxruntime_on_fresh_seeds(case: tuple[str, bool], build_cache: BuildCache, rng) -> None:  # type: ignore[no-untyped-def]
    build = build_cache.get(*case)
    ov, ort = openvino(build.dir), onnxruntime(build.dir)
    assert ov.backend.name == "openvino" and set(ov.backend.describe()["inference_precision"].values()) == {"f32"}
    config = build.model.config
    for batch in (1, build.max_batch, 2):  # the backbone's shapes change at every stage and batch size
        labels = rng.integers(0, config.num_classes, size=batch).tolist()
        seed = int(rng.integers(0, 2**62))
        got, want = ov.generate(labels, seed=seed), ort.generate(labels, seed=seed)
        where = f"{build.key} labels={labels} seed={seed}"
        assert float(np.std(want.latents)) > 1e-2, where
        assert float(np.max(np.abs(got.latents - want.latents))) <= LATENT_ATOL, where
        assert int(np.abs(got.images.astype(np.int16) - want.images.astype(np.int16)).max()) <= 1, where
        assert dict(got.timings.calls) == dict(want.timings.calls)


def test_a_first_call_with_an_empty_cache_does_not_corrupt_later_shapes(build_cache: BuildCache, rng) -> None:  # type: ignore[no-untyped-def]
    """OpenVINO 2026.4's CPU plugin: an empty first input spoils later shapes; the backend warms up first."""
    build = build_cache.get("rgb-1-3-6-linear-cfg")
    ov = openvino(build.dir)
    ort = OnnxRuntimeBackend(manifest_io.load(build.dir))
    spec = ov.manifest.graphs["backbone"].spec
    for stage in (1, 3, 2, 1, 3):  # stage 1 reads an empty cache; stage 3 is a shape not seen before
        m = ov.manifest
        feeds = random_inputs.call_inputs(spec, m.plan, m.constants, m.model.num_classes, stage, 2, rng)
        call = Call(Kind.BACKBONE, stage)
        for got, want in zip(ov.backend.run(call, feeds), ort.run(call, feeds)):
            assert got.shape == want.shape
            if want.size:
                assert float(np.max(np.abs(got - want))) <= 1e-4, stage


def test_one_pipeline_shared_by_threads_gives_the_sequential_results(build_cache: BuildCache, rng) -> None:  # type: ignore[no-untyped-def]
    build = build_cache.get(TINY)
    pipe = openvino(build.dir)
    jobs = []
    for _ in range(8 * 25):
        batch = int(rng.integers(1, build.max_batch + 1))
        jobs.append((rng.integers(0, 10, size=batch).tolist(), int(rng.integers(0, 2**62))))
    expected = [pipe.generate(labels, seed=seed).images for labels, seed in jobs]
    results = run_concurrently(lambda index: pipe.generate(jobs[index][0], seed=jobs[index][1]).images, len(jobs))
    for index, images in enumerate(expected):
        assert np.array_equal(results[index], images), f"job {index}"


class _Watched:
    """A compiled model whose infer requests count the calls in flight; a release asserts there are none."""

    def __init__(self, compiled: Any, graph: str, in_flight: dict[str, int], log: list[str]) -> None:
        self._compiled, self._graph, self._in_flight, self._log = compiled, graph, in_flight, log
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._compiled, name)

    def create_infer_request(self) -> Any:
        request, watched = self._compiled.create_infer_request(), self

        class Request:
            def __getattr__(self, name: str) -> Any:
                return getattr(request, name)

            def infer(self, feeds: Any) -> Any:
                with watched._lock:
                    watched._in_flight[watched._graph] += 1
                try:
                    return request.infer(feeds)
                finally:
                    with watched._lock:
                        watched._in_flight[watched._graph] -= 1

        return Request()

    def release_memory(self) -> None:
        with self._lock:
            self._log.append(self._graph if self._in_flight[self._graph] == 0 else f"{self._graph} while running")
        self._compiled.release_memory()


def test_idle_graphs_release_their_memory_when_another_runs_never_while_they_run(  # type: ignore[no-untyped-def]
    build_cache: BuildCache, rng, monkeypatch: pytest.MonkeyPatch
) -> None:
    build = build_cache.get(TINY)
    keep = Pipeline(manifest_io.load(build.dir), OpenVINOBackend(manifest_io.load(build.dir), release_idle=False))
    assert openvino(build.dir).backend.describe()["release_idle"] is False  # off by default: it costs speed
    monkeypatch.setenv("ECAR_OPENVINO_RELEASE", "1")
    pipe = openvino(build.dir)
    assert pipe.backend.describe()["release_idle"] is True and keep.backend.describe()["release_idle"] is False
    in_flight = {name: 0 for name in pipe.backend.compiled}
    log: list[str] = []
    for name, compiled in list(pipe.backend.compiled.items()):
        pipe.backend.compiled[name] = _Watched(compiled, name, in_flight, log)
    jobs = []
    for _ in range(60):
        batch = int(rng.integers(1, build.max_batch + 1))
        jobs.append((rng.integers(0, 10, size=batch).tolist(), int(rng.integers(0, 2**62))))
    expected = [keep.generate(labels, seed=seed).latents for labels, seed in jobs]
    for index in (0, 1):  # sequential: each graph is released when another one runs (the decoder: next request)
        assert np.array_equal(pipe.generate(jobs[index][0], seed=jobs[index][1]).latents, expected[index])
    assert set(log) == set(pipe.backend.compiled), log
    log.clear()
    results = run_concurrently(lambda index: pipe.generate(jobs[index][0], seed=jobs[index][1]).latents, len(jobs))
    for index, latents in enumerate(expected):  # releasing between calls changes no result
        assert np.array_equal(results[index], latents), f"job {index}"
    assert log and not [entry for entry in log if "while running" in entry], log


def test_threads_cap_openvino_and_describe_reports_what_ran(build_cache: BuildCache) -> None:
    pipe = openvino(build_cache.get(TINY).dir, threads=1)
    assert {int(c.get_property("INFERENCE_NUM_THREADS")) for c in pipe.backend.compiled.values()} == {1}
    described = pipe.backend.describe()
    assert described["backend"] == "openvino" and described["openvino"] and described["threads"] == 1
    assert isinstance(described["cpu_capabilities"], list) and "FP32" in described["cpu_capabilities"]
    half = openvino(build_cache.get(TINY, precision="fp16").dir).backend
    best = "bf16" if "BF16" in half.capabilities else "f16" if "FP16" in half.capabilities else "f32"
    without_bf16 = "f16" if "FP16" in half.capabilities else "f32"
    entries = manifest_io.load(build_cache.get(TINY, precision="fp16").dir).graphs
    assert not entries["flow_step"].bf16_safe and entries["backbone"].bf16_safe  # ECAR's family.bf16_unsafe
    expected = {name: best if entry.bf16_safe else without_bf16 for name, entry in entries.items()}
    assert half.describe()["inference_precision"] == expected


@needs_demo
@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_reduced_precision_builds_run_close_to_fp32(precision: str, build_cache: BuildCache, rng) -> None:  # type: ignore[no-untyped-def]
    """The trained demo: within 5 % of what the model contributes (the change other labels make at the same
    seed) of ORT fp32. Measured: fp16 builds at bf16 0.7 %, int8 2.1 % (ORT int8: 1.8 %)."""
    reference = onnxruntime(build_cache.get("demo").dir)
    pipe = openvino(build_cache.get("demo", precision=precision).dir)
    labels = rng.integers(0, 10, size=8)
    seed = int(rng.integers(0, 2**62))
    got, want = (
        pipe.generate(labels.tolist(), seed=seed).latents,
        reference.generate(labels.tolist(), seed=seed).latents,
    )
    other = reference.generate(((labels + 5) % 10).tolist(), seed=seed).latents  # same noise, other conditions
    model_effect = float(np.linalg.norm(other - want))
    assert model_effect > 0.2 * float(np.linalg.norm(want)), "the labels barely change the output: vacuous check"
    assert float(np.linalg.norm(got - want)) <= 0.05 * model_effect


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_int8_builds_run_on_openvino_integer_kernels(precision: str, build_cache: BuildCache) -> None:
    """Every Q/DQ-marked MatMul/Gemm of an int8 build is an integer (i8/u8) kernel in OpenVINO's compiled
    graph; an fp32 build has none."""
    build = build_cache.get(TINY, precision=precision)
    pipe = openvino(build.dir)
    for name, entry in pipe.manifest.graphs.items():
        model = onnx.load(str(build.dir / entry.file), load_external_data=False)
        producer = {out: node.op_type for node in model.graph.node for out in node.output}
        marked = sum(
            node.op_type in ("MatMul", "Gemm") and all(producer.get(i) == "DequantizeLinear" for i in node.input[:2])
            for node in model.graph.node
        )
        integer = 0
        for op in pipe.backend.compiled[name].get_runtime_model().get_ops():
            info = op.get_rt_info()
            kind, runs_at = info["layerType"].astype(str), info["runtimePrecision"].astype(str)
            integer += kind in ("FullyConnected", "MatMul") and runs_at in ("i8", "u8")
        assert integer == marked, (name, integer, marked)
        if precision == "int8" and entry.spec.kind == "backbone":
            assert marked > 0, name


def test_int8_builds_for_openvino_keep_the_flow_head_and_convolutions_float(
    build_cache: BuildCache, tmp_path: Path, rng: np.random.Generator
) -> None:
    """An int8 build for OpenVINO quantizes what the ONNX Runtime build quantizes (``int8.op_types_for``,
    judged on whole requests): no convolution and no flow-step product carries Q/DQ; OpenVINO runs the
    backbone's marked products on integer kernels, the flow step (``bf16_unsafe``) at f32, and the images
    stay close to the fp32 build's."""
    from conftest import build_model

    model = build_cache.model(TINY)
    build_model(model, tmp_path, max_batch=2, precision="int8", backend="openvino", calibration_requests=8)
    pipe = openvino(tmp_path)
    assert pipe.manifest.backend == "openvino"
    for name, entry in pipe.manifest.graphs.items():
        graph = onnx.load(str(tmp_path / entry.file), load_external_data=False)
        producer = {out: node.op_type for node in graph.graph.node for out in node.output}
        quantized = [
            n.op_type
            for n in graph.graph.node
            if n.op_type in ("Conv", "MatMul", "Gemm") and producer.get(n.input[1]) == "DequantizeLinear"
        ]
        assert "Conv" not in quantized, name
        assert bool(quantized) == (entry.spec.kind == "backbone"), (name, quantized)
    assert pipe.backend.precision["flow_step"] != "bf16"  # the family keeps ECAR's flow head off bf16
    labels = rng.integers(0, model.config.num_classes, size=2).tolist()
    seed = int(rng.integers(0, 2**62))
    want = onnxruntime(build_cache.get(TINY).dir).generate(labels, seed=seed).images.astype(np.float64)
    got = pipe.generate(labels, seed=seed).images.astype(np.float64)
    cosine = float((got * want).sum() / (np.linalg.norm(got) * np.linalg.norm(want)))
    assert cosine >= 0.99, cosine


def test_auto_picks_the_fastest_installed_cpu_backend(build_cache: BuildCache, monkeypatch: pytest.MonkeyPatch) -> None:
    build = build_cache.get(TINY)
    assert selection.cpu_backend() == "openvino"
    assert Pipeline.from_dir(build.dir).backend.name == "openvino"
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "openvino" else real(name, *a))
    assert Pipeline.from_dir(build.dir).backend.name == "onnxruntime"  # without OpenVINO: ONNX Runtime


def test_auto_goes_on_with_onnxruntime_where_openvino_is_installed_but_broken(
    build_cache: BuildCache, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = tmp_path / "site" / "openvino"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('libopenvino.so.2026.4.1: cannot open shared object file')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(sys.modules, "openvino", raising=False)
    assert selection.cpu_backend() == "openvino"  # installed, as far as the package index can tell
    with pytest.warns(ECARWarning, match=r"using ONNX Runtime instead of OpenVINO: .*cannot open shared object"):
        pipe = Pipeline.from_dir(build_cache.get(TINY).dir)
    assert pipe.backend.name == "onnxruntime"
    with pytest.raises(BackendUnavailableError, match="cannot open shared object"):  # asked for by name: no fallback
        Pipeline.from_dir(build_cache.get(TINY).dir, backend="openvino")


def test_an_unusable_model_cache_directory_is_an_ecar_error(
    build_cache: BuildCache, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("ECAR_OPENVINO_CACHE", str(blocker / "cache"))
    with pytest.raises(BackendUnavailableError, match=r"cannot use '.*a-file/cache' as OpenVINO's model cache"):
        Pipeline.from_dir(build_cache.get(TINY).dir, backend="openvino")


def test_openvino_not_installed(build_cache: BuildCache, monkeypatch: pytest.MonkeyPatch) -> None:
    from runtime.cli import app

    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` raises ImportError
    with pytest.raises(BackendUnavailableError, match=r"OpenVINO is not installed.*'ecar-export\[openvino\]'"):
        Pipeline.from_dir(build_cache.get(TINY).dir, backend="openvino")
    result = CliRunner().invoke(app, ["--engine-dir", str(build_cache.get(TINY).dir), "--backend", "openvino"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    text = " ".join(result.output.split())
    assert "error: OpenVINO is not installed here" in text and "pip install 'ecar-export[openvino]'" in text


def _unreadable_decoder(engines: Path) -> None:
    """Replace the decoder by a valid ONNX graph of an op OpenVINO does not know, its sha256 updated."""
    data = json.loads((engines / "manifest.json").read_text())
    record = data["graphs"]["decoder"]
    spec = manifest_io.load(engines, verify_files=False).graphs["decoder"].spec
    node = helper.make_node("Mystery", ["x"], ["image"], domain="com.example")
    graph = helper.make_graph(
        [node],
        "decoder",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(spec.inputs[0].shape))],
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, list(spec.outputs[0].shape))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.example", 1)])
    path = engines / record["file"]
    onnx.save_model(model, str(path))
    record["sha256"] = sha256_file(path)
    manifest_io.write(engines, data)


def test_a_graph_openvino_cannot_read(build_cache: BuildCache, tmp_path: Path) -> None:
    from runtime.cli import app

    engines = shutil.copytree(build_cache.get(TINY).dir, tmp_path / "engines")
    _unreadable_decoder(engines)
    with pytest.raises(EngineError, match=r"OpenVINO .* cannot read or compile graph 'decoder' from '.*decoder-"):
        Pipeline.from_dir(engines, backend="openvino")
    result = CliRunner().invoke(app, ["--engine-dir", str(engines), "--backend", "openvino", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "cannot read or compile graph 'decoder'" in " ".join(result.output.split())


def test_build_for_openvino_compiles_every_graph_and_check_runs_on_it(build_cache: BuildCache, tmp_path: Path) -> None:
    from conftest import build_model

    from ecar_export.check import check_build

    model = build_cache.model(TINY)
    build_model(model, tmp_path / "engines", backend="openvino", max_batch=3)
    manifest = manifest_io.load(tmp_path / "engines")
    assert manifest.backend == "openvino"
    assert Pipeline.from_dir(tmp_path / "engines").backend.name == "openvino"
    results, _ = check_build(tmp_path / "engines", model, backend="openvino")
    assert results and all(r.ok for r in results), [(r.graph, r.stage, r.cosine, r.error) for r in results]


@needs_demo
@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_demo_quality_on_openvino_matches_fp32(precision: str, build_cache: BuildCache) -> None:
    """The yardstick, same seeds: accuracy within 1 point and Fréchet distance within 10 % of fp32."""
    from ecar_export.evaluate import evaluate

    def sampler(pipe: Pipeline):  # type: ignore[no-untyped-def]
        return lambda labels, seeds: pipe.generate_many(labels, seed=seeds).images

    reference = evaluate(sampler(onnxruntime(build_cache.get("demo").dir)), per_class=10, seed=9000)
    result = evaluate(sampler(openvino(build_cache.get("demo", precision=precision).dir)), per_class=10, seed=9000)
    assert abs(result.accuracy - reference.accuracy) <= 0.01
    assert result.frechet_distance == pytest.approx(reference.frechet_distance, rel=0.10)


@needs_demo
def test_eval_runs_an_engine_directory_on_the_backend_it_is_asked_for(build_cache: BuildCache) -> None:
    from ecar_export.cli import app

    engines = str(build_cache.get("demo").dir)
    results = {}
    for backend in ("openvino", "onnxruntime"):
        done = CliRunner().invoke(
            app, ["eval", "--engine-dir", engines, "--backend", backend, "--per-class", "2", "--json"]
        )
        assert done.exit_code == 0, done.output
        payload = json.loads(done.stdout)
        assert f"({backend}, fp32)" in payload["source"], payload["source"]
        results[backend] = payload
    assert results["openvino"]["accuracy"] == pytest.approx(results["onnxruntime"]["accuracy"], abs=0.05)
    refused = CliRunner().invoke(app, ["eval", "--backend", "openvino", "--per-class", "1"])
    assert refused.exit_code != 0 and "--backend applies to --engine-dir only" in refused.output


def _resident_kb_of(files: set[str]) -> list[int]:
    """Resident kB of each of this process's mappings of ``files`` (from /proc/self/smaps)."""
    sizes, current = [], None
    with open("/proc/self/smaps", "rb") as handle:
        for line in handle:
            fields = line.split(maxsplit=5)
            if b"-" in fields[0] and len(fields) >= 5 and b":" in fields[3]:  # a mapping's header line
                path = fields[5].rstrip(b"\n").removesuffix(b" (deleted)") if len(fields) > 5 else b""
                current = os.fsdecode(path)
            elif fields[0] == b"Rss:" and current in files:
                sizes.append(int(fields[1]))
    return sizes


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux's /proc/self/smaps")
def test_the_page_dropper_hands_back_read_only_mappings_of_its_files_only(tmp_path: Path) -> None:
    from runtime.backends.openvino_backend import _mapped_pages_dropper

    pages = 64
    contents = {
        name: os.urandom(pages * mmap.PAGESIZE) for name in ("weights a.bin", "gone.bin", "written.bin", "other")
    }
    for name, data in contents.items():  # written to disk, as builds write weights: a dirty page is not paged out
        with open(tmp_path / name, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    maps = {}
    for name in contents:
        with open(tmp_path / name, "r+b") as handle:
            access = mmap.ACCESS_WRITE if name == "written.bin" else mmap.ACCESS_READ
            maps[name] = mmap.mmap(handle.fileno(), 0, access=access)
        assert sum(maps[name][i * mmap.PAGESIZE] for i in range(pages)) >= 0  # every page read: resident
    paths = {name: str((tmp_path / name).resolve()) for name in contents}
    (tmp_path / "gone.bin").unlink()  # replaced under a running server: the mapping reads "... (deleted)"
    resident = {name: sum(_resident_kb_of({path})) for name, path in paths.items()}
    assert all(kb > 0 for kb in resident.values()), resident
    drop = _mapped_pages_dropper({paths["weights a.bin"], paths["gone.bin"], paths["written.bin"]})
    for _ in range(20):  # MADV_PAGEOUT is best effort: a page still in a per-CPU LRU batch waits for a later call
        drop()
        after = {name: sum(_resident_kb_of({path})) for name, path in paths.items()}
        if after["weights a.bin"] == 0 and after["gone.bin"] == 0:
            break
        time.sleep(0.05)
    assert after["weights a.bin"] == 0 and after["gone.bin"] == 0, after  # a space in the name, a deleted file
    assert after["written.bin"] == resident["written.bin"], after  # never a writable mapping
    assert after["other"] == resident["other"], after  # never a file it was not given
    for name, data in contents.items():  # read again from the files: nothing lost
        assert maps[name][:] == data, name
        maps[name].close()


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux's /proc/self/smaps")
def test_mapped_weights_pages_are_handed_back_and_results_stay(  # type: ignore[no-untyped-def]
    build_cache: BuildCache, rng, monkeypatch: pytest.MonkeyPatch
) -> None:
    from runtime.backends import openvino_backend

    build = build_cache.get("demo" if demo_checkpoint_present() else TINY)
    manifest = manifest_io.load(build.dir)
    files = {str((build.dir / f).resolve()) for entry in manifest.graphs.values() for f in entry.data_files}
    labels = rng.integers(0, manifest.model.num_classes, size=build.max_batch).tolist()
    seed = int(rng.integers(0, 2**62))
    with monkeypatch.context() as patch:  # OpenVINO as it behaves by itself: its reads of the files stay resident
        patch.setattr(openvino_backend, "_mapped_pages_dropper", lambda files: lambda: None)
        keeping = Pipeline(manifest, OpenVINOBackend(manifest))
    expected = keeping.generate(labels, seed=seed).latents
    assert sum(_resident_kb_of(files)) > 0, "OpenVINO no longer maps the weights files: the release is moot"
    del keeping  # its mappings go with it (pages another mapping shares are never paged out)
    gc.collect()
    assert not _resident_kb_of(files), "a backend's mappings outlived it"
    dropping = Pipeline(manifest, OpenVINOBackend(manifest))  # hands back every page of the files it reads
    limit = 0.1 * sum(os.path.getsize(f) for f in files) / 1024  # kB: best effort (see the dropper's test)
    assert _resident_kb_of(files) and sum(_resident_kb_of(files)) <= limit  # after compiling
    for _ in range(2):  # after calls at new shapes; read again from the file where needed: the same numbers
        assert np.array_equal(dropping.generate(labels, seed=seed).latents, expected)
        assert sum(_resident_kb_of(files)) <= limit
