"""``CapturedModel``: what a calibration set knows of the model it was captured from, whatever its family.

Everything comes from the fp32 build the capture ran (its manifest), so this package never needs a
model family's code:

==============  ===================================================================================
``card``        the build's :class:`runtime.manifest.ModelCard` (family, name, class count, settings)
``plan``        its :class:`runtime.plan.RequestPlan` (token counts, every stage's Euler times, guidance)
``specs``       the graphs of the unfused build (backbone, flow_step, decoder), by name
``constants``   its stage constants (:mod:`runtime.stage_constants`), fed back with the stored rows
``token_rows``  whether the flow head treats every token alone (ECAR's per-token MLP head): then its
                inputs are stored as token rows, mixed across stages; otherwise (FlowAR's head attends
                across a stage's tokens) as whole token grids, one sample of one step per row, one
                group per stage (:mod:`calibration.layout`)
==============  ===================================================================================

A fused build's ``flow_loop`` is calibrated from ``flow_step``'s rows; its spec is derived here
(:meth:`CapturedModel.loop_spec`: the step graph with a stage's K times in one call).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from runtime.graphs import GraphSpec, Kind, TensorSpec
from runtime.manifest import Manifest, ModelCard
from runtime.plan import RequestPlan
from runtime.stage_constants import StageConstants

ALL = "all"  # the one group of a graph whose rows have the same shape at every stage


def canonical(settings: Mapping[str, Any]) -> dict[str, Any]:
    """A family's settings as JSON gives them back (tuples as lists), so a config and its manifest compare equal."""
    result: dict[str, Any] = json.loads(json.dumps(dict(settings), sort_keys=True))
    return result


def card_of(family: str, settings: Mapping[str, Any]) -> ModelCard:
    """The :class:`ModelCard` a build of a model of ``family`` with config ``settings`` writes."""
    return ModelCard.from_manifest(family, canonical(settings), "model")


@dataclass(frozen=True)
class CapturedModel:
    """The model of a calibration set (module doc)."""

    card: ModelCard
    plan: RequestPlan
    specs: Mapping[str, GraphSpec]
    constants: StageConstants = field(compare=False, repr=False)
    token_rows: bool = True

    @classmethod
    def of_build(cls, manifest: Manifest, token_rows: bool) -> CapturedModel:
        """The model of an unfused build (the capture's fp32 pipeline)."""
        card = card_of(manifest.model.family, manifest.model.settings)
        return cls(card, manifest.plan, dict(manifest.specs), manifest.constants, token_rows)

    def same_model(self, family: str, settings: Mapping[str, Any]) -> bool:
        """Whether this set was captured from a model of ``family`` with config ``settings``."""
        return self.card.family == family and canonical(self.card.settings) == canonical(settings)

    # ------------------------------------------------------------------ graphs and their row groups
    def spec(self, kind: Kind) -> GraphSpec:
        if kind == Kind.FLOW_LOOP:
            return self.loop_spec()
        return next(spec for spec in self.specs.values() if spec.kind == kind)

    def loop_spec(self) -> GraphSpec:
        """``flow_loop``: ``flow_step`` taking a stage's K times (``t``, ``dt`` [K]) in one call; output ``x_end``."""
        step = self.spec(Kind.FLOW_STEP)
        inputs = tuple(TensorSpec(t.name, ("K",), t.dtype) if t.name in ("t", "dt") else t for t in step.inputs)
        outputs = tuple(TensorSpec("x_end", t.shape, t.dtype) for t in step.outputs)
        return GraphSpec(Kind.FLOW_LOOP, Kind.FLOW_LOOP, inputs, outputs)

    def per_stage(self, spec: GraphSpec) -> bool:
        """Whether a graph's rows are kept in one group per stage (shapes or constants differ by stage)."""
        if spec.kind == Kind.DECODER:
            return False  # once per request, at the last stage
        return not (spec.kind == Kind.FLOW_STEP and self.token_rows)

    def groups(self, spec: GraphSpec) -> list[str]:
        """Group names of a graph's rows: ``stage1``, ``stage2``, ... where :meth:`per_stage`, else ``all``."""
        if self.per_stage(spec):
            return [f"stage{s}" for s in range(1, self.plan.num_stages + 1)]
        return [ALL]

    def group_of(self, spec: GraphSpec, stage: int) -> str:
        """The group holding a graph's rows of ``stage``."""
        return f"stage{stage}" if self.per_stage(spec) else ALL

    def group_stage(self, group: str) -> int:
        """The stage whose dims a group's rows have (``all``: the last stage; only stage-free shapes)."""
        return int(group[len("stage") :]) if group != ALL else self.plan.num_stages

    def group_dims(self, group: str) -> dict[str, int]:
        return self.plan.dims(self.group_stage(group), 1)

    def stage_inputs(self, spec: GraphSpec, group: str) -> dict[str, np.ndarray]:
        """The inputs of a group's feeds that are not stored (:func:`calibration.layout.is_stage_input`)."""
        stage = self.group_stage(group)
        if spec.kind == Kind.FLOW_LOOP:
            times = self.plan.stage(stage).step_times()
            found = {
                "t": np.array([t for t, _ in times], np.float32),
                "dt": np.array([d for _, d in times], np.float32),
            }
            step = self.spec(Kind.FLOW_STEP).name
            return {**found, **self.constants.get(step, stage)}
        if spec.kind == Kind.FLOW_STEP and self.token_rows:
            return {}  # token rows of every stage share a batch: such a head takes no stage constants
        return dict(self.constants.get(spec.name, stage))

    # ------------------------------------------------------------------ calibration.json
    def to_dict(self) -> dict[str, Any]:
        return {
            "family": self.card.family,
            "model": canonical(self.card.settings),
            "request_plan": self.plan.to_dict(),
            "flow_rows": "token" if self.token_rows else "grid",
        }
