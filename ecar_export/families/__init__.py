"""Model families: what the export side must know about a model to build it, one small interface.

A build needs five things from a model, whatever its family, and nothing else:

==================  =====================================================================
``graph_specs``     the graphs of graph contract 3 (:mod:`runtime.graphs`) for the model's config
``graph_function``  the torch function each graph is traced from (its arguments: the spec's inputs)
``request_plan``    the request plan the manifest carries (:class:`runtime.plan.RequestPlan`)
``stage_constants`` the per-stage constant inputs, by file key (:mod:`runtime.stage_constants`)
``load``            the model from a safetensors checkpoint whose metadata names the family
==================  =====================================================================

and its ``presets`` (name -> config; ``create`` makes a random-init model of one, for builds and
benchmarks without weights), plus what the family supports: ``fusable`` (its per-stage guidance fits a
fused ``flow_loop``), ``calibrated`` (the INT8 calibration capture serves it), ``token_rows`` (its flow
head treats every token alone, so calibration stores token rows; else whole token grids per stage,
:class:`calibration.model.CapturedModel`) and ``bf16_unsafe``:
the graph kinds whose half-precision builds must not run at bfloat16 (written into the build,
:class:`runtime.manifest.GraphEntry`).
The runtime sees none of this: it reads the plan, the specs and the constants from the build, and the
family's name and config only as data (:class:`runtime.manifest.ModelCard`).

====================  ==============================================================================
``ecar``              :mod:`ecar_export.families.ecar`: the ECAR model this repository defines (its
                      config, schedule, graph contract and torch model; the entry in ``ecar/family.py``)
``flowar``            :mod:`ecar_export.families.flowar`: FlowAR (Ren et al. 2024), the authors'
                      released checkpoints converted by ``ecar-export convert --flowar``
====================  ==============================================================================

A third family (a user's own ECAR variant) is one more package beside these two whose ``family`` module
defines a :class:`Family`, and one more line in :data:`FAMILIES`; its config derives from
:class:`ecar_export.families.config.ModelConfig`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from runtime.errors import CheckpointError
from runtime.graphs import GraphSpec, Kind
from runtime.plan import RequestPlan


@dataclass(frozen=True)
class Family:
    """One model family's answers to what a build asks (module doc). ``model_type``: its torch module class,
    whose instances carry their config as ``.config`` (a :class:`ecar_export.families.config.ModelConfig`
    with ``to_dict``)."""

    name: str
    model_type: type[nn.Module]
    graph_specs: Callable[[Any, bool], list[GraphSpec]]
    graph_function: Callable[[Any, Kind], Callable[..., Any]]
    request_plan: Callable[[Any], RequestPlan]
    stage_constants: Callable[[Any], dict[str, np.ndarray]]
    load: Callable[[Path], nn.Module]
    create: Callable[[Any], nn.Module]
    presets: Mapping[str, Any] = field(default_factory=dict)
    fusable: bool = True
    calibrated: bool = True
    token_rows: bool = True
    bf16_unsafe: frozenset[Kind] = frozenset()


# family name -> the module that defines it (as FAMILY); imported on first use
FAMILIES: Mapping[str, str] = {
    "ecar": "ecar_export.families.ecar.family",
    "flowar": "ecar_export.families.flowar.family",
}


def named(name: str) -> Family:
    """The family called ``name`` (a checkpoint's or manifest's ``family``)."""
    if name not in FAMILIES:
        raise CheckpointError(f"unknown model family '{name}'; this toolchain builds {', '.join(FAMILIES)}")
    family: Family = importlib.import_module(FAMILIES[name]).FAMILY
    return family


def all_families() -> list[Family]:
    return [named(name) for name in FAMILIES]


def config_of(model: nn.Module) -> Any:
    """A model's config (a family's :class:`ecar_export.families.config.ModelConfig`; ``nn.Module`` hides its type)."""
    return model.config


def of(model: nn.Module) -> Family:
    """The family of a model instance."""
    for family in all_families():
        if isinstance(model, family.model_type):
            return family
    raise TypeError(f"{type(model).__name__} is no model of a known family ({', '.join(FAMILIES)})")
