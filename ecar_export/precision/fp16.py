"""The FP16 recipe: float16 compute with float32 graph inputs/outputs and fp32 islands.

Conversion uses ONNX Runtime's maintained converter
(``onnxruntime.transformers.float16.convert_float_to_float16``); this module only decides
which nodes stay in float32. Kept in float32 (see README "Precision" for the measurements):

* ``LayerNormalization``, ``InstanceNormalization``, ``GroupNormalization`` and ``Softmax`` —
  normalisation statistics and attention weights;
* the statistics of normalisations written as plain ops (the decoder's GroupNorms,
  :class:`ecar_export.tokenizer.StatisticsGroupNorm`): every ``ReduceMean`` with the
  elementwise ops that feed it (the squares) and those that use its result up to the
  normalised values (variance, square root, division) — a float16 mean square overflows once
  a group's values pass 256;
* the time embedding — every node computed from the flow time ``t`` alone (the ×1000
  sinusoid's arguments lose their fractional part in fp16);
* the sampler's state — the Euler update and guidance mix (``x - dt·u``), renoising and
  every other elementwise op on the path into a state output (``x``, ``x_next``,
  ``x_end``), back to the last matrix product, so the integration accumulates in fp32; and the
  decoder's final activation (``image``: the sigmoid or the ``(x + 1) / 2`` clip after its last
  convolution);
* the grid resampling matrices (``up_s`` / ``fresh_s`` / ``down_s``) and their products.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import onnx

from ecar_export.precision import RecipeInputs

FP32_OPS = ("LayerNormalization", "InstanceNormalization", "GroupNormalization", "Softmax")
# normalisation statistics as plain ops: the reductions, and the elementwise ops around them
STATISTICS_OPS = ("ReduceMean",)
ELEMENTWISE_OPS = ("Add", "Sub", "Mul", "Div", "Sqrt", "Reciprocal", "Relu", "Max", "Pow", "Neg")
# inputs whose whole forward closure stays fp32 (scalars of the schedule)
FP32_SOURCES = ("t", "dt", "cfg")
# outputs that carry the sampler's state; elementwise producers of these stay fp32
STATE_OUTPUTS = ("x", "x_next", "x_end", "image")
# ops that end the backward walk from a state output (the heavy compute stays fp16)
COMPUTE_OPS = ("MatMul", "Gemm", "Conv", "ConvTranspose", "Einsum")
RESAMPLING_PREFIXES = ("up_", "fresh_", "down_", "model.up_", "model.fresh_", "model.down_")
RESAMPLING_INPUTS = ("up", "fresh")  # graph inputs of the backbone (ecar_export.families.ecar.contract.stage_inputs)


# the recipe's fp32 islands, each switchable for measurements (benchmarks/fp16_recipe.py)
PARTS = ("ops", "time", "state", "resampling", "statistics")


def fp32_nodes(model: onnx.ModelProto, parts: tuple[str, ...] = PARTS) -> list[str]:
    """Names of the nodes the recipe keeps in float32 (``parts`` selects the islands)."""
    graph = model.graph
    initializers = {init.name for init in graph.initializer}
    constants = {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    static = initializers | constants
    producers = {out: node for node in graph.node for out in node.output}
    keep: set[str] = set()

    # 1. forward closure of the schedule scalars: nodes whose dynamic inputs all derive from them. Tensor
    # shapes count as static: a scalar broadcast to the batch (Expand(t, Shape(x)...)) stays in the closure,
    # or a time embedding computed per row (FlowAR's sin/cos of t * 1000) would run in float16
    shaped = _shape_arithmetic(graph, static)
    sources = FP32_SOURCES if "time" in parts else ()
    derived = {name for name in sources if any(i.name == name for i in graph.input)}
    for node in graph.node:  # nodes are topologically sorted
        dynamic = [i for i in node.input if i and i not in static and i not in shaped]
        if dynamic and all(i in derived for i in dynamic):
            keep.add(node.name)
            derived.update(node.output)

    # 2. backward walk from each state output through elementwise / shape ops
    stack = [o.name for o in graph.output if o.name in STATE_OUTPUTS] if "state" in parts else []
    seen: set[str] = set()
    while stack:
        tensor = stack.pop()
        node = producers.get(tensor)
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        if node.op_type in COMPUTE_OPS and not ("resampling" in parts and _uses_resampling(node, initializers)):
            continue
        keep.add(node.name)
        stack.extend(i for i in node.input if i and i not in static)

    # 3. normalisation statistics written as plain ops
    if "statistics" in parts:
        keep.update(_statistics_nodes(graph, static))

    # 4. products with the resampling matrices, and the ops kept by type
    for node in graph.node:
        if ("ops" in parts and node.op_type in FP32_OPS) or (
            "resampling" in parts and _uses_resampling(node, initializers)
        ):
            keep.add(node.name)
    return sorted(keep)


def _shape_arithmetic(graph: onnx.GraphProto, static: set[str]) -> set[str]:
    """Tensors computed from tensor shapes alone: ``Shape`` outputs and what only they and constants feed."""
    shaped: set[str] = set()
    for node in graph.node:
        dynamic = [i for i in node.input if i and i not in static]
        if node.op_type == "Shape" or (dynamic and all(i in shaped for i in dynamic)):
            shaped.update(node.output)
    return shaped


def _statistics_nodes(graph: onnx.GraphProto, static: set[str]) -> set[str]:
    """Each ``ReduceMean``, the elementwise ops feeding it, and the elementwise ops downstream of its result.

    Downstream: the closure through elementwise ops of the reductions' outputs (mean, mean square,
    variance, its square root and the division), ended by any other op (the Reshape back to the
    tensor's shape). Upstream: the elementwise producers of a reduction's input (the squares).
    """
    producers = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    keep: set[str] = set()
    for node in graph.node:
        if node.op_type not in STATISTICS_OPS:
            continue
        keep.add(node.name)
        source = producers.get(node.input[0]) if node.input else None
        if source is not None and source.op_type in ELEMENTWISE_OPS:
            keep.add(source.name)
        stack = list(node.output)
        while stack:
            for consumer in consumers.get(stack.pop(), []):
                if consumer.op_type not in ELEMENTWISE_OPS or consumer.name in keep:
                    continue
                keep.add(consumer.name)
                if not _normalises(consumer, producers):  # the normalised values end the island
                    stack.extend(consumer.output)
    return keep


def _normalises(node: onnx.NodeProto, producers: dict[str, onnx.NodeProto]) -> bool:
    """A division by the statistics, or a product with their reciprocal square root."""
    if node.op_type == "Div":
        return True
    return node.op_type == "Mul" and any(
        (source := producers.get(name)) is not None and source.op_type in ("Sqrt", "Reciprocal") for name in node.input
    )


def _uses_resampling(node: onnx.NodeProto, initializers: set[str]) -> bool:
    """A product with the stage's resampling matrices (the backbone's ``up`` / ``fresh`` inputs)."""
    return any(i in RESAMPLING_INPUTS or (i in initializers and i.startswith(RESAMPLING_PREFIXES)) for i in node.input)


def convert(model: onnx.ModelProto, parts: tuple[str, ...] = PARTS) -> onnx.ModelProto:
    """An FP16 copy of an fp32 graph, float32 at its inputs and outputs."""
    from onnxruntime.transformers import float16

    _name_unnamed_nodes(model)
    blocked = fp32_nodes(model, parts)
    with _shapes_from_dims(float16):
        converted = float16.convert_float_to_float16(
            model,
            keep_io_types=True,
            op_block_list=list(float16.DEFAULT_OP_BLOCK_LIST) + (list(FP32_OPS) if "ops" in parts else []),
            node_block_list=blocked,
        )
    _drop_cast_round_trips(converted)
    return _toposort(converted)


@contextlib.contextmanager
def _shapes_from_dims(float16: Any) -> Iterator[None]:
    """Let the converter work on a graph whose weights stay on disk (ONNX external data, not loaded).

    The converter reads an initializer's values only to learn its shape
    (``make_value_info_from_tensor``); the tensor's ``dims`` say the same without reading
    gigabytes. Its retyped external tensors are converted afterwards, file to file
    (:func:`ecar_export.weights_io.to_float16`).
    """
    original = float16.make_value_info_from_tensor

    def from_dims(tensor: onnx.TensorProto) -> onnx.ValueInfoProto:
        return onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims))

    float16.make_value_info_from_tensor = from_dims
    try:
        yield
    finally:
        float16.make_value_info_from_tensor = original


def _drop_cast_round_trips(model: onnx.ModelProto) -> None:
    """Remove fp32 -> fp16 -> fp32 Cast pairs the converter puts between two fp32 regions.

    With ``keep_io_types`` the converter casts every float input to fp16 first; fp32 nodes
    that read it then cast it back, which would round the sampler's state (``x``, noise,
    ``prev``) to fp16. Consumers of such a pair read the original fp32 tensor instead.
    """
    graph = model.graph
    producers = {out: node for node in graph.node for out in node.output}

    def cast_to(node: onnx.NodeProto | None) -> int | None:
        if node is None or node.op_type != "Cast":
            return None
        return next((a.i for a in node.attribute if a.name == "to"), None)

    replace: dict[str, str] = {}
    for node in graph.node:
        if cast_to(node) != onnx.TensorProto.FLOAT:
            continue
        inner = producers.get(node.input[0])
        if cast_to(inner) == onnx.TensorProto.FLOAT16:
            assert inner is not None
            source = inner.input[0]
            source_node = producers.get(source)
            # the source must itself be fp32: a graph input, or an fp32 tensor (not another cast to fp16)
            if source_node is None or cast_to(source_node) != onnx.TensorProto.FLOAT16:
                replace[node.output[0]] = source
    if not replace:
        return
    outputs = {o.name for o in graph.output}
    for node in graph.node:
        for index, name in enumerate(node.input):
            if name in replace:
                node.input[index] = replace[name]
    for name, source in replace.items():
        if name in outputs:  # keep the graph output's name: route it through an Identity
            graph.node.append(onnx.helper.make_node("Identity", [source], [name], name=f"{name}_fp32_identity"))
            producer = producers[name]
            producer.output[0] = f"{name}_unused_round_trip"


def _toposort(model: onnx.ModelProto) -> onnx.ModelProto:
    """The converter appends its Cast nodes out of order; restore a topological order."""
    import onnx_graphsurgeon as gs

    graph = gs.import_onnx(model)
    graph.cleanup().toposort()
    return gs.export_onnx(graph)


def _name_unnamed_nodes(model: onnx.ModelProto) -> None:
    used = {n.name for n in model.graph.node if n.name}
    for index, node in enumerate(model.graph.node):
        if not node.name:
            name = f"{node.op_type}_{index}"
            while name in used:
                name += "_"
            node.name = name
            used.add(name)


def apply(source: Path, target: Path, graph: str, inputs: RecipeInputs) -> dict[str, object]:
    """The fp16 graph of ``source`` at ``target``: weights streamed through the conversion tensor by tensor."""
    from ecar_export import weights_io

    model = weights_io.load_graph(source)
    original = {t.name: t.data_type for t in weights_io.initializers(model.graph)}
    kept = fp32_nodes(model)
    converted = convert(model)
    weights_io.rewrite_data(converted, source.parent, weights_io.data_path(target), weights_io.to_float16(original))
    weights_io.save_graph(converted, target)
    return {
        "recipe": "fp16",
        "converter": "onnxruntime.transformers.float16",
        "fp32_nodes": len(kept),
        "fp32_ops": list(FP32_OPS),
    }
