"""ONNX export of the contract's graphs (:mod:`runtime.graphs`), weights as external data.

Each wrapper's forward takes the inputs of its :class:`runtime.graphs.GraphSpec` in order;
export traces it with ``torch.onnx.export`` (dynamo, opset 18, every symbolic dim dynamic)
and writes the graph and its weights as two files: ``<name>.onnx`` (the graph, small) and
``<name>.onnx.data`` (every initializer above 1 KiB, ONNX external data), streamed from the
torch tensors — no copy of the weights is ever held in a protobuf, which caps a file at
2 GB. The graph is then cleaned (onnx-graphsurgeon: dead nodes, topological order),
shape-inferred and checked (``onnx.checker`` on the file pair) without loading the weights.

``flow_loop`` (fused builds) is not traced: :mod:`ecar_export.flow_loop` wraps the finished
``flow_step`` graph in an ONNX ``Loop``, after the precision recipe.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from ecar_export import weights_io
from ecar_export.quiet import quiet
from runtime.errors import EngineError
from runtime.graphs import GraphSpec, Kind

OPSET = 18
# Bump when the exported graphs change for the same weights and config (a new operator
# pattern, a different decomposition): graph build keys and calibration reuse depend on it.
# 2: the backbone MLP's GELU in the form ONNX Runtime fuses (layers.TanhGELU).
# 3: graph contract 2 (one backbone for every stage, external weight data).
# 4: graph contract 3 (flow graphs over token grids [B, N, C]).
EXPORT_VERSION = 4
# Sizes of the dims when tracing: all different (so no two dynamic dims are unified) and >= 2
# (torch.export specialises sizes 0 and 1). The graphs run at any size, 0 included for T and E.
TRACE_DIMS = {"B": 2, "P": 3, "N": 5, "T": 7, "E": 4, "K": 3}


class GraphModule(nn.Module):
    """One graph of the contract as a torch module: ``forward(*inputs)`` takes the contract's inputs in order.

    ``model`` is registered as a submodule, so its weights are the module's parameters.
    """

    def __init__(self, model: nn.Module, function: Callable[..., Any]) -> None:
        super().__init__()
        self.model = model
        self.function = function

    def forward(self, *inputs: torch.Tensor) -> Any:
        return self.function(*inputs)


def wrapper(model: nn.Module, spec: GraphSpec) -> nn.Module:
    """The torch module whose forward is the graph ``spec`` describes (its family's graph function)."""
    from ecar_export import families

    return GraphModule(model, families.of(model).graph_function(model, spec.kind)).eval()


def run_torch(model: nn.Module, spec: GraphSpec, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The torch reference of one graph on numpy inputs."""
    module = wrapper(model, spec)
    with torch.no_grad():
        outputs = module(*(torch.from_numpy(np.ascontiguousarray(feeds[name])) for name in spec.input_names()))
    if isinstance(outputs, torch.Tensor):
        outputs = (outputs,)
    return {name: out.numpy() for name, out in zip(spec.output_names(), outputs)}


def _dynamic_shapes(spec: GraphSpec) -> tuple[tuple[dict[int, object], ...]]:
    """The dynamic axes of every input, as torch.export wants them for ``forward(*inputs)``."""

    def dim(name: str, largest: int) -> Any:
        return torch.export.Dim(name, min=1, max=largest)

    batch = dim("batch", 4096)
    tokens = dim("tokens", 1 << 20)
    symbols: dict[str, Any] = {
        "B": batch,
        "2B": 2 * batch,
        "N": tokens,
        "P": dim("prev_tokens", 1 << 20),
        "T": dim("past_tokens", 1 << 20),
        "E": dim("emitted_tokens", 1 << 20),
        "K": dim("steps", 1 << 12),
    }
    return (tuple({axis: symbols[d] for axis, d in enumerate(t.shape) if isinstance(d, str)} for t in spec.inputs),)


def trace_inputs(model: nn.Module, spec: GraphSpec) -> dict[str, np.ndarray]:
    """Inputs to trace ``spec`` with: every dim at its :data:`TRACE_DIMS` size, values in range."""
    from ecar_export import families

    config = families.config_of(model)
    dims = {**TRACE_DIMS, "2B": 2 * TRACE_DIMS["B"]}
    rng = np.random.default_rng(0)
    feeds: dict[str, np.ndarray] = {}
    for tensor in spec.inputs:
        shape = tensor.concrete(dims)
        if tensor.name == "labels":
            feeds[tensor.name] = rng.integers(0, config.num_classes, size=shape, dtype=np.int64)
        elif tensor.name == "positions":
            feeds[tensor.name] = np.arange(shape[0], dtype=np.int64) % config.total_tokens
        elif tensor.name == "level":
            feeds[tensor.name] = np.array([1 % config.num_stages], np.int64)
        elif tensor.name == "kv_tokens":
            feeds[tensor.name] = np.arange(shape[0], dtype=np.int64)
        else:
            feeds[tensor.name] = rng.uniform(0.1, 1.0, size=shape).astype(np.float32)
    return feeds


def export_graph(model: nn.Module, spec: GraphSpec, path: Path, opset: int = OPSET) -> Path:
    """Trace one graph to ``path`` with its weights in ``path + '.data'``; returns ``path``.

    The weights are written from the torch tensors as they are (no protobuf copy); the graph
    file is cleaned, shape-inferred and checked without loading them.
    """
    if spec.kind == Kind.FLOW_LOOP:
        raise ValueError("flow_loop is not traced: ecar_export.flow_loop wraps the finished flow_step graph")
    module = wrapper(model, spec)
    sample = trace_inputs(model, spec)
    args = tuple(torch.from_numpy(sample[name]) for name in spec.input_names())
    with quiet():
        program = torch.onnx.export(
            module,
            args,
            input_names=spec.input_names(),
            output_names=spec.output_names(),
            opset_version=opset,
            dynamo=True,
            dynamic_shapes=_dynamic_shapes(spec),
            optimize=True,
            verbose=False,
        )
    if program is None:
        raise EngineError(f"torch.onnx.export returned no program for graph '{spec.name}'")
    path = Path(path)
    data = weights_io.data_path(path)
    for stale in (path, data):
        stale.unlink(missing_ok=True)
    with quiet():
        program.save(str(path), external_data=True)
    del program
    proto = clean(onnx.load(str(path), load_external_data=False), spec)
    onnx.save_model(proto, str(path))
    check(path)
    return path


def clean(proto: onnx.ModelProto, spec: GraphSpec) -> onnx.ModelProto:
    """Drop dead nodes, sort, name the I/O as the spec does and infer shapes (weights not loaded)."""
    import onnx_graphsurgeon as gs

    with quiet():
        graph = gs.import_onnx(proto)
        graph.cleanup().toposort()
        cleaned = gs.export_onnx(graph)
    cleaned.producer_name = "ecar-export"
    names_in = [i.name for i in cleaned.graph.input]
    names_out = [o.name for o in cleaned.graph.output]
    if names_in != spec.input_names() or names_out != spec.output_names():
        raise EngineError(
            f"exported graph '{spec.name}' has inputs {names_in} / outputs {names_out}, "
            f"expected {spec.input_names()} / {spec.output_names()}"
        )
    return onnx.shape_inference.infer_shapes(cleaned, check_type=True, strict_mode=True)


def check(path: str | os.PathLike[str]) -> None:
    """``onnx.checker`` (full check) on a graph file and its external data, without a 2 GB limit."""
    onnx.checker.check_model(str(path), full_check=True)
