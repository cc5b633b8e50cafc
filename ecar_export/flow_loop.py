"""``flow_loop``: a finished ``flow_step`` graph wrapped in an ONNX ``Loop`` over a stage's steps.

The fused build's flow graph runs all of a stage's Euler steps in one call: inputs ``x``,
``z``, ``cfg`` as ``flow_step`` has them, and ``t`` / ``dt`` with one value per step (K of
them, any K, so one graph serves every stage). The loop body *is* the ``flow_step`` graph —
after its precision recipe (fp16 casts, INT8 Q/DQ pairs), so nothing is traced or quantized
twice and the weights are stored once: the body reads them as outer-scope initializers.

Body: ``t_k = t[k]``, ``dt_k = dt[k]``, ``x ← flow_step(x, z, t_k, dt_k, cfg)``.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from runtime.graphs import GraphSpec

ITER, COND_IN, COND_OUT, X_IN, X_OUT = "loop_iteration", "loop_cond_in", "loop_cond_out", "loop_x", "loop_x_out"


def wrap(step: onnx.ModelProto, spec: GraphSpec) -> onnx.ModelProto:
    """The ``flow_loop`` graph ``spec`` describes, with ``step`` (a ``flow_step`` graph) as its body."""
    graph = step.graph
    names_in = [i.name for i in graph.input]
    if names_in != ["x", "z", "t", "dt", "cfg"] or [o.name for o in graph.output] != ["x_next"]:
        raise ValueError(f"not a flow_step graph: inputs {names_in}, outputs {[o.name for o in graph.output]}")
    rename = {"x": X_IN, "t": "loop_t", "dt": "loop_dt"}
    body_nodes = [
        helper.make_node("Gather", ["t", ITER], ["loop_t_scalar"], name="loop_gather_t", axis=0),
        helper.make_node("Unsqueeze", ["loop_t_scalar", "loop_axes0"], ["loop_t"], name="loop_t_1d"),
        helper.make_node("Gather", ["dt", ITER], ["loop_dt_scalar"], name="loop_gather_dt", axis=0),
        helper.make_node("Unsqueeze", ["loop_dt_scalar", "loop_axes0"], ["loop_dt"], name="loop_dt_1d"),
    ]
    for node in graph.node:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.input[:] = [rename.get(name, name) for name in node.input]
        body_nodes.append(copy)
    body_nodes += [
        helper.make_node("Identity", [COND_IN], [COND_OUT], name="loop_keep_going"),
        helper.make_node("Identity", ["x_next"], [X_OUT], name="loop_state_out"),
    ]
    x_type = next(i for i in graph.input if i.name == "x").type.tensor_type.elem_type
    body = helper.make_graph(
        body_nodes,
        "flow_step_body",
        [
            helper.make_tensor_value_info(ITER, TensorProto.INT64, []),
            helper.make_tensor_value_info(COND_IN, TensorProto.BOOL, []),
            helper.make_tensor_value_info(X_IN, x_type, None),
        ],
        [
            helper.make_tensor_value_info(COND_OUT, TensorProto.BOOL, []),
            helper.make_tensor_value_info(X_OUT, x_type, None),
        ],
        value_info=list(graph.value_info),
    )
    main_nodes = [
        helper.make_node("Shape", ["t"], ["loop_steps_1d"], name="loop_steps"),
        helper.make_node("Squeeze", ["loop_steps_1d"], ["loop_steps"], name="loop_steps_scalar"),
        helper.make_node("Loop", ["loop_steps", "loop_true", "x"], ["x_end"], name="flow_loop", body=body),
    ]
    constants = [
        helper.make_tensor("loop_true", TensorProto.BOOL, [], [True]),
        helper.make_tensor("loop_axes0", TensorProto.INT64, [1], [0]),
    ]
    inputs = []
    for tensor in spec.inputs:
        dtype = TensorProto.FLOAT if tensor.dtype == "float32" else TensorProto.INT64
        inputs.append(helper.make_tensor_value_info(tensor.name, dtype, list(tensor.shape)))
    outputs = [helper.make_tensor_value_info(t.name, TensorProto.FLOAT, list(t.shape)) for t in spec.outputs]
    main = helper.make_graph(main_nodes, "flow_loop", inputs, outputs, initializer=[*graph.initializer, *constants])
    model = helper.make_model(main, opset_imports=list(step.opset_import), ir_version=step.ir_version)
    model.producer_name = step.producer_name or "ecar-export"
    kept = {p.key: p.value for p in step.metadata_props}
    helper.set_model_props(model, {**kept, "ecar.flow_loop": "onnx Loop over flow_step"})
    return model
