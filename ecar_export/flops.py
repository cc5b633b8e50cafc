"""Multiply-add FLOPs of a build's graphs, counted from real shapes (2 FLOPs per MAC).

Pure ``onnx`` + ``numpy``: no torch, no ONNX Runtime. A graph's symbolic input dims are
replaced by the concrete shapes of one batch (from the graph contract, :mod:`runtime.graphs`),
ONNX shape inference propagates them, and every MatMul / Gemm / Conv / ConvTranspose
(and their quantized forms) is counted from its operands' shapes. Elementwise ops,
normalisations and softmax are not counted: on these models they are a few percent of the
matrix products.

    graph_flops(model, dims, spec)  -> {"by_op": {...}, "total": N, "unknown": [...]}
    build_flops(engine_dir, batch)  -> per-graph, per-stage and per-image totals of a build
    inspect_rows(engine_dir)        -> one row per graph for ``ecar-export inspect``
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import shape_inference

from runtime import manifest as manifest_io
from runtime.graphs import GraphSpec, profile_shapes

# The exporter's names for the dynamic axes, and the contract's names for the same axes.
DIM_ALIASES = {"batch": "B", "2*batch": "2B", "tokens": "M", "2*tokens": "2M"}
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

    ``dims`` maps the contract's symbols (``B``, ``2B``, ``M``, ``2M``, see
    :meth:`GraphSpec.dims`) or the graph's own ``dim_param`` names to sizes. With ``spec``
    the input shapes come from the contract; without, from the graph's inputs. The model
    passed in is not modified. ``None`` marks a tensor whose shape inference left unknown.
    """
    return infer_shapes_from_inputs(model, _concrete_input_shapes(model, dims, spec))


def infer_shapes_from_inputs(model: onnx.ModelProto, inputs: dict[str, Shape]) -> dict[str, Shape | None]:
    """:func:`infer_concrete` with the graph inputs' concrete shapes given by name."""
    work = onnx.ModelProto()
    work.CopyFrom(model)
    graph = work.graph
    for value in graph.input:
        if value.name in inputs:
            _set_shape(value, inputs[value.name])
    del graph.value_info[:]  # drop the exporter's symbolic shapes; inference redoes them
    for value in graph.output:
        value.type.tensor_type.ClearField("shape")
    inferred = shape_inference.infer_shapes(work, check_type=False, strict_mode=False, data_prop=True)
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


def _models(manifest: manifest_io.Manifest) -> dict[str, onnx.ModelProto]:
    return {name: onnx.load(str(manifest.path(entry.file))) for name, entry in manifest.graphs.items()}


def build_flops(engine_dir: str | os.PathLike[str], batch: int) -> dict[str, Any]:
    """FLOPs of one request of ``batch`` samples on a build, per graph, per stage and per image.

    ``flow_step`` serves every stage: at stage s it runs ``steps_s`` times on M = batch × N_s
    tokens. A fused build runs ``flow_loop_s`` once per stage instead. Stage s costs
    ``backbone_s`` once plus its flow graph calls; the request adds the decoder once.
    """
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    manifest = manifest_io.load(engine_dir)
    config = manifest.config
    models = _models(manifest)
    specs = {name: entry.spec for name, entry in manifest.graphs.items()}
    graphs: dict[str, Any] = {}
    stages = []
    for index, (tokens, steps) in enumerate(zip(config.tokens_per_stage, config.steps)):
        stage = index + 1
        name = f"backbone_{stage}"
        backbone = graph_flops(models[name], specs[name].dims(batch), specs[name])
        graphs[name] = {
            "calls": 1,
            "per_call": backbone["total"],
            "total": backbone["total"],
            "by_op": backbone["by_op"],
        }
        if manifest.fuse_flow_loop:
            flow_name, calls = f"flow_loop_{stage}", 1
        else:
            flow_name, calls = "flow_step", steps
        flow = graph_flops(models[flow_name], specs[flow_name].dims(batch, tokens), specs[flow_name])
        key = flow_name if manifest.fuse_flow_loop else f"flow_step@stage{stage}"
        graphs[key] = {
            "calls": calls,
            "M": batch * tokens,
            "per_call": flow["total"],
            "total": calls * flow["total"],
            "by_op": flow["by_op"],
        }
        stage_total = backbone["total"] + calls * flow["total"]
        stages.append(
            {
                "stage": stage,
                "tokens": tokens,
                "steps": steps,
                "M": batch * tokens,
                "backbone": backbone["total"],
                "flow_graph": flow_name,
                "flow_calls": calls,
                "flow_per_call": flow["total"],
                "flow": calls * flow["total"],
                "total": stage_total,
            }
        )
    decoder = graph_flops(models["decoder"], specs["decoder"].dims(batch), specs["decoder"])
    graphs["decoder"] = {"calls": 1, "per_call": decoder["total"], "total": decoder["total"], "by_op": decoder["by_op"]}
    total = sum(s["total"] for s in stages) + decoder["total"]
    return {
        "engine_dir": str(engine_dir),
        "precision": manifest.precision,
        "fuse_flow_loop": manifest.fuse_flow_loop,
        "batch": batch,
        "graphs": graphs,
        "stages": stages,
        "decoder": decoder["total"],
        "total": total,
        "per_image": total / batch,
    }


def _shape_text(shape: tuple[Any, ...]) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"


def inspect_rows(engine_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """One row per graph of a build, in execution order, for ``ecar-export inspect``.

    Each row: ``name``, ``kind``, ``stage``, ``precision``, ``file``, ``size_bytes``,
    ``inputs`` (``[{"name", "dtype", "shape", "opt_shape"}]``: the contract's symbolic shape
    and the concrete shape at the build's opt batch), ``flops`` (one call at the opt-batch
    profile shapes: flow graphs at the largest stage's M, as the TensorRT profile) and
    ``flops_by_op``, ``unknown`` (counted nodes whose shapes inference left unknown).
    """
    manifest = manifest_io.load(engine_dir)
    rows = []
    for name, entry in manifest.graphs.items():
        spec = entry.spec
        path = manifest.path(entry.file)
        opt = {
            key: shapes[1]
            for key, shapes in profile_shapes(spec, manifest.min_batch, manifest.opt_batch, manifest.max_batch).items()
        }
        counted = count_flops(onnx.load(str(path)), opt)
        rows.append(
            {
                "name": name,
                "kind": spec.kind,
                "stage": spec.stage,
                "precision": entry.precision,
                "file": entry.file,
                "size_bytes": Path(path).stat().st_size,
                "inputs": [
                    {"name": t.name, "dtype": t.dtype, "shape": list(t.shape), "opt_shape": list(opt[t.name])}
                    for t in spec.inputs
                ],
                "opt_batch": manifest.opt_batch,
                "flops": counted["total"],
                "flops_by_op": counted["by_op"],
                "unknown": counted["unknown"],
            }
        )
    return rows


def format_rows(rows: list[dict[str, Any]]) -> str:
    """``inspect_rows`` as a plain-text table (one line per graph)."""
    header = f"{'graph':12} {'precision':9} {'size':>10} {'GFLOP@opt':>10}  inputs (symbolic -> opt batch)"
    lines = [header]
    for row in rows:
        inputs = " ".join(f"{i['name']}{_shape_text(tuple(i['shape']))}" for i in row["inputs"])
        lines.append(
            f"{row['name']:12} {row['precision']:9} {row['size_bytes']:>10,} {row['flops'] / 1e9:>10.4f}  {inputs}"
        )
    return "\n".join(lines)
