"""What an INT8 graph holds and how close it stays to fp32: its Q/DQ nodes, the check of the
explicit symmetric form TensorRT reads, the nodes that run in INT8, and output agreement.

Read-only inspection of ONNX graphs (:mod:`ecar_export.precision.int8` makes them; the build,
``ecar-export check`` and the tests read them through here).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

DEFAULT_OP_TYPES = ("MatMul", "Gemm")  # what the INT8 recipe quantizes unless asked otherwise
CONV_OP_TYPES = ("MatMul", "Gemm", "Conv")  # ... and for targets whose INT8 convolutions pay (int8.op_types_for)
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


# ------------------------------------------------------------------------ Q/DQ inspection
@dataclass(frozen=True)
class QDQRecord:
    """One QuantizeLinear / DequantizeLinear node of a graph."""

    node: str
    op_type: str  # QuantizeLinear | DequantizeLinear
    tensor: str  # the float tensor quantized (Q) or produced (DQ)
    role: str  # "weight" (DQ of a stored quantized weight) or "activation"
    consumers: tuple[str, ...]  # op types reading the node's output
    zero_point_dtype: str | None  # numpy dtype name; None where the zero point is omitted
    zero_point_max_abs: int | None  # largest |zero point|; 0 for symmetric quantization
    scale_shape: tuple[int, ...]
    axis: int | None  # the node's ``axis`` attribute, None where absent
    scale_min: float
    scale_max: float
    weight_dtype: str | None = None  # dtype of the stored weight (weights only)
    weight_channels: int | None = None  # the weight's extent along ``axis`` (weights only)

    @property
    def per_channel(self) -> bool:
        """A 1-D scale along an explicit axis (for weights: one scale per channel of that axis)."""
        if len(self.scale_shape) != 1 or self.axis is None:
            return False
        return self.weight_channels is None or self.scale_shape[0] == self.weight_channels

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "per_channel": self.per_channel}


def qdq_summary(model: onnx.ModelProto) -> list[QDQRecord]:
    """A record of every QuantizeLinear / DequantizeLinear node, in graph order."""
    graph = model.graph
    constants: dict[str, np.ndarray] = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            value = next((a for a in node.attribute if a.name == "value"), None)
            if value is not None:
                constants[node.output[0]] = numpy_helper.to_array(value.t)
    consumers: dict[str, list[str]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node.op_type)
    records = []
    for node in graph.node:
        if node.op_type not in QDQ_OPS:
            continue
        scale = constants.get(node.input[1]) if len(node.input) > 1 else None
        zero = constants.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        axis = next((a.i for a in node.attribute if a.name == "axis"), None)
        scale_array = np.asarray(scale if scale is not None else np.array([np.nan]), dtype=np.float64)
        weight = constants.get(node.input[0]) if node.op_type == "DequantizeLinear" else None
        channels = None
        if weight is not None and axis is not None and -weight.ndim <= axis < weight.ndim:
            channels = int(weight.shape[axis])
        tensor = node.input[0] if node.op_type == "QuantizeLinear" else node.output[0]
        records.append(
            QDQRecord(
                node=node.name,
                op_type=node.op_type,
                tensor=tensor,
                role="activation" if weight is None else "weight",
                consumers=tuple(consumers.get(node.output[0], ())),
                zero_point_dtype=None if zero is None else zero.dtype.name,
                zero_point_max_abs=None if zero is None else int(np.max(np.abs(zero.astype(np.int64)), initial=0)),
                scale_shape=tuple(int(d) for d in np.shape(scale)) if scale is not None else (),
                axis=axis,
                scale_min=float(np.min(scale_array)),
                scale_max=float(np.max(scale_array)),
                weight_dtype=None if weight is None else weight.dtype.name,
                weight_channels=channels,
            )
        )
    return records


def check_qdq(model: onnx.ModelProto) -> list[QDQRecord]:
    """The graph's Q/DQ records, after checking the TensorRT explicit-INT8 form; raises ValueError.

    Every Q/DQ has an int8 zero point equal to 0 and a positive, finite scale; every
    weight DequantizeLinear reads an int8 initializer with a per-channel scale (1-D, one
    value per channel of the weight along its ``axis`` attribute).
    """
    records = qdq_summary(model)
    problems = []
    for record in records:
        where = f"{record.op_type} '{record.node}' ({record.tensor})"
        if record.zero_point_dtype != "int8":
            problems.append(f"{where}: zero point dtype {record.zero_point_dtype}, expected int8")
        if record.zero_point_max_abs != 0:
            problems.append(f"{where}: zero point {record.zero_point_max_abs}, expected 0 (symmetric)")
        if not (np.isfinite(record.scale_min) and record.scale_min > 0 and np.isfinite(record.scale_max)):
            problems.append(f"{where}: scale must be positive and finite")
        if record.role == "weight" and record.weight_dtype != "int8":
            problems.append(f"{where}: stored weight is {record.weight_dtype}, expected int8")
        if record.role == "weight" and not record.per_channel:
            problems.append(f"{where}: weight scale {record.scale_shape} (axis {record.axis}) is not per-channel")
    if problems:
        raise ValueError("graph is not explicit symmetric INT8:\n  " + "\n  ".join(problems))
    return records


def quantized_nodes(model: onnx.ModelProto, op_types: Sequence[str] = DEFAULT_OP_TYPES) -> list[str]:
    """Names of the ``op_types`` nodes that read a DequantizeLinear output (i.e. run in INT8)."""
    dequantized = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return [n.name for n in model.graph.node if n.op_type in op_types and any(i in dequantized for i in n.input)]


# ------------------------------------------------------------------------------ accuracy
@dataclass(frozen=True)
class OutputAgreement:
    """Agreement of one output of a quantized graph with the fp32 graph over many feeds."""

    output: str
    cosine: float
    max_abs: float
    ref_max_abs: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def compare_graphs(
    reference: onnx.ModelProto, candidate: onnx.ModelProto, feeds: Iterable[dict[str, np.ndarray]], threads: int = 1
) -> dict[str, OutputAgreement]:
    """Cosine similarity (over all feeds at once) and max |diff| of every output, on ORT's CPU."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    sessions = [
        ort.InferenceSession(m.SerializeToString(), sess_options=options, providers=["CPUExecutionProvider"])
        for m in (reference, candidate)
    ]
    names = [o.name for o in reference.graph.output]
    dot = {n: 0.0 for n in names}
    norm_ref = {n: 0.0 for n in names}
    norm_cand = {n: 0.0 for n in names}
    max_abs = {n: 0.0 for n in names}
    ref_max = {n: 0.0 for n in names}
    for feed in feeds:
        ref_out, cand_out = (s.run(names, feed) for s in sessions)
        for name, ref, cand in zip(names, ref_out, cand_out):
            r, c = ref.astype(np.float64).ravel(), cand.astype(np.float64).ravel()
            dot[name] += float(r @ c)
            norm_ref[name] += float(r @ r)
            norm_cand[name] += float(c @ c)
            if r.size:
                max_abs[name] = max(max_abs[name], float(np.max(np.abs(r - c))))
                ref_max[name] = max(ref_max[name], float(np.max(np.abs(r))))
    result = {}
    for name in names:
        denom = np.sqrt(norm_ref[name] * norm_cand[name])
        cosine = dot[name] / denom if denom > 0 else float(norm_ref[name] == norm_cand[name])
        result[name] = OutputAgreement(name, float(cosine), max_abs[name], ref_max[name])
    return result
