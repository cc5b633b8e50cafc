"""The ECAR family: the model this repository defines (:mod:`ecar_export.families.ecar.model`) and its contract.

Its graph specs, request plan and stage constants are :mod:`ecar_export.families.ecar.contract`'s (the calibration
capture computes them from a manifest's config too, which is why they sit in ``runtime``); its
checkpoints are :mod:`ecar_export.checkpoint`'s. See :mod:`ecar_export.families` for the interface.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ecar_export import checkpoint
from ecar_export.families import Family
from ecar_export.families.ecar import contract as ecar_contract
from ecar_export.families.ecar.model import ECAR
from runtime.graphs import Kind


def _flow_loop_reference(model: ECAR) -> Callable[..., torch.Tensor]:
    """The torch reference of ``flow_loop`` (for checks): ``flow_step`` at each given time, in order."""

    def loop(x: torch.Tensor, z: torch.Tensor, t: torch.Tensor, dt: torch.Tensor, cfg: torch.Tensor) -> torch.Tensor:
        for step in range(t.shape[0]):
            x = model.flow_step(x, z, t[step : step + 1], dt[step : step + 1], cfg)
        return x

    return loop


def graph_function(model: ECAR, kind: Kind) -> Callable[..., Any]:
    """The torch function of a graph: its arguments are the graph's inputs in order."""
    functions: dict[Kind, Callable[..., Any]] = {
        Kind.BACKBONE: model.backbone_graph,
        Kind.FLOW_STEP: model.flow_step,
        Kind.FLOW_LOOP: _flow_loop_reference(model),
        Kind.DECODER: model.decode_tokens,
    }
    if kind not in functions:
        raise ValueError(f"unknown graph kind {kind!r}")
    return functions[kind]


def _load(path: Path) -> ECAR:
    return checkpoint.load(path)


FAMILY = Family(
    name=ecar_contract.FAMILY,
    model_type=ECAR,
    graph_specs=ecar_contract.graph_specs,
    graph_function=graph_function,
    request_plan=ecar_contract.request_plan,
    stage_constants=ecar_contract.stage_constants,
    load=_load,
    create=ECAR,  # its presets are ecar_export.presets' own (the bundled trained demo among them)
)
