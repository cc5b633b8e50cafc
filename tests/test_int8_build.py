"""`ecar-export build --precision int8`: calibrated Q/DQ graphs, checked on held-out stage inputs."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import onnx
import pytest
from conftest import BuildCache, needs_demo

from ecar_export import precision
from ecar_export.check import check_build
from ecar_export.evaluate import evaluate
from ecar_export.precision import int8, qdq
from runtime import manifest as manifest_io
from runtime.graphs import Kind
from runtime.pipeline import Pipeline

TINY = "tiny-1-2-4"


def test_int8_build_is_calibrated_checked_and_keeps_its_calibration(build_cache: BuildCache) -> None:
    build = build_cache.get(TINY, precision="int8")
    manifest = manifest_io.load(build.dir)
    assert manifest.precision == "int8"
    assert manifest.calibration is not None and manifest.calibration.method == "minmax"
    assert (build.dir / "calibration" / "calibration.json").is_file()
    for name, entry in manifest.graphs.items():
        graph = onnx.load(str(manifest.path(entry.file)))
        if entry.spec.kind in int8.FLOAT_KINDS:  # the flow head stays float: its error accumulates over steps
            assert not any(n.op_type in qdq.QDQ_OPS for n in graph.graph.node), name
            assert entry.builder["qdq_nodes"] == 0 and entry.builder["quantized_op_types"] == [], entry.builder
            continue
        if entry.spec.kind == Kind.BACKBONE:
            records = qdq.check_qdq(graph)  # raises unless symmetric int8 with per-channel weights
            assert records, f"{name} has no Q/DQ pairs"
        assert not any(
            n.op_type == "Conv" and n.input[1] not in {i.name for i in graph.graph.initializer}
            for n in graph.graph.node
        ), f"{name}: convolutions stay float"
        cosines = entry.builder["held_out_cosine"]
        assert min(cosines.values()) >= 0.99, (name, cosines)
        # the decoder (a 250 GFLOP call at 256²) is calibrated on a spread of 16 batches, the rest on every one
        wanted = int8.CALIBRATION_BATCHES[Kind.DECODER] if entry.spec.kind == Kind.DECODER else "all"
        assert entry.builder["calibration_batches"] == wanted, (name, entry.builder)
    results, _ = check_build(build.dir, build.model)
    assert all(r.ok for r in results), [(r.graph, r.cosine, r.error) for r in results]
    assert {r.inputs for r in results} == {"held-out"}


def test_fused_int8_build_keeps_the_loop_body_float(build_cache: BuildCache, tmp_path: Path) -> None:
    """--fuse-flow-loop with int8: the Loop's body is the flow step, float as in the unfused int8 build
    (``int8.FLOAT_KINDS``), the build passes check and both builds draw the same latents."""
    from conftest import build_model

    model = build_cache.model(TINY)
    build_model(model, tmp_path / "fused", max_batch=3, precision="int8", fuse_flow_loop=True)
    manifest = manifest_io.load(tmp_path / "fused")
    loop = onnx.load(str(manifest.path(manifest.graphs["flow_loop"].file)))
    (node,) = [n for n in loop.graph.node if n.op_type == "Loop"]
    body = next(a.g for a in node.attribute if a.name == "body")
    assert any(n.op_type in ("MatMul", "Gemm") for n in body.node), sorted({n.op_type for n in body.node})
    assert not any(n.op_type in qdq.QDQ_OPS for n in body.node), "the loop body stays float"
    results, _ = check_build(tmp_path / "fused", model)
    assert all(r.ok for r in results), [(r.graph, r.stage, r.cosine, r.error) for r in results]
    assert {r.inputs for r in results} == {"held-out"}
    unfused = Pipeline.from_dir(build_cache.get(TINY, precision="int8").dir, backend="onnxruntime", device="cpu")
    fused = Pipeline.from_dir(tmp_path / "fused", backend="onnxruntime", device="cpu")
    a, b = unfused.generate([1, 2, 3], seed=4), fused.generate([1, 2, 3], seed=4)
    assert float(abs(a.latents - b.latents).max()) <= 1e-4  # the same steps, chained in the graph


@needs_demo
def test_demo_int8_quality_within_bounds(build_cache: BuildCache) -> None:
    """Same yardstick, same seeds: accuracy within 3 points, Fréchet distance within 25 % of fp32."""
    fp32 = Pipeline.from_dir(build_cache.get("demo").dir, backend="onnxruntime", device="cpu")
    quantized = Pipeline.from_dir(build_cache.get("demo", precision="int8").dir, backend="onnxruntime", device="cpu")

    def sampler(pipe: Pipeline):  # type: ignore[no-untyped-def]
        return lambda labels, seeds: pipe.generate_many(labels, seed=seeds).images

    reference = evaluate(sampler(fp32), per_class=10, seed=7000)
    result = evaluate(sampler(quantized), per_class=10, seed=7000)
    assert abs(result.accuracy - reference.accuracy) <= 0.03
    assert result.frechet_distance == pytest.approx(reference.frechet_distance, rel=0.25)


def test_same_plan_and_seed_give_the_same_int8_graph_bytes(build_cache: BuildCache, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A second, independent int8 build of the same weights writes byte-identical graphs."""
    from conftest import build_model

    first = manifest_io.load(build_cache.get(TINY, precision="int8").dir)
    build_model(build_cache.model(TINY), tmp_path / "again", max_batch=first.max_batch, precision="int8")
    again = manifest_io.load(tmp_path / "again")
    assert {n: e.sha256 for n, e in again.graphs.items()} == {n: e.sha256 for n, e in first.graphs.items()}


class _CaptureCalled(Exception):
    pass


def test_rebuild_after_a_recipe_change_requantizes_from_the_kept_calibration(
    build_cache: BuildCache, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The capture (an hour for ecar-b) is redone only when what it recorded could differ."""
    from conftest import build_model

    import calibration

    first = build_cache.get(TINY, precision="int8")
    out = tmp_path / "engines"
    shutil.copytree(first.dir, out)
    kept = (out / "calibration" / "calibration.json").read_bytes()

    def no_capture(*args: object, **kwargs: object) -> None:
        raise _CaptureCalled

    monkeypatch.setattr(calibration, "capture", no_capture)
    int8 = precision.PRECISIONS["int8"]
    monkeypatch.setitem(precision.PRECISIONS, "int8", dataclasses.replace(int8, recipe_version=int8.recipe_version + 1))
    build_model(first.model, out, max_batch=first.max_batch, precision="int8")
    again = manifest_io.load(out)
    assert again.calibration is not None and again.calibration.reused
    assert not any(entry.reused for entry in again.graphs.values()), "a recipe change rebuilds every graph"
    before = manifest_io.load(first.dir)
    assert {n: e.sha256 for n, e in again.graphs.items()} == {n: e.sha256 for n, e in before.graphs.items()}
    assert (out / "calibration" / "calibration.json").read_bytes() == kept
    results, _ = check_build(out, first.model)
    assert all(r.ok for r in results) and {r.inputs for r in results} == {"held-out"}
    # nothing changed: every graph and the calibration set are kept as they are
    build_model(first.model, out, max_batch=first.max_batch, precision="int8")
    unchanged = manifest_io.load(out)
    assert all(entry.reused for entry in unchanged.graphs.values())
    assert unchanged.calibration is not None and unchanged.calibration.reused
    assert (out / "calibration" / "calibration.json").read_bytes() == kept
    # one graph's key changes (the decoder's calibration cap) and the kept set still serves: only that graph is
    # quantized again (ecar-b's backbone alone takes minutes)
    monkeypatch.setitem(precision.int8.CALIBRATION_BATCHES, Kind.DECODER, 1)
    build_model(first.model, out, max_batch=first.max_batch, precision="int8")
    one = manifest_io.load(out)
    assert {name: entry.reused for name, entry in one.graphs.items()} == {
        name: name != "decoder" for name in one.graphs
    }
    assert one.calibration is not None and one.calibration.reused
    results, _ = check_build(out, first.model)
    assert all(r.ok for r in results), [(r.graph, r.cosine, r.error) for r in results]
    # a different plan, --force, or a calibration set that fails its checksums (even with every
    # graph unchanged): capture again
    with pytest.raises(_CaptureCalled):
        build_model(first.model, out, max_batch=first.max_batch, precision="int8", calibration_requests=65)
    with pytest.raises(_CaptureCalled):
        build_model(first.model, out, max_batch=first.max_batch, precision="int8", force=True)
    damaged = next((out / "calibration").glob("backbone-*.npz"))
    damaged.write_bytes(damaged.read_bytes()[:-1] + b"x")
    with pytest.raises(_CaptureCalled):
        build_model(first.model, out, max_batch=first.max_batch, precision="int8")


def test_an_openvino_int8_build_keeps_reusing_its_calibration(
    build_cache: BuildCache, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A build for OpenVINO records OpenVINO's version beside the export tools; its rebuild must still find its
    kept set (the capture runs on ONNX Runtime whatever the target; ecar-b's takes two hours)."""
    pytest.importorskip("openvino")
    from conftest import build_model

    import calibration

    first = build_cache.get(TINY, precision="int8")
    out = tmp_path / "engines"
    shutil.copytree(first.dir, out)

    def no_capture(*args: object, **kwargs: object) -> None:
        raise _CaptureCalled

    monkeypatch.setattr(calibration, "capture", no_capture)
    for _ in range(2):  # from the ONNX Runtime build's set, then from the OpenVINO build's own
        build_model(first.model, out, max_batch=first.max_batch, precision="int8", backend="openvino")
        manifest = manifest_io.load(out)
        assert manifest.backend == "openvino" and "openvino" in manifest.toolchain
        assert manifest.calibration is not None and manifest.calibration.reused


def test_fp16_build_checked_on_held_out_calibration_inputs(build_cache: BuildCache) -> None:
    """`ecar-export check --calibration DIR`: an fp16 build judged on an int8 build's held-out stage inputs."""
    calibration = build_cache.get(TINY, precision="int8").dir / "calibration"
    half = build_cache.get(TINY, precision="fp16")
    results, _ = check_build(half.dir, half.model, calibration_dir=calibration)
    assert {r.inputs for r in results} == {"held-out"}
    assert all(r.ok for r in results) and min(r.cosine for r in results) >= 0.999
