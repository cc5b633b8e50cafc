"""Multiply-add FLOPs of a build's graphs, counted from real shapes (2 FLOPs per MAC).

Pure ``onnx`` + ``numpy``: no torch, no ONNX Runtime. A graph's symbolic input dims are
replaced by the concrete shapes of one batch (from the graph contract, :mod:`runtime.graphs`),
ONNX shape inference propagates them, and every MatMul / Gemm / Conv / ConvTranspose
(and their quantized forms) is counted from its operands' shapes. Elementwise ops,
normalisations and softmax are not counted: on these models they are a few percent of the
matrix products.

    graph_flops(model, dims, spec)        -> {"by_op": {...}, "total": N, "unknown": [...]}
    build_flops(engine_dir, batch)        -> per-graph, per-stage and per-image totals of a build
    call_flops(model, spec, plan, ...)    -> one call of a graph at one stage

``build_flops`` walks the build's request plan (:meth:`runtime.plan.RequestPlan.calls`), the order a request calls the
graphs in; ``ecar-export inspect`` (:mod:`ecar_export.inspect_report`) reports them.
"""

from __future__ import annotations

import os
from collections import defaultdict
from typing import Any

import numpy as np
import onnx
from onnx import shape_inference

from runtime import graphs
from runtime import manifest as manifest_io
from runtime.graphs import GraphSpec, Kind
from runtime.plan import RequestPlan

# The exporter's names for the dynamic axes, and the contract's names for the same axes.
DIM_ALIASES = {
    "batch": "B",
    "2*batch": "2B",
    "tokens": "N",
    "prev_tokens": "P",
    "past_tokens": "T",
    "emitted_tokens": "E",
    "steps": "K",
}
# Index of (A, B) for matrix products and (X, W) for convolutions, per op type.
_OPERANDS = {
    "MatMul": (0, 1),
    "MatMulInteger": (0, 1),
    "QLinearMatMul": (0, 3),
    "Gemm": (0, 1),
    "Conv": (0, 1),
    "ConvInteger": (0, 1),
    "QLinearConv": (0, 3),
    "ConvTranspose": (0, 1),
}
COUNTED_OPS = tuple(_OPERANDS)
Shape = tuple[int, ...]


def _concrete_input_shapes(model: onnx.ModelProto, dims: dict[str, int], spec: GraphSpec | None) -> dict[str, Shape]:
    if spec is not None:
        return {t.name: t.concrete(dims) for t in spec.inputs}
    shapes: dict[str, Shape] = {}
    initializers = {init.name for init in model.graph.initializer}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        shape = []
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_value"):
                shape.append(dim.dim_value)
            elif dim.dim_param in dims:
                shape.append(dims[dim.dim_param])
            elif DIM_ALIASES.get(dim.dim_param) in dims:
                shape.append(dims[DIM_ALIASES[dim.dim_param]])
            else:
                raise ValueError(f"input '{value.name}': no size given for dimension '{dim.dim_param}'")
        shapes[value.name] = tuple(shape)
    return shapes


def _set_shape(value: onnx.ValueInfoProto, shape: Shape) -> None:
    tensor = value.type.tensor_type
    tensor.ClearField("shape")
    for size in shape:
        tensor.shape.dim.add().dim_value = int(size)


def infer_concrete(
    model: onnx.ModelProto, dims: dict[str, int], spec: GraphSpec | None = None
) -> dict[str, Shape | None]:
    """Shape of every tensor of ``model`` when its inputs have the concrete shapes of ``dims``.

    ``dims`` maps the contract's symbols (``B``, ``2B``, ``N``, ..., see
    :meth:`runtime.plan.RequestPlan.dims`) or the graph's own ``dim_param`` names to sizes. With ``spec``
    the input shapes come from the contract; without, from the graph's inputs. The model
    passed in is not modified. ``None`` marks a tensor whose shape inference left unknown.
    """
    return infer_shapes_from_inputs(model, _concrete_input_shapes(model, dims, spec))


def infer_shapes_from_inputs(model: onnx.ModelProto, inputs: dict[str, Shape]) -> dict[str, Shape | None]:
    """:func:`infer_concrete` with the graph inputs' concrete shapes given by name.

    Shape arithmetic the exporter leaves in the graph (``Shape`` -> ``Squeeze`` -> ``Mul`` ->
    ``Concat`` -> ``Reshape``; ONNX's data propagation stops at 0-d tensors) is folded into
    constants first, round by round, so every dynamic dim becomes concrete.
    """
    work = onnx.ModelProto()
    work.CopyFrom(model)
    graph = work.graph
    for value in graph.input:
        if value.name in inputs:
            _set_shape(value, inputs[value.name])
    del graph.value_info[:]  # drop the exporter's symbolic shapes; inference redoes them
    for value in graph.output:
        value.type.tensor_type.ClearField("shape")
    inferred = _fold_shape_arithmetic(work)
    shapes: dict[str, Shape | None] = {}
    for init in inferred.graph.initializer:
        shapes[init.name] = tuple(int(d) for d in init.dims)
    for node in inferred.graph.node:  # Constant nodes: shape from the attribute itself
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    shapes[node.output[0]] = tuple(int(d) for d in attr.t.dims)
    for value in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output):
        tensor = value.type.tensor_type
        if not tensor.HasField("shape"):
            shapes.setdefault(value.name, None)
            continue
        dims = tensor.shape.dim
        known = all(d.HasField("dim_value") for d in dims)
        shapes[value.name] = tuple(int(d.dim_value) for d in dims) if known else None
    return shapes


# Ops whose values (not only shapes) are computed here when all their inputs are small constants:
# the shape arithmetic of exported graphs.
_SHAPE_OPS = {
    "Shape", "Size", "Gather", "Squeeze", "Unsqueeze", "Concat", "Mul", "Add", "Sub", "Div", "Reshape", "Cast",
    "Slice", "Equal", "Where", "Max", "Min", "Identity", "Range", "ConstantOfShape", "Expand",
}  # fmt: skip
_SMALL = 1 << 16  # elements


def _fold_shape_arithmetic(model: onnx.ModelProto, rounds: int = 8) -> onnx.ModelProto:
    """Shape-inferred ``model`` with its shape computations replaced by constants (in place)."""
    from onnx import numpy_helper
    from onnx.reference import ReferenceEvaluator

    graph = model.graph
    values: dict[str, np.ndarray] = {
        i.name: numpy_helper.to_array(i)
        for i in graph.initializer
        if i.data_location != onnx.TensorProto.EXTERNAL and int(np.prod(i.dims, dtype=np.int64)) <= _SMALL
    }
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    inferred = shape_inference.infer_shapes(model, check_type=False, strict_mode=False, data_prop=True)
    for _ in range(rounds):
        shapes = {
            v.name: v.type.tensor_type.shape
            for v in (*inferred.graph.input, *inferred.graph.value_info)
            if v.type.tensor_type.HasField("shape")
        }
        folded = False
        for node in graph.node:
            if node.op_type not in _SHAPE_OPS or all(o in values for o in node.output):
                continue
            if node.op_type == "Shape":
                known = shapes.get(node.input[0])
                if known is None or not all(d.HasField("dim_value") for d in known.dim):
                    continue
                full = np.array([d.dim_value for d in known.dim], np.int64)
                start = next((a.i for a in node.attribute if a.name == "start"), 0)
                end = next((a.i for a in node.attribute if a.name == "end"), len(full))
                values[node.output[0]] = full[start:end]
                folded = True
                continue
            inputs = [i for i in node.input if i]
            if not all(i in values for i in inputs) or any(values[i].size > _SMALL for i in inputs):
                continue
            single = onnx.helper.make_model(
                onnx.helper.make_graph(
                    [node],
                    "fold",
                    [onnx.helper.make_tensor_value_info(i, onnx.TensorProto.UNDEFINED, None) for i in inputs],
                    [onnx.helper.make_tensor_value_info(o, onnx.TensorProto.UNDEFINED, None) for o in node.output],
                ),
                opset_imports=list(model.opset_import),
            )
            try:
                results = ReferenceEvaluator(single).run(None, {i: values[i] for i in inputs})
            except Exception:  # an op the reference cannot evaluate here: leave it to shape inference
                continue
            values.update(zip(node.output, (np.asarray(r) for r in results)))
            folded = True
        if not folded:
            break
        rebuilt = []
        for node in graph.node:
            if node.op_type in _SHAPE_OPS and all(o in values for o in node.output) and node.op_type != "Constant":
                rebuilt += [
                    onnx.helper.make_node("Constant", [], [o], value=numpy_helper.from_array(values[o], o))
                    for o in node.output
                ]
            else:
                rebuilt.append(node)
        del graph.node[:]
        graph.node.extend(rebuilt)
        del graph.value_info[:]
        inferred = shape_inference.infer_shapes(model, check_type=False, strict_mode=False, data_prop=True)
    return inferred


def _attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


def _broadcast_matmul(a: Shape, b: Shape) -> tuple[int, int]:
    """(output elements, K) of numpy-style matmul of shapes ``a`` and ``b``."""
    k = a[-1]
    a2 = a if len(a) > 1 else (1, a[0])
    b2 = b if len(b) > 1 else (b[0], 1)
    batch = np.broadcast_shapes(tuple(a2[:-2]), tuple(b2[:-2]))
    out = (*batch, a2[-2], b2[-1])
    return int(np.prod(out, dtype=np.int64)), int(k)


def node_flops(node: onnx.NodeProto, shapes: dict[str, Shape | None]) -> int | None:
    """Multiply-add FLOPs (2 per MAC) of one counted node; ``None`` when a shape is unknown."""
    first, second = _OPERANDS[node.op_type]
    if len(node.input) <= second:
        return None
    a, b = shapes.get(node.input[first]), shapes.get(node.input[second])
    if a is None or b is None:
        return None
    op = node.op_type
    if op in ("MatMul", "MatMulInteger", "QLinearMatMul"):
        elements, k = _broadcast_matmul(a, b)
        return 2 * elements * k
    if op == "Gemm":
        m, k = (a[1], a[0]) if _attr(node, "transA", 0) else (a[0], a[1])
        n = b[0] if _attr(node, "transB", 0) else b[1]
        return 2 * int(m) * int(k) * int(n)
    kernel = int(np.prod(b[2:], dtype=np.int64))
    if op == "ConvTranspose":
        # W: [C_in, C_out / group, k...]; every input element scatters into C_out/group × k outputs.
        return 2 * int(np.prod(a, dtype=np.int64)) * int(b[1]) * kernel
    # Conv: W [C_out, C_in / group, k...]; every output element is a C_in/group × k dot product.
    y = shapes.get(node.output[0])
    if y is None:
        return None
    return 2 * int(np.prod(y, dtype=np.int64)) * int(b[1]) * kernel


def graph_flops(model: onnx.ModelProto, dims: dict[str, int], spec: GraphSpec | None = None) -> dict[str, Any]:
    """FLOPs of one call of ``model`` at the concrete sizes ``dims`` (see :func:`infer_concrete`).

    Returns ``{"by_op": {op_type: flops}, "total": flops, "unknown": [node names]}``;
    ``unknown`` lists counted nodes whose operand shapes inference could not make concrete
    (they are left out of the totals). Nodes inside subgraphs (Loop, If) are not counted;
    the exporter unrolls the fused flow loop, so builds have none.
    """
    return count_flops(model, _concrete_input_shapes(model, dims, spec))


def count_flops(model: onnx.ModelProto, inputs: dict[str, Shape]) -> dict[str, Any]:
    """:func:`graph_flops` with the graph inputs' concrete shapes given by name."""
    shapes = infer_shapes_from_inputs(model, inputs)
    by_op: dict[str, int] = defaultdict(int)
    unknown: list[str] = []
    for node in model.graph.node:
        if node.op_type not in _OPERANDS:
            continue
        flops = node_flops(node, shapes)
        if flops is None:
            unknown.append(node.name or node.op_type)
        else:
            by_op[node.op_type] += flops
    return {"by_op": dict(by_op), "total": int(sum(by_op.values())), "unknown": unknown}


def graph_models(manifest: manifest_io.Manifest) -> dict[str, onnx.ModelProto]:
    """Every graph of a build without its weights (shapes are all FLOP counting needs)."""
    return {
        name: onnx.load(str(manifest.path(entry.file)), load_external_data=False)
        for name, entry in manifest.graphs.items()
    }


def build_flops(engine_dir: str | os.PathLike[str], batch: int) -> dict[str, Any]:
    """FLOPs of one request of ``batch`` samples on a build, per graph call, per stage and per image.

    Walks the request plan: the backbone once per stage at that stage's shapes, the flow
    graph once per Euler step (or once per stage, fused) on the batch's [batch, N_s] token grid, the
    decoder once. A fused loop's FLOPs are its body's times its steps (ONNX shape inference
    does not count inside a Loop).
    """
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    manifest = manifest_io.load(engine_dir)
    plan = manifest.plan
    models = graph_models(manifest)
    specs = {name: entry.spec for name, entry in manifest.graphs.items()}
    per_call: dict[tuple[str, int], dict[str, Any]] = {}
    graph_rows: dict[str, dict[str, Any]] = {}
    stages: dict[int, dict[str, Any]] = {}
    for call in plan.calls(manifest.fuse_flow_loop):
        key = (call.graph, call.stage)
        if key not in per_call:
            per_call[key] = call_flops(models[call.graph], specs[call.graph], plan, call.stage, batch)
        counted = per_call[key]
        label = call.graph if call.graph == Kind.DECODER else f"{call.graph}@stage{call.stage}"
        row = graph_rows.setdefault(
            label, {"calls": 0, "per_call": counted["total"], "total": 0, "by_op": counted["by_op"]}
        )
        row["calls"] += 1
        row["total"] += counted["total"]
        if call.graph == Kind.DECODER:
            continue
        dims = plan.dims(call.stage, batch)
        stage = stages.setdefault(
            call.stage,
            {
                "stage": call.stage,
                "tokens": dims["N"],
                "steps": plan.stage(call.stage).steps,
                "M": batch * dims["N"],
                "backbone": 0,
                "flow_graph": graphs.flow_graph(manifest.fuse_flow_loop),
                "flow_calls": 0,
                "flow_per_call": 0,
                "flow": 0,
                "total": 0,
            },
        )
        if call.graph == Kind.BACKBONE:
            stage["backbone"] += counted["total"]
        else:
            stage["flow_calls"] += 1
            stage["flow_per_call"] = counted["total"]
            stage["flow"] += counted["total"]
        stage["total"] += counted["total"]
    decoder = graph_rows[Kind.DECODER]["total"]
    total = sum(s["total"] for s in stages.values()) + decoder
    return {
        "engine_dir": str(engine_dir),
        "precision": manifest.precision,
        "fuse_flow_loop": manifest.fuse_flow_loop,
        "batch": batch,
        "graphs": graph_rows,
        "stages": [stages[s] for s in sorted(stages)],
        "decoder": decoder,
        "total": total,
        "per_image": total / batch,
    }


def call_flops(model: onnx.ModelProto, spec: GraphSpec, plan: RequestPlan, stage: int, batch: int) -> dict[str, Any]:
    """FLOPs of one call of a graph at a stage and batch (a fused loop: its body, once per step)."""
    dims = plan.dims(stage, batch)
    if spec.kind != Kind.FLOW_LOOP:
        return graph_flops(model, dims, spec)
    body = next(a.g for node in model.graph.node if node.op_type == "Loop" for a in node.attribute if a.name == "body")
    step = onnx.ModelProto()
    step.CopyFrom(model)
    del step.graph.node[:]
    step.graph.node.extend(n for n in body.node)
    del step.graph.input[:]
    step.graph.input.extend(
        onnx.helper.make_tensor_value_info(name, dtype, shape)
        for name, dtype, shape in (
            ("loop_x", onnx.TensorProto.FLOAT, list(spec.tensor("x").concrete(dims))),
            ("z", onnx.TensorProto.FLOAT, list(spec.tensor("z").concrete(dims))),
            ("loop_t", onnx.TensorProto.FLOAT, [1]),
            ("loop_dt", onnx.TensorProto.FLOAT, [1]),
            ("cfg", onnx.TensorProto.FLOAT, [1]),
            ("t", onnx.TensorProto.FLOAT, [dims["K"]]),
            ("dt", onnx.TensorProto.FLOAT, [dims["K"]]),
            ("loop_iteration", onnx.TensorProto.INT64, []),
        )
    )
    del step.graph.output[:]
    step.graph.output.extend(body.output[1:])
    once = count_flops(
        step, {i.name: tuple(d.dim_value for d in i.type.tensor_type.shape.dim) for i in step.graph.input}
    )
    steps = dims["K"]
    return {
        "by_op": {op: steps * flops for op, flops in once["by_op"].items()},
        "total": steps * once["total"],
        "unknown": once["unknown"],
    }
