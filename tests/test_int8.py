"""The INT8 recipe (DESIGN §4): explicit symmetric Q/DQ graphs calibrated on captured stage inputs.

The demo model's fp32 build is captured once with the default plan (64 requests of 8, every
8th request held out) and every graph is quantized once with minmax calibration; the
module's tests share that work. Accuracy is judged on the held-out requests only.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import BuildCache, needs_demo
from onnx import TensorProto, numpy_helper

from calibration import CalibrationPlan, CalibrationSet, capture
from calibration.readers import FeedList, GraphReader, held_out_feeds
from ecar_export.families.ecar.contract import config_of
from ecar_export.precision import fp16, int8, qdq
from runtime import manifest as manifest_io
from runtime.backends.onnxruntime_backend import OnnxRuntimeBackend, disabled_optimizers, session_options
from runtime.fileio import sha256_file
from runtime.pipeline import Pipeline

pytestmark = needs_demo

MIN_COSINE = 0.99
COMPUTE_OPS = ("MatMul", "Gemm", "Conv")


@dataclass
class Quantized:
    build_dir: Path
    pipeline: Pipeline
    calibration: CalibrationSet
    fp32: dict[str, onnx.ModelProto]
    int8: dict[str, onnx.ModelProto]


@pytest.fixture(scope="module")
def demo(build_cache: BuildCache, tmp_path_factory: pytest.TempPathFactory) -> Quantized:
    build = build_cache.get("demo")
    manifest = manifest_io.load(build.dir)
    pipeline = Pipeline(manifest, OnnxRuntimeBackend(manifest, threads=1))
    plan = CalibrationPlan.for_config(config_of(manifest))  # the default plan: 64 requests of 8
    calibration = capture(pipeline, plan, tmp_path_factory.mktemp("demo-calibration"))
    fp32 = {name: onnx.load(str(manifest.path(entry.file))) for name, entry in manifest.graphs.items()}
    quantized = {name: int8.quantize(model, GraphReader(calibration, name), threads=1) for name, model in fp32.items()}
    return Quantized(build.dir, pipeline, calibration, fp32, quantized)


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), sess_options=options, providers=["CPUExecutionProvider"])


def _constants(model: onnx.ModelProto) -> dict[str, TensorProto]:
    return {init.name: init for init in model.graph.initializer}


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _held_out_outputs(
    demo: Quantized, name: str, model: onnx.ModelProto
) -> tuple[list[dict[str, np.ndarray]], list[list[np.ndarray]]]:
    feeds = held_out_feeds(demo.calibration, name)
    session = _session(model)
    return feeds, [session.run(None, feed) for feed in feeds]


# ------------------------------------------------------------------------------ graph form
def test_qdq_pairs_are_int8_with_zero_point_0_and_per_channel_weights(demo: Quantized) -> None:
    """Read straight from the graphs, independently of ``qdq_summary``."""
    for name, model in demo.int8.items():
        constants = _constants(model)
        consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in model.graph.node:
            for tensor in node.input:
                consumers.setdefault(tensor, []).append(node)
        pairs = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
        for node in pairs:
            where = f"{name}: {node.op_type} {node.name}"
            assert len(node.input) == 3, f"{where}: zero point must be explicit"
            zero, scale = constants[node.input[2]], constants[node.input[1]]
            assert zero.data_type == TensorProto.INT8, f"{where}: zero point is not int8"
            assert not np.any(numpy_helper.to_array(zero)), f"{where}: zero point is not 0"
            assert scale.data_type == TensorProto.FLOAT and np.all(numpy_helper.to_array(scale) > 0)
            axis = [a.i for a in node.attribute if a.name == "axis"]
            if node.op_type == "DequantizeLinear" and node.input[0] in constants:  # a stored weight
                weight = constants[node.input[0]]
                assert weight.data_type == TensorProto.INT8, f"{where}: weight is not int8"
                assert len(axis) == 1 and len(scale.dims) == 1, f"{where}: weight scale is not per-channel"
                assert scale.dims[0] == weight.dims[axis[0]], f"{where}: one scale per output channel"
                assert {c.op_type for c in consumers[node.output[0]]} <= set(COMPUTE_OPS)
            else:  # activations: one scale per tensor
                assert len(scale.dims) == 0, f"{where}: activation scale must be per-tensor"
            if node.op_type == "QuantizeLinear":  # every Q is half of a Q/DQ pair with the same parameters
                (pair,) = consumers[node.output[0]]
                assert pair.op_type == "DequantizeLinear" and list(pair.input[1:]) == list(node.input[1:]), where
        summary = qdq.check_qdq(model)
        assert len(summary) == len(pairs)
        assert sum(r.role == "weight" for r in summary) == sum(
            n.op_type == "DequantizeLinear" and n.input[0] in constants for n in pairs
        )


def test_every_backbone_and_flow_step_runs_its_matrix_products_in_int8(demo: Quantized) -> None:
    for name, model in demo.int8.items():
        fp32 = demo.fp32[name]
        dequantized = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
        fed = {n.name: [i in dequantized for i in n.input] for n in model.graph.node}
        quantized = [n.name for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and all(fed[n.name][:2])]
        if name == "decoder":
            assert not dequantized, "the decoder stays fp32 by default (no MatMul/Gemm; Conv is opt-in)"
            continue
        assert quantized, f"{name}: no MatMul/Gemm runs in INT8"
        assert sorted(quantized) == sorted(qdq.quantized_nodes(model))
        kept = set(fp16.fp32_nodes(fp32))
        constants = set(_constants(fp32))
        for node in fp32.graph.node:  # fp32 names: quantization rewires the inputs, not the nodes
            if node.op_type in ("LayerNormalization", "Softmax") or node.name in kept:
                assert not any(fed[node.name]), f"{name}: {node.op_type} {node.name} must stay float"
            if node.op_type == "MatMul" and not any(i in constants for i in node.input):
                assert not any(fed[node.name]), f"{name}: attention product {node.name} must stay float"
        # the interface is untouched: float32 in, float32 out, same names
        assert [(i.name, i.type.tensor_type.elem_type) for i in model.graph.input] == [
            (i.name, i.type.tensor_type.elem_type) for i in fp32.graph.input
        ]
        assert [(o.name, o.type.tensor_type.elem_type) for o in model.graph.output] == [
            (o.name, o.type.tensor_type.elem_type) for o in fp32.graph.output
        ]
    flow = demo.int8["flow_step"]
    assert len(qdq.quantized_nodes(flow)) >= 10, "the flow head's MLP and modulation run in INT8"


INTEGER_KERNELS = {"QGemm": 2, "MatMulIntegerToFloat": 4, "QLinearMatMul": 2}  # op -> input index of A's zero point


def _ort_optimized(model: onnx.ModelProto, path: Path, disabled: list[str]) -> onnx.ModelProto:
    """The graph as ORT's CPU provider runs it, with the runtime's session options."""
    options = session_options(threads=1)
    options.optimized_model_filepath = str(path)
    ort.InferenceSession(
        model.SerializeToString(),
        sess_options=options,
        providers=["CPUExecutionProvider"],
        disabled_optimizers=disabled or None,
    )
    return onnx.load(str(path))


def _integer_kernels(model: onnx.ModelProto) -> list[tuple[str, int]]:
    """(op type, element type of the activation's zero point) of every integer matrix kernel."""
    constants = _constants(model)
    found = []
    for node in model.graph.node:
        if node.op_type in INTEGER_KERNELS:
            found.append((node.op_type, constants[node.input[INTEGER_KERNELS[node.op_type]]].data_type))
    return found


def test_on_ort_cpu_every_quantized_product_is_an_integer_kernel_on_uint8(demo: Quantized, tmp_path: Path) -> None:
    """What makes INT8 pay on CPU: no weight is dequantized per call, no product runs int8 x int8.

    With the runtime's settings (``disabled_optimizers("int8")``) ORT fuses every Q/DQ'd
    MatMul/Gemm into an integer kernel and runs each one on uint8 activations (its fast
    u8 x s8 path; the symmetric int8 pair is shifted by 128, exactly). A float bias left on a
    Gemm (``split_gemm_bias`` moves it) or a Q/DQ pair shared by several Gemms (merged back
    by CSE) breaks one or the other.
    """
    assert disabled_optimizers("int8") == ["CommonSubexpressionElimination"]
    assert disabled_optimizers("fp32") == [] and disabled_optimizers("fp16") == []
    for name, model in demo.int8.items():
        if name == "decoder":
            continue
        optimized = _ort_optimized(model, tmp_path / f"{name}.onnx", disabled_optimizers("int8"))
        left = [n.name for n in optimized.graph.node if n.op_type == "DequantizeLinear"]
        assert not left, f"{name}: ORT dequantizes at run time instead of fusing: {left}"
        kernels = _integer_kernels(optimized)
        assert len(kernels) == len(qdq.quantized_nodes(model)), f"{name}: {kernels}"
        signed = [op for op, dtype in kernels if dtype != TensorProto.UINT8]
        assert not signed, f"{name}: {len(signed)} integer kernels read int8 activations ({signed})"
    # why CSE is off: with it, the flow head's modulation Gemms share one merged int8 pair again
    merged = _ort_optimized(demo.int8["flow_step"], tmp_path / "flow_step_cse.onnx", [])
    assert any(dtype == TensorProto.INT8 for _, dtype in _integer_kernels(merged))


def test_split_gemm_bias_keeps_the_function(rng: np.random.Generator) -> None:
    x = onnx.helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, 6])
    y = onnx.helper.make_tensor_value_info("y", TensorProto.FLOAT, [5, 3])
    w = numpy_helper.from_array(rng.standard_normal((3, 6)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal(3).astype(np.float32), "b")
    gemms = [
        onnx.helper.make_node("Gemm", ["x", "w", "b"], ["h"], name="biased", transB=1),
        onnx.helper.make_node("Gemm", ["x", "w", "b"], ["k"], name="scaled", transB=1, beta=0.5),
        onnx.helper.make_node("Gemm", ["x", "w"], ["m"], name="plain", transB=1),
    ]
    tail = [onnx.helper.make_node("Sum", ["h", "k", "m"], ["y"], name="sum")]
    graph = onnx.helper.make_graph(gemms + tail, "g", [x], [y], [w, b])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)])
    split = onnx.ModelProto()
    split.CopyFrom(model)
    int8.split_gemm_bias(split, ["biased", "scaled", "plain", "sum"])
    onnx.checker.check_model(split, full_check=True)
    ops = {n.name: (n.op_type, list(n.input)) for n in split.graph.node}
    assert ops["biased"] == ("Gemm", ["x", "w"]) and ops["biased_bias"][0] == "Add"
    assert ops["scaled"] == ("Gemm", ["x", "w", "b"]), "beta != 1 is left alone"
    assert "plain_bias" not in ops and "scaled_bias" not in ops
    feed = {"x": rng.standard_normal((5, 6)).astype(np.float32)}
    (expected,) = _session(model).run(None, feed)
    (actual,) = _session(split).run(None, feed)
    np.testing.assert_allclose(actual, expected, rtol=1e-6, atol=1e-6)


def test_quantized_graphs_pass_the_checker_and_run_on_ort_cpu(demo: Quantized) -> None:
    for name, model in demo.int8.items():
        onnx.checker.check_model(model, full_check=True)
        session = _session(model)
        assert session.get_providers() == ["CPUExecutionProvider"]
        for feed in demo.calibration.feeds(name, "held_out", batch_rows=1000):  # every stage
            for value in session.run(None, feed):
                assert value.dtype == np.float32 and np.all(np.isfinite(value))
        assert {p.key: p.value for p in model.metadata_props}["ecar.precision"] == "int8"


# ---------------------------------------------------------------------------------- accuracy
def test_minmax_graphs_match_fp32_on_held_out_inputs(demo: Quantized) -> None:
    worst: dict[str, float] = {}
    for name in demo.int8:
        feeds, reference = _held_out_outputs(demo, name, demo.fp32[name])
        _, actual = _held_out_outputs(demo, name, demo.int8[name])
        for index, output in enumerate(demo.fp32[name].graph.output):
            ref = np.concatenate([r[index].ravel() for r in reference])
            act = np.concatenate([a[index].ravel() for a in actual])
            worst[f"{name}.{output.name}"] = _cosine(ref, act)
        if name == "flow_step":  # stricter: the update dt·u alone, without the state x it is added to
            ref_update = np.concatenate([(r[0] - f["x"]).ravel() for r, f in zip(reference, feeds)])
            act_update = np.concatenate([(a[0] - f["x"]).ravel() for a, f in zip(actual, feeds)])
            worst["flow_step.update"] = _cosine(ref_update, act_update)
        if name == "decoder":
            for ref, act in zip(reference, actual):
                np.testing.assert_array_equal(ref[0], act[0])
    failing = {k: v for k, v in worst.items() if not v >= MIN_COSINE}
    assert not failing, f"cosine below {MIN_COSINE}: {failing}"
    # the agreement helper reports the same numbers
    report = qdq.compare_graphs(
        demo.fp32["backbone"], demo.int8["backbone"], held_out_feeds(demo.calibration, "backbone")
    )
    assert report["z"].cosine == pytest.approx(worst["backbone.z"], abs=1e-9) and report["z"].max_abs > 0
    # the one backbone serves every stage: each stage's held-out inputs agree on their own
    for group in demo.calibration.groups("backbone"):
        feeds = list(demo.calibration.feeds("backbone", "held_out", group=group))
        per_stage = qdq.compare_graphs(demo.fp32["backbone"], demo.int8["backbone"], feeds)
        assert per_stage["z"].cosine >= MIN_COSINE and per_stage["x"].cosine >= MIN_COSINE, group


def test_entropy_and_percentile_calibration(demo: Quantized) -> None:
    name = "flow_step"
    minmax_scales = _activation_scales(demo.int8[name])
    for method in ("entropy", "percentile"):
        model = int8.quantize(demo.fp32[name], GraphReader(demo.calibration, name), method, threads=1)
        qdq.check_qdq(model)
        report = qdq.compare_graphs(demo.fp32[name], model, held_out_feeds(demo.calibration, name))
        assert report["x_next"].cosine >= MIN_COSINE, f"{method}: {report}"
        scales = _activation_scales(model)
        assert scales.keys() == minmax_scales.keys()
        # histogram methods clip outliers: never a wider range than minmax, somewhere a narrower one
        assert all(scales[k] <= minmax_scales[k] * 1.01 for k in scales), method
        assert any(scales[k] < 0.99 * minmax_scales[k] for k in scales), f"{method} equals minmax"


def _activation_scales(model: onnx.ModelProto) -> dict[str, float]:
    constants = _constants(model)
    return {
        node.input[0]: float(numpy_helper.to_array(constants[node.input[1]]))
        for node in model.graph.node
        if node.op_type == "QuantizeLinear"
    }


def test_int8_engine_directory_generates_what_fp32_does(demo: Quantized, tmp_path: Path) -> None:
    """The quantized graphs chained by the runtime: an INT8 engine directory next to the fp32 one."""
    target = tmp_path / "int8"
    shutil.copytree(demo.build_dir, target)
    raw = json.loads((target / manifest_io.MANIFEST_NAME).read_text())
    raw["precision"] = "int8"
    for name, model in demo.int8.items():
        for stale in (raw["graphs"][name]["file"], *raw["graphs"][name]["data_files"]):
            (target / stale).unlink()
        onnx.save_model(model, str(target / f"{name}-int8.onnx"))
        digest = sha256_file(target / f"{name}-int8.onnx")
        raw["graphs"][name].update(file=f"{name}-int8.onnx", sha256=digest, precision="int8", data_files={})
    manifest_io.write(target, raw)
    manifest = manifest_io.load(target)
    quantized = Pipeline(manifest, OnnxRuntimeBackend(manifest, threads=1))
    labels = list(range(10)) + [3, 1, 4, 1, 5, 9]
    seeds = [int(s) for s in np.random.default_rng().integers(0, 2**31, size=len(labels))]
    reference = demo.pipeline.generate_many(labels, seed=seeds)
    result = quantized.generate_many(labels, seed=seeds)
    assert _cosine(reference.latents, result.latents) >= 0.999
    pixels = np.abs(reference.images.astype(np.int16) - result.images.astype(np.int16))
    assert pixels.mean() <= 2.0, f"mean pixel difference {pixels.mean():.2f} / 255"


# ------------------------------------------------------------------------------- options
def test_conv_option_quantizes_the_decoder_per_output_channel(demo: Quantized) -> None:
    fp32 = demo.fp32["decoder"]
    model = int8.quantize(fp32, GraphReader(demo.calibration, "decoder"), op_types=COMPUTE_OPS, threads=1)
    records = qdq.check_qdq(model)
    convs = [n for n in fp32.graph.node if n.op_type == "Conv"]
    assert sorted(qdq.quantized_nodes(model, ("Conv",))) == sorted(n.name for n in convs)
    weights = [r for r in records if r.role == "weight"]
    assert len(weights) == len(convs) and all(r.axis == 0 and r.per_channel for r in weights)
    report = qdq.compare_graphs(fp32, model, held_out_feeds(demo.calibration, "decoder"))
    assert report["image"].cosine >= MIN_COSINE


class _Untouchable:
    def get_next(self) -> Any:
        raise AssertionError("a graph with nothing to quantize must not be calibrated")


def test_graph_with_nothing_to_quantize_comes_back_unchanged(demo: Quantized) -> None:
    fp32 = demo.fp32["decoder"]
    model = int8.quantize(fp32, _Untouchable())
    assert [n.op_type for n in model.graph.node] == [n.op_type for n in fp32.graph.node]
    assert qdq.qdq_summary(model) == []


def test_quantize_takes_paths_rewinds_readers_and_is_deterministic(demo: Quantized, tmp_path: Path) -> None:
    path = tmp_path / "decoder.onnx"
    onnx.save_model(demo.fp32["flow_step"], str(path))
    reader = GraphReader(demo.calibration, "flow_step", max_batches=8)
    first = int8.quantize(path, reader, threads=1)
    second = int8.quantize(path, reader, threads=1)  # the same, already consumed, reader
    assert first.graph.SerializeToString() == second.graph.SerializeToString()
    third = int8.quantize(demo.fp32["flow_step"], GraphReader(demo.calibration, "flow_step", max_batches=8), threads=1)
    assert first.graph.SerializeToString() == third.graph.SerializeToString()
    with pytest.raises(ValueError, match="calibration method"):
        int8.quantize(path, reader, "kl-divergence")


def test_check_qdq_rejects_asymmetric_or_per_tensor_weights(demo: Quantized) -> None:
    good = demo.int8["flow_step"]
    records = qdq.qdq_summary(good)
    activation = next(r for r in records if r.op_type == "QuantizeLinear")
    weight = next(r for r in records if r.role == "weight")
    nodes = {n.name: n for n in good.graph.node}

    shifted = onnx.ModelProto()
    shifted.CopyFrom(good)
    zero_name = nodes[activation.node].input[2]
    for init in shifted.graph.initializer:
        if init.name == zero_name:
            init.CopyFrom(numpy_helper.from_array(np.array(3, np.int8), zero_name))
    with pytest.raises(ValueError, match="zero point 3"):
        qdq.check_qdq(shifted)

    per_tensor = onnx.ModelProto()
    per_tensor.CopyFrom(good)
    scale_name = nodes[weight.node].input[1]
    for init in per_tensor.graph.initializer:
        if init.name == scale_name:
            init.CopyFrom(numpy_helper.from_array(np.array(0.01, np.float32), scale_name))
    for node in per_tensor.graph.node:
        if node.name == weight.node:
            del node.attribute[:]
    with pytest.raises(ValueError, match="not per-channel"):
        qdq.check_qdq(per_tensor)
    assert {r.to_dict()["per_channel"] for r in records if r.role == "weight"} == {True}


def test_float_consumers_and_graph_outputs_never_see_quantized_values(rng: np.random.Generator) -> None:
    """ORT rewires every consumer of a quantized activation to its Q/DQ; the recipe confines Q/DQ to quantized ops."""
    from onnx import helper

    weight = numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "weight")
    bias = numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "bias")
    graph = helper.make_graph(
        [
            helper.make_node("Relu", ["a"], ["h"], name="relu"),
            helper.make_node("MatMul", ["h", "weight"], ["m"], name="matmul"),
            helper.make_node("Add", ["h", "bias"], ["s"], name="add"),
        ],
        "confine",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", w]) for n, w in (("h", 8), ("m", 4), ("s", 8))],
        [weight, bias],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    feeds = [{"a": rng.standard_normal((16, 8)).astype(np.float32)} for _ in range(4)]
    quantized = int8.quantize(model, FeedList(feeds), threads=1)
    assert qdq.quantized_nodes(quantized) == ["matmul"]
    qdq.check_qdq(quantized)
    reference, actual = _session(model), _session(quantized)
    for feed in feeds:
        (h, m, s), (h8, m8, s8) = reference.run(None, feed), actual.run(None, feed)
        np.testing.assert_array_equal(h8, h)  # a graph output the quantized MatMul also reads
        np.testing.assert_array_equal(s8, s)  # a float consumer of the same tensor
        assert not np.array_equal(m8, m) and _cosine(m8, m) >= MIN_COSINE


def test_sampler_state_passes_through_int8_flow_step_exactly(demo: Quantized) -> None:
    """With dt = 0 the Euler update returns x itself: exact only if x never meets a Q/DQ."""
    feed = next(iter(demo.calibration.feeds("flow_step", "held_out")))
    feed["dt"] = np.zeros(1, np.float32)
    (x_next,) = _session(demo.int8["flow_step"]).run(None, feed)
    np.testing.assert_array_equal(x_next, feed["x"])
    # and the backbone's renoised start state x equals the fp32 graph's, at every stage
    for group in demo.calibration.groups("backbone"):
        feed = next(iter(demo.calibration.feeds("backbone", "held_out", group=group)))
        reference = _session(demo.fp32["backbone"]).run(["x"], feed)[0]
        np.testing.assert_array_equal(_session(demo.int8["backbone"]).run(["x"], feed)[0], reference, err_msg=group)
