"""The INT8 recipe: explicit QuantizeLinear/DequantizeLinear pairs calibrated on real stage inputs.

Quantization uses ONNX Runtime's maintained static quantizer
(``onnxruntime.quantization.quantize_static``) in the form TensorRT's explicit
quantization reads (strongly typed INT8, DESIGN §4):

* QDQ format, int8 activations and int8 weights, both **symmetric** (int8 zero point 0);
* weights per output channel (a 1-D scale, one value per channel, with ``axis`` set on
  the weight's DequantizeLinear), activations per tensor;
* one Q/DQ pair per quantized node (``DedicatedQDQPair``), also where several nodes read
  the same activation (the AdaLN modulation Linears all read SiLU(condition)): ORT runs a
  pair on CPU as uint8 (fast) only when its Q feeds one DQ, and a shared int8 pair made the
  ecar-b flow step 2x slower than fp32 (see ``runtime.backends.onnxruntime_backend.
  disabled_optimizers``). TensorRT reads the pairs either way;
* Q/DQ only in front of the quantized ops: their outputs stay float
  (``OpTypesToExcludeOutputQuantization``), biases stay float (``QuantizeBias`` off;
  TensorRT dequantizes no int32 bias), and every other consumer of a quantized activation
  reads the float tensor (:func:`confine_activation_qdq` undoes ORT's rewiring of all
  consumers, which would quantize residual adds, the KV-cache concat or the Euler update);
* only weight-bearing ``MatMul`` / ``Gemm`` nodes are quantized by default, minus
  everything :func:`ecar_export.precision.fp16.fp32_nodes` keeps in fp32 (normalisation,
  softmax, the time embedding, the sampler's state path, the resampling products).

Measured on the demo (held-out captured inputs, minmax), deciding the defaults:

* attention's activation-by-activation MatMuls (Q·Kᵀ, A·V) stay float: quantizing them
  doubles ``backbone_4``'s max |z error| (0.16 -> 0.31; cosine 0.99991 -> 0.99974) —
  softmax outputs in [0, 1] keep only 7 of a symmetric int8's bits. Opt in with
  ``quantize_activation_matmuls=True``;
* which graphs are quantized is judged on whole requests, not per graph (:func:`op_types_for`):
  measured on ecar-b (random weights at a trained model's scale, 16 seeds, images against the
  fp32 build, a quiet Zen 4), every graph passes its held-out check (cosine >= 0.9999) but the
  images do not. With every graph quantized the worst image cosine is 0.987 on ONNX Runtime and
  0.964 on OpenVINO; the flow step in fp32 brings ONNX Runtime to 0.9991 (the backbone in fp32
  instead: no gain): the head runs 24 Euler steps per stage, so its error accumulates. On
  OpenVINO the decoder's int8 convolutions cost the rest (backbone alone int8: 0.9991; decoder
  alone int8: 0.983), though they decode 2.6x faster than fp32 (``benchmarks/decoder_speed.py``;
  ONNX Runtime's per-tensor Q/DQ 3x3 convolutions were 15 % slower than fp32 anyway). So builds
  quantize the backbone's products and the decoder's attention products; the flow graphs and
  every convolution stay float, on every backend (TensorRT's choice is not measured: no
  TensorRT on our machines). :func:`quantize` still takes any ``op_types`` for measurements.
* "float" depends on the engine (:func:`float_recipe_for`): a build for TensorRT gives the flow
  graphs the fp16 recipe, since TensorRT builds strongly typed networks and an fp32 graph would be
  an fp32 engine on a GPU; the CPU engines keep them fp32.

Calibration methods (ORT's calibrators, :func:`calibrate`): "minmax" (default),
"entropy" (KL-optimal threshold over a 2048-bin histogram, TensorRT's recipe; slow, about
0.5 s per tensor) and "percentile" (99.999th percentile of |x| by default).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import onnx

from ecar_export.precision import CALIBRATION_METHODS, RecipeInputs
from ecar_export.precision.fp16 import _name_unnamed_nodes, fp32_nodes
from ecar_export.precision.qdq import DEFAULT_OP_TYPES, check_qdq, compare_graphs
from ecar_export.quiet import quiet
from runtime.graphs import Kind

METHODS = CALIBRATION_METHODS
DEFAULT_PERCENTILE = 99.999
HISTOGRAM_BINS = 2048  # entropy / percentile histograms (TensorRT's entropy calibrator uses 2048)
ENTROPY_QUANTIZED_BINS = 128  # candidate thresholds quantize |x| into 128 levels (int8's half range)
# Held-out batches per row group that judge a quantized graph (a build records their cosine): ecar-b's decoder on
# all 240 held-out images took over 25 minutes of a build on two cores; 4 batches of 8 per group record it.
HELD_OUT_BATCHES = 4
# Calibration batches a graph kind is quantized on, where fewer than the whole set: a 256² KL-16 decode is 250
# GFLOP, and ecar-b's decoder on all 1712 calibration images (one calibration thread) ran for over an hour of a
# build; 16 batches of 8 spread over the set (benchmarks/decoder_speed.py calibrates on 32 images at an image
# cosine of 0.998). The cap is part of the graph's build key (:func:`calibration_batches`).
CALIBRATION_BATCHES: dict[Kind, int] = {Kind.DECODER: 16}


# Graph kinds whose products stay float in int8 builds: their error accumulates over a request (module doc).
FLOAT_KINDS = frozenset({Kind.FLOW_STEP, Kind.FLOW_LOOP})


def float_recipe_for(backend: str) -> str:
    """The recipe an int8 build for ``backend`` gives the graphs it keeps float (:data:`FLOAT_KINDS`).

    TensorRT builds strongly typed networks (the only mode of TensorRT 11), so the graph's types are the
    engine's: fp32 graphs would run the flow head in fp32 on a GPU. It gets the fp16 recipe, whose whole
    requests kept ecar-b's images (worst image cosine 0.99998 against fp32 on ONNX Runtime, 64 seeds) where
    the quantized head did not. The CPU engines keep the fp32 graphs: ONNX Runtime has few fp16 CPU kernels
    (an fp16 graph runs through inserted casts, slower than fp32), and OpenVINO chooses the precision of a
    graph itself (the build's ``bf16_safe``). Never run on TensorRT here (no TensorRT on our machines)."""
    return "fp16" if backend == "tensorrt" else "fp32"


def calibration_batches(kind: Kind) -> int | None:
    """How many calibration batches quantize a graph of ``kind`` (spread evenly over the set); None: all."""
    return CALIBRATION_BATCHES.get(kind)


def op_types_for(kind: Kind) -> tuple[str, ...]:
    """The node types an int8 build quantizes in a graph of ``kind`` (module doc: judged on whole requests)."""
    return () if kind in FLOAT_KINDS else DEFAULT_OP_TYPES


def _calibration_method(method: str) -> Any:
    from onnxruntime.quantization import CalibrationMethod

    table = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }
    if method not in table:
        raise ValueError(f"unknown calibration method '{method}': use one of {', '.join(METHODS)}")
    return table[method]


def excluded_nodes(
    model: onnx.ModelProto, op_types: Sequence[str] = DEFAULT_OP_TYPES, quantize_activation_matmuls: bool = False
) -> list[str]:
    """Nodes of ``op_types`` that the recipe leaves in float (see the module doc)."""
    graph = model.graph
    constants = {i.name for i in graph.initializer} | {
        o for n in graph.node if n.op_type == "Constant" for o in n.output
    }
    keep = set(fp32_nodes(model))
    for node in graph.node:
        if node.op_type not in op_types:
            continue
        constant_weight = len(node.input) > 1 and node.input[1] in constants
        if node.op_type == "MatMul" and not constant_weight and not quantize_activation_matmuls:
            keep.add(node.name)  # attention's Q·Kᵀ and A·V
        if node.op_type in ("Gemm", "Conv", "ConvTranspose") and not constant_weight:
            keep.add(node.name)  # only a constant weight can be quantized per channel
        if node.op_type == "Gemm" and any(a.name == "beta" and a.f != 1.0 for a in node.attribute):
            keep.add(node.name)  # the bias stays float, so beta must stay 1
    return sorted(keep)


def quantize(
    model: onnx.ModelProto | str | os.PathLike[str],
    reader: Any,
    method: str = "minmax",
    *,
    op_types: Sequence[str] = DEFAULT_OP_TYPES,
    quantize_activation_matmuls: bool = False,
    exclude: Iterable[str] = (),
    percentile: float = DEFAULT_PERCENTILE,
    threads: int | None = None,
) -> onnx.ModelProto:
    """An explicit-INT8 (QDQ) copy of an fp32 graph, calibrated on ``reader``'s feeds.

    ``reader`` is an ``onnxruntime.quantization.CalibrationDataReader`` (e.g.
    :class:`calibration.readers.GraphReader`); it is rewound first where it can be.
    ORT's ``quant_pre_process`` is not run: the exported graphs are already folded and
    shape-inferred (``onnx.shape_inference`` in strict mode), its symbolic shape inference
    fails on ``flow_step``, and its optimiser may emit ORT-only fused ops TensorRT cannot read.
    A graph with nothing to quantize comes back unchanged, without calibration.
    ``threads`` sets the calibration session's intra-op threads (ORT's default otherwise).
    """
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    calibrate_method = _calibration_method(method)
    proto = onnx.ModelProto()
    if isinstance(model, onnx.ModelProto):
        proto.CopyFrom(model)
    else:
        proto = onnx.load(str(model))
    _name_unnamed_nodes(proto)
    blocked = set(excluded_nodes(proto, op_types, quantize_activation_matmuls)) | set(exclude)
    targets = [n.name for n in proto.graph.node if n.op_type in op_types and n.name not in blocked]
    if not targets:
        _tag(proto, {"ecar.precision": "int8", "ecar.int8.calibration": "none: nothing to quantize"})
        return proto
    split_gemm_bias(proto, targets)
    with tempfile.TemporaryDirectory(prefix="ecar-int8-") as tmp_dir:
        tmp = Path(tmp_dir)
        with quiet():
            tensors = activation_inputs(proto, targets)
            ranges = calibrate(proto, reader, method, tensors, tmp, percentile=percentile, threads=threads)
            quantize_static(
                proto,
                str(tmp / "int8.onnx"),
                None,
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=list(op_types),
                per_channel=True,
                reduce_range=False,
                activation_type=QuantType.QInt8,
                weight_type=QuantType.QInt8,
                nodes_to_quantize=targets,
                nodes_to_exclude=sorted(blocked),
                calibrate_method=calibrate_method,
                extra_options={
                    "ActivationSymmetric": True,
                    "WeightSymmetric": True,
                    "QuantizeBias": False,
                    "DedicatedQDQPair": True,
                    "OpTypesToExcludeOutputQuantization": list(op_types),
                },
                calibration_cache_path=str(ranges),
            )
        quantized = onnx.load(str(tmp / "int8.onnx"))
    confine_activation_qdq(quantized, targets)
    _check_interface(proto, quantized)
    quantized.producer_name = proto.producer_name or "ecar-export"
    _tag(quantized, {"ecar.precision": "int8", "ecar.int8.calibration": method})
    onnx.checker.check_model(quantized, full_check=True)
    return quantized


def calibrate(
    model: onnx.ModelProto,
    reader: Any,
    method: str,
    tensors: Iterable[str],
    tmp: Path,
    percentile: float = DEFAULT_PERCENTILE,
    threads: int | None = None,
) -> Path:
    """Ranges of ``tensors`` over ``reader``'s feeds, saved as an ORT calibration cache (JSON).

    ORT's calibrators, set up here rather than inside ``quantize_static`` because:
    ``quantize_static`` cannot pass histogram sizes, and ORT's entropy default (128 bins
    for 128 quantized bins) leaves the KL search one candidate, the full range, so
    "entropy" would silently equal "minmax" (we use TensorRT's 2048 bins); it calibrates
    every input and output of every MatMul/Gemm, where only the quantized inputs are
    needed (the entropy search costs about 0.5 s per tensor); and the calibration session's
    thread count becomes ours to set.
    """
    import onnxruntime as ort
    from onnxruntime.quantization import calibrate as ort_calibrate
    from onnxruntime.quantization.calibrate import save_tensors_data

    wanted = set(tensors)
    base: Any
    options: dict[str, Any] = {"symmetric": True}
    if method == "minmax":
        base = ort_calibrate.MinMaxCalibrater
    elif method == "entropy":
        base = ort_calibrate.EntropyCalibrater
        options.update(num_bins=HISTOGRAM_BINS, num_quantized_bins=ENTROPY_QUANTIZED_BINS)
    elif method == "percentile":
        base = ort_calibrate.PercentileCalibrater
        options.update(num_bins=HISTOGRAM_BINS, percentile=percentile)
    else:
        _calibration_method(method)  # raises

    class Calibrator(base):  # type: ignore[misc, valid-type]
        def select_tensors_to_calibrate(self, model: onnx.ModelProto) -> tuple[set[str], dict[str, Any]]:
            found, value_infos = super().select_tensors_to_calibrate(model)
            return found & wanted, value_infos

    source = tmp / "fp32.onnx"
    onnx.save_model(model, str(source))
    calibrator = Calibrator(source, None, str(tmp / "augmented.onnx"), **options)
    calibrator.augment_graph()
    session_options = ort.SessionOptions()
    session_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session_options.log_severity_level = 3
    if threads:
        session_options.intra_op_num_threads = threads
    calibrator.infer_session = ort.InferenceSession(
        calibrator.augmented_model_path, sess_options=session_options, providers=["CPUExecutionProvider"]
    )
    if hasattr(reader, "rewind"):
        reader.rewind()
    # one collect_data per group of one shape (the backbone's stages): ORT's histogram collectors
    # stack a tensor's values over one call; ranges and histograms accumulate across calls
    for part in reader.parts() if hasattr(reader, "parts") else [reader]:
        calibrator.collect_data(part)
    ranges = tmp / "ranges.json"
    save_tensors_data(calibrator.compute_data(), ranges)
    return ranges


def activation_inputs(model: onnx.ModelProto, nodes: Iterable[str]) -> list[str]:
    """The non-constant inputs the recipe quantizes on ``nodes`` (data input; no bias)."""
    graph = model.graph
    constants = {i.name for i in graph.initializer} | {
        o for n in graph.node if n.op_type == "Constant" for o in n.output
    }
    chosen = set(nodes)
    found: list[str] = []
    for node in graph.node:
        if node.name not in chosen:
            continue
        inputs = node.input[:2] if node.op_type == "MatMul" else node.input[:1]
        found += [name for name in inputs if name and name not in constants and name not in found]
    return found


def split_gemm_bias(model: onnx.ModelProto, targets: Iterable[str]) -> None:
    """Move the float bias of the ``targets`` Gemms into an Add right after them, in place.

    A Gemm whose bias ``C`` is a float tensor next to dequantized ``A`` and ``B`` is not a
    pattern ORT's CPU provider fuses into an integer kernel: it dequantizes the weight on
    every call and runs the float Gemm, slower than fp32 (the bias would have to be an int32
    DequantizeLinear, which TensorRT does not read). ``Gemm(A, B) + C`` with ``beta`` 1 is
    the same function: ORT fuses the Gemm into QGemm, TensorRT fuses the Add into its kernel.
    Gemms without a bias, or whose ``beta`` is not 1, are left alone.
    """
    graph = model.graph
    chosen = set(targets)
    rebuilt: list[onnx.NodeProto] = []
    for node in graph.node:
        beta = next((a.f for a in node.attribute if a.name == "beta"), 1.0)
        if node.op_type != "Gemm" or node.name not in chosen or len(node.input) < 3 or not node.input[2] or beta != 1.0:
            rebuilt.append(node)
            continue
        bias, output = node.input[2], node.output[0]
        product = f"{output}_before_bias"
        del node.input[2]
        node.output[0] = product
        rebuilt.append(node)
        rebuilt.append(onnx.helper.make_node("Add", [product, bias], [output], name=f"{node.name}_bias"))
    del graph.node[:]
    graph.node.extend(rebuilt)


def confine_activation_qdq(model: onnx.ModelProto, targets: Iterable[str]) -> None:
    """Let only the quantized nodes read an activation's Q/DQ; every other consumer gets the float tensor.

    ORT's QDQ quantizer rewires *all* consumers of a quantized activation to its
    DequantizeLinear output (unless several quantized nodes share it and DedicatedQDQPair
    is set), and when the activation is also a graph output it moves the output behind
    the Q/DQ pair. Either way float nodes — a residual add, the KV-cache concat, the
    Euler update, a graph output — would silently see quantized values. This undoes
    that, in place: Q/DQ sits in front of the quantized nodes only.
    """
    graph = model.graph
    chosen = set(targets)
    outputs = {o.name for o in graph.output}
    quantizers = {n.output[0]: n for n in graph.node if n.op_type == "QuantizeLinear"}
    for dq in [n for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in quantizers]:
        q = quantizers[dq.input[0]]
        source, dequantized = q.input[0], dq.output[0]
        if dequantized in outputs:  # ORT renamed the producer's output to `source` and let DQ produce the output
            renamed = f"{dequantized}_dequantized"
            dq.output[0] = renamed
            for node in graph.node:
                if node is dq:
                    continue
                for index, name in enumerate(node.output):
                    if name == source:
                        node.output[index] = dequantized
                for index, name in enumerate(node.input):
                    if name == source:
                        node.input[index] = dequantized
                    elif name == dequantized and node.name in chosen:
                        node.input[index] = renamed
            continue
        for node in graph.node:
            if node.name in chosen or node is dq:
                continue
            for index, name in enumerate(node.input):
                if name == dequantized:
                    node.input[index] = source


def _tag(model: onnx.ModelProto, props: dict[str, str]) -> None:
    """Set metadata properties, keeping any others the graph carries."""
    kept = {p.key: p.value for p in model.metadata_props if p.key not in props}
    onnx.helper.set_model_props(model, {**kept, **props})


def _check_interface(before: onnx.ModelProto, after: onnx.ModelProto) -> None:
    def interface(model: onnx.ModelProto) -> list[tuple[str, int]]:
        values = list(model.graph.input) + list(model.graph.output)
        return [(v.name, v.type.tensor_type.elem_type) for v in values]

    if interface(before) != interface(after):
        raise RuntimeError("INT8 quantization changed the graph's inputs or outputs")


def apply(source: Path, target: Path, graph: str, inputs: RecipeInputs) -> dict[str, object]:
    """The INT8 graph of ``source`` at ``target``, calibrated on ``inputs.calibration``'s rows of ``graph``.

    The fp32 graph is loaded with its weights (quantization reads and rewrites every one);
    the result is checked (Q/DQ pairs) and compared with the fp32 graph on the held-out rows.
    """
    from calibration.readers import GraphReader, held_out_feeds
    from ecar_export import weights_io

    if inputs.calibration is None:
        raise RuntimeError("internal error: the int8 recipe needs a calibration set")
    method = inputs.calibration_method
    fp32_graph = onnx.load(str(source))
    kind = inputs.calibration.spec(graph).kind
    op_types = op_types_for(kind)
    if not op_types:  # a graph kind int8 builds keep float (FLOAT_KINDS): the fp32 graph, or its fp16 recipe
        kept = f"{kind} graphs stay float"
        record: dict[str, object] = {"recipe": "int8", "quantized_op_types": [], "qdq_nodes": 0, "kept_float": kept}
        props = {"ecar.precision": "int8", "ecar.int8.calibration": f"none: {kind} graphs stay float"}
        if inputs.float_recipe == "fp16":
            from ecar_export.precision import fp16

            record["float_recipe"] = fp16.apply(source, target, graph, inputs)
            float_graph = weights_io.load_graph(target)  # the weights stay where the fp16 recipe wrote them
            _tag(float_graph, props)
            weights_io.save_graph(float_graph, target)
            return record
        float_graph = onnx.load(str(source))
        _tag(float_graph, props)
        weights_io.save_with_external_data(float_graph, target)
        return record
    batches = calibration_batches(kind)
    reader = GraphReader(inputs.calibration, graph, max_batches=batches)
    quantized = quantize(fp32_graph, reader, method, op_types=op_types, threads=1)
    records = check_qdq(quantized)
    held_out = held_out_feeds(inputs.calibration, graph, max_batches=HELD_OUT_BATCHES)
    agreement = compare_graphs(fp32_graph, quantized, held_out)
    del fp32_graph
    weights_io.save_with_external_data(quantized, target)
    return {
        "recipe": "int8",
        "quantizer": "onnxruntime.quantization.quantize_static (QDQ, symmetric int8, per-channel weights)",
        "calibration_method": method,
        "calibration_batches": "all" if batches is None else batches,
        "quantized_op_types": list(op_types),
        "qdq_nodes": len(records),
        "held_out_cosine": {name: round(a.cosine, 7) for name, a in agreement.items()},
        "held_out_max_abs": {name: a.max_abs for name, a in agreement.items()},
    }
