"""The FlowAR family (:mod:`ecar_export.families`' interface): its graphs, plan and constants are
:mod:`ecar_export.families.flowar.graphs`', its checkpoints the ones ``ecar-export convert --flowar`` writes.

Not supported yet, and refused at the start of a build: the fused ``flow_loop`` (FlowAR guides only
the steps below its time threshold, so a stage's steps take two weights while a fused loop takes one).
"""

from __future__ import annotations

from pathlib import Path

from ecar_export.families import Family
from ecar_export.families.flowar import convert, graphs
from ecar_export.families.flowar.config import FLOWAR_H, FLOWAR_L, FLOWAR_S, FlowARConfig
from ecar_export.families.flowar.model import FlowAR
from runtime.errors import InvalidRequestError
from runtime.graphs import GraphSpec, Kind

NAME = convert.FAMILY


def graph_specs(config: FlowARConfig, fuse_flow_loop: bool = False) -> list[GraphSpec]:
    if fuse_flow_loop:
        raise InvalidRequestError(
            "--fuse-flow-loop: FlowAR guides only the steps with t <= its guidance threshold, so a stage's steps "
            "take two guidance weights and a fused flow_loop takes one; build FlowAR without --fuse-flow-loop"
        )
    return graphs.graph_specs(config)


def _load(path: Path) -> FlowAR:
    return convert.load(path)


def _plan(config: FlowARConfig) -> graphs.RequestPlan:
    return graphs.request_plan(config)


FAMILY = Family(
    name=NAME,
    model_type=FlowAR,
    graph_specs=graph_specs,
    graph_function=graphs.graph_function,
    request_plan=_plan,
    stage_constants=graphs.stage_constants,
    load=_load,
    create=FlowAR,
    # the authors' three models, random init (a converted checkpoint carries the trained weights)
    presets={config.name: config for config in (FLOWAR_S, FLOWAR_L, FLOWAR_H)},
    fusable=False,
    # its flow head attends across a stage's tokens: calibration keeps whole grids, one group per stage
    token_rows=False,
    # Measured on flowar-tiny (random weights) over a request's 5 stages x 24 steps, as the distance to the fp32
    # latents over what other labels change: OpenVINO at bf16 (which runs the recipe's fp32 islands at bf16
    # too) 35-48 %; with the flow head off bf16 still 11 % (the backbone's z, cosine 0.99998 per call, feeds
    # every step); ONNX Runtime's fp16 0.3 %. So both stay off bf16; the decoder, once per request, may use it.
    bf16_unsafe=frozenset({Kind.BACKBONE, Kind.FLOW_STEP}),
)
