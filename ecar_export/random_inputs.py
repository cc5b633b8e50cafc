"""Fresh random inputs of one graph call, for checks and tests, whatever the model family.

A call's inputs are drawn the way a request would feed them, from what a build describes (its
request plan, its stage constants and its class count), so the same function serves a build's
manifest (:func:`call_inputs`, ``ecar-export check``) and a model config before any build
(:func:`for_config`, through the model's family):

=============  ==================================================================================
constants      the real stage constants of the call's stage (resampling matrices, rotary tables, ...)
``labels``     classes drawn from ``0 .. num_classes-1``
``t``, ``dt``  the stage's own step times: one random Euler step (``flow_step``), all of them (``flow_loop``)
``cfg``        a guidance weight in [1, max(4, the plan's cfg)] (requests may ask more than the default)
``past_kv``    N(0, 0.25): cached keys and values of the size attention sees
anything else  N(0, 1) (noise, latents, conditioning); never all zeros
=============  ==================================================================================
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from runtime.graphs import GraphSpec, Kind
from runtime.plan import RequestPlan
from runtime.stage_constants import StageConstants

GUIDANCE_AT_LEAST = 4.0


def call_inputs(
    spec: GraphSpec,
    plan: RequestPlan,
    constants: StageConstants,
    num_classes: int,
    stage: int,
    batch: int,
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    """The inputs of one call of ``spec`` at a 1-based ``stage`` with ``batch`` samples (module doc)."""
    dims = plan.dims(stage, batch)
    fixed: Mapping[str, np.ndarray] = constants.get(spec.name, stage)
    times = plan.stage(stage).step_times()
    if spec.kind == Kind.FLOW_LOOP:
        t = np.array([t for t, _ in times], np.float32)
        dt = np.array([d for _, d in times], np.float32)
    else:
        step = times[int(rng.integers(len(times)))]
        t, dt = np.array([step[0]], np.float32), np.array([step[1]], np.float32)
    feeds: dict[str, np.ndarray] = {}
    for tensor in spec.inputs:
        shape = tensor.concrete(dims)
        if tensor.name in fixed:
            feeds[tensor.name] = np.array(fixed[tensor.name])
        elif tensor.name == "labels":
            feeds[tensor.name] = rng.integers(0, num_classes, size=shape, dtype=np.int64)
        elif tensor.name in ("t", "dt"):
            feeds[tensor.name] = t if tensor.name == "t" else dt
        elif tensor.name == "cfg":
            top = max(GUIDANCE_AT_LEAST, plan.cfg)
            feeds[tensor.name] = rng.uniform(1.0, top, size=shape).astype(np.float32)
        elif tensor.name == "past_kv":
            feeds[tensor.name] = (0.5 * rng.standard_normal(shape)).astype(np.float32)
        else:
            feeds[tensor.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def for_config(
    spec: GraphSpec, config: Any, stage: int, batch: int, rng: np.random.Generator, *, family: str
) -> dict[str, np.ndarray]:
    """:func:`call_inputs` of a model config of ``family`` (its plan and constants as a build would write them)."""
    from ecar_export import families

    model_family = families.named(family)
    constants = StageConstants(model_family.stage_constants(config))
    return call_inputs(spec, model_family.request_plan(config), constants, config.num_classes, stage, batch, rng)
