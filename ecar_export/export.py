"""Per-stage ONNX export: torch wrappers that expose exactly the graphs of DESIGN §4.

Each wrapper's forward takes the inputs of its :class:`runtime.graphs.GraphSpec`
in order; export traces it with ``torch.onnx.export`` (dynamo, opset ≥ 18) and a
dynamic batch / token axis, then folds constants, cleans up with onnx-graphsurgeon
and checks the result with ``onnx.checker`` and shape inference.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from ecar_export.model import ECAR
from ecar_export.quiet import quiet
from runtime import graphs
from runtime.errors import EngineError
from runtime.graphs import GraphSpec

OPSET = 18
# Bump when the exported graphs change for the same weights and config (a new operator
# pattern, a different decomposition): graph build keys and calibration reuse depend on it.
# 2: the backbone MLP's GELU in the form ONNX Runtime fuses (layers.TanhGELU).
EXPORT_VERSION = 2


class FirstBackboneGraph(nn.Module):
    """``backbone_1``: start tokens only, no cache to read."""

    def __init__(self, model: ECAR) -> None:
        super().__init__()
        self.model = model

    def forward(self, labels: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.model.stage_forward(0, labels, None, noise, None)


class BackboneGraph(nn.Module):
    """``backbone_s`` for s ≥ 2: renoising, the stage's tokens against the KV cache."""

    def __init__(self, model: ECAR, stage: int) -> None:
        super().__init__()
        self.model, self.stage = model, stage

    def forward(
        self, labels: torch.Tensor, prev: torch.Tensor, noise: torch.Tensor, past_kv: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        return self.model.stage_forward(self.stage - 1, labels, prev, noise, past_kv)


class FlowStepGraph(nn.Module):
    def __init__(self, model: ECAR) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, x: torch.Tensor, z: torch.Tensor, t: torch.Tensor, dt: torch.Tensor, cfg: torch.Tensor
    ) -> torch.Tensor:
        return self.model.flow_step(x, z, t, dt, cfg)


class FlowLoopGraph(nn.Module):
    """A stage's whole Euler loop, unrolled with its times baked in."""

    def __init__(self, model: ECAR, stage: int) -> None:
        super().__init__()
        self.model = model
        self.times = graphs.stage_times(model.config, stage)

    def forward(self, x: torch.Tensor, z: torch.Tensor, cfg: torch.Tensor) -> torch.Tensor:
        for t, dt in self.times:
            x = self.model.flow_step(x, z, torch.full((1,), t), torch.full((1,), dt), cfg)
        return x


class DecoderGraph(nn.Module):
    def __init__(self, model: ECAR) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.decode_tokens(x)


def wrapper(model: ECAR, spec: GraphSpec) -> nn.Module:
    """The torch module whose forward is the graph ``spec`` describes."""
    if spec.kind == "backbone":
        assert spec.stage is not None
        if spec.stage == 1:
            return FirstBackboneGraph(model).eval()
        return BackboneGraph(model, spec.stage).eval()
    if spec.kind == "flow_step":
        return FlowStepGraph(model).eval()
    if spec.kind == "flow_loop":
        assert spec.stage is not None
        return FlowLoopGraph(model, spec.stage).eval()
    if spec.kind == "decoder":
        return DecoderGraph(model).eval()
    raise ValueError(f"unknown graph kind {spec.kind!r}")


def run_torch(model: ECAR, spec: GraphSpec, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The torch reference of one graph on numpy inputs."""
    module = wrapper(model, spec)
    with torch.no_grad():
        outputs = module(*(torch.from_numpy(np.ascontiguousarray(feeds[name])) for name in spec.input_names()))
    if isinstance(outputs, torch.Tensor):
        outputs = (outputs,)
    return {name: out.numpy() for name, out in zip(spec.output_names(), outputs)}


def _dynamic_shapes(spec: GraphSpec) -> tuple[dict[int, object], ...]:
    batch = torch.export.Dim("batch", min=1, max=4096)
    tokens = torch.export.Dim("tokens", min=1, max=1 << 20)
    symbols = {"B": batch, "2B": 2 * batch, "M": tokens, "2M": 2 * tokens}
    return tuple({axis: symbols[dim] for axis, dim in enumerate(t.shape) if isinstance(dim, str)} for t in spec.inputs)


def export_graph(model: ECAR, spec: GraphSpec, path: Path, opset: int = OPSET) -> onnx.ModelProto:
    """Trace one graph to ONNX at ``path`` (plain file, weights inline) and return the cleaned model."""
    module = wrapper(model, spec)
    rng = np.random.default_rng(0)
    # Trace with a batch of 2 so no dynamic axis specialises to 1.
    sample = spec.sample_inputs(model.config, 2, rng)
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
    proto = clean(program.model_proto, spec)
    onnx.save_model(proto, str(path))
    return proto


def clean(proto: onnx.ModelProto, spec: GraphSpec) -> onnx.ModelProto:
    """Fold constants, drop dead nodes, name the I/O as the spec does, then check the graph."""
    import onnx_graphsurgeon as gs
    from polygraphy.backend.onnx import fold_constants

    with quiet():
        proto = fold_constants(proto, error_ok=True)
        graph = gs.import_onnx(proto)
        graph.cleanup().toposort()
        proto = gs.export_onnx(graph)
    proto.producer_name = "ecar-export"
    names_in = [i.name for i in proto.graph.input]
    names_out = [o.name for o in proto.graph.output]
    if names_in != spec.input_names() or names_out != spec.output_names():
        raise EngineError(
            f"exported graph '{spec.name}' has inputs {names_in} / outputs {names_out}, "
            f"expected {spec.input_names()} / {spec.output_names()}"
        )
    onnx.checker.check_model(proto, full_check=True)
    return onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
