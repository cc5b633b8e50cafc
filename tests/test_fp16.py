"""The FP16 recipe: fp16 compute, fp32 I/O, fp32 islands where numbers are sensitive."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import BuildCache, needs_demo

from ecar_export import random_inputs
from ecar_export.check import check_build
from ecar_export.evaluate import evaluate
from ecar_export.precision import fp16
from runtime import manifest as manifest_io
from runtime.pipeline import Pipeline

TINY = "tiny-1-2-4"


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _graph(build_dir, name: str) -> onnx.ModelProto:  # type: ignore[no-untyped-def]
    manifest = manifest_io.load(build_dir)
    return onnx.load(str(manifest.path(manifest.graphs[name].file)))


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_recipe_keeps_sensitive_nodes_fp32_and_the_rest_fp16(build_cache: BuildCache) -> None:
    build = build_cache.get(TINY)
    for name in ("flow_step", "backbone"):
        fp32_graph = _graph(build.dir, name)
        kept = set(fp16.fp32_nodes(fp32_graph))
        by_name = {n.name: n for n in fp32_graph.graph.node}
        for node in fp32_graph.graph.node:
            if node.op_type in fp16.FP32_OPS:
                assert node.name in kept, f"{name}: {node.op_type} {node.name} would run in fp16"
        if name == "flow_step":
            # the sinusoid of the time embedding and the Euler update are fp32
            assert {"Cos", "Sin"} <= {by_name[n].op_type for n in kept}
            final = next(n for n in fp32_graph.graph.node if "x_next" in n.output)
            assert final.name in kept
        converted = fp16.convert(fp32_graph)
        # the graph's inputs keep their types: float inputs stay float32 (int64 ones int64)
        assert [i.type.tensor_type.elem_type for i in converted.graph.input] == [
            i.type.tensor_type.elem_type for i in fp32_graph.graph.input
        ]
        assert onnx.TensorProto.FLOAT16 not in {i.type.tensor_type.elem_type for i in converted.graph.input}
        assert all(o.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for o in converted.graph.output)
        # every matrix product outside the fp32 islands reads fp16 weights, every one inside fp32 weights
        dtypes = {i.name: i.data_type for i in converted.graph.initializer}
        products = [n for n in fp32_graph.graph.node if n.op_type in ("MatMul", "Gemm")]
        checked = 0
        for node in products:
            weight = next((i for i in node.input[1:2] if i.endswith("weight")), None)
            if weight is None or weight not in dtypes:
                continue
            expected = onnx.TensorProto.FLOAT if node.name in kept else onnx.TensorProto.FLOAT16
            assert dtypes[weight] == expected, f"{name}: {node.name} reads {weight} as {dtypes[weight]}"
            checked += expected == onnx.TensorProto.FLOAT16
        assert checked >= 3, f"{name}: too few fp16 matrix products"


def test_state_passes_through_in_fp32(build_cache: BuildCache, rng: np.random.Generator) -> None:
    """With dt = 0 the Euler update returns x itself: exact only if x never visits fp16."""
    build = build_cache.get(TINY)
    fp32_graph = _graph(build.dir, "flow_step")
    spec = manifest_io.load(build.dir).graphs["flow_step"].spec
    feeds = random_inputs.for_config(spec, build.model.config, 2, 3, rng, family="ecar")
    feeds["x"] = (feeds["x"] * np.float32(1.2345678)).astype(np.float32)  # values fp16 cannot hold
    feeds["dt"] = np.zeros(1, np.float32)
    (x_next,) = _session(fp16.convert(fp32_graph)).run(["x_next"], feeds)
    np.testing.assert_array_equal(x_next, feeds["x"])
    # and the renoised start state of the backbone equals the fp32 graph's to fp32 rounding, every stage
    bb = _graph(build.dir, "backbone")
    bb_spec = manifest_io.load(build.dir).graphs["backbone"].spec
    converted = _session(fp16.convert(bb))
    for stage in (1, 2, 3):
        bb_feeds = random_inputs.for_config(bb_spec, build.model.config, stage, 3, rng, family="ecar")
        ref = _session(bb).run(["x"], bb_feeds)[0]
        half = converted.run(["x"], bb_feeds)[0]
        np.testing.assert_allclose(half, ref, atol=1e-6, err_msg=f"stage {stage}")


def test_fp16_weights_are_half_the_bytes(build_cache: BuildCache) -> None:
    fp32 = manifest_io.load(build_cache.get(TINY).dir)
    half = manifest_io.load(build_cache.get(TINY, precision="fp16").dir)
    for name in fp32.graphs:
        size32 = sum(fp32.path(f).stat().st_size for f in fp32.graphs[name].data_files)
        size16 = sum(half.path(f).stat().st_size for f in half.graphs[name].data_files)
        assert size16 < 0.8 * size32, (name, size32, size16)  # small graphs keep relatively more fp32 islands
        if name == "backbone":  # the transformer's matrices: fp16, stored as such
            assert 0.45 * size32 <= size16 <= 0.55 * size32, (name, size32, size16)


def test_fp16_build_passes_check(build_cache: BuildCache) -> None:
    build = build_cache.get(TINY, precision="fp16")
    manifest = manifest_io.load(build.dir)
    assert manifest.precision == "fp16"
    assert all(entry.precision == "fp16" for entry in manifest.graphs.values())
    results, _ = check_build(build.dir, build.model)
    assert all(r.ok for r in results), [(r.graph, r.cosine, r.error) for r in results]
    assert min(r.cosine for r in results) >= 0.999


@needs_demo
def test_demo_fp16_quality_matches_fp32(build_cache: BuildCache) -> None:
    """Same yardstick, same seeds: accuracy within 1 point, Fréchet distance within 10 %."""
    fp32 = Pipeline.from_dir(build_cache.get("demo").dir, backend="onnxruntime", device="cpu")
    half = Pipeline.from_dir(build_cache.get("demo", precision="fp16").dir, backend="onnxruntime", device="cpu")

    def sampler(pipe: Pipeline):  # type: ignore[no-untyped-def]
        return lambda labels, seeds: pipe.generate_many(labels, seed=seeds).images

    reference = evaluate(sampler(fp32), per_class=10, seed=5000)
    reduced = evaluate(sampler(half), per_class=10, seed=5000)
    assert abs(reduced.accuracy - reference.accuracy) <= 0.01
    assert reduced.frechet_distance == pytest.approx(reference.frechet_distance, rel=0.10)
    latents32 = fp32.generate([0, 3, 8], seed=11).latents
    latents16 = half.generate([0, 3, 8], seed=11).latents
    assert _cosine(latents32, latents16) >= 0.999
