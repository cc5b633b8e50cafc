"""ECAR's side of the graph contract: its graph specs, request plan and stage constants, from an ``ECARConfig``.

The export writes what this module computes into the engine directory (the specs into the
manifest's graph entries, :func:`request_plan` as the manifest's ``plan``,
:func:`stage_constants` as the stages file); the calibration capture and the torch
reference sampler use it too. The runtime's request path never does: it reads all of it back
from the build (:mod:`runtime.graphs`, :mod:`runtime.plan`, :mod:`runtime.stage_constants`).
Every number comes from ECAR's formulas in :mod:`ecar_export.families.ecar.schedule`.
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np

from ecar_export.families.ecar import schedule
from ecar_export.families.ecar.config import ECARConfig
from runtime import plan as plan_module
from runtime.errors import ConfigError, ManifestError
from runtime.graphs import Dim, GraphSpec, Kind, TensorSpec
from runtime.plan import RequestPlan, StagePlan, f32
from runtime.stage_constants import StageConstants, key

if TYPE_CHECKING:
    from runtime.manifest import Manifest

FAMILY = "ecar"  # the manifest's model family of ECAR builds

# Inputs of the backbone that are the same for every request of a stage (see stage_inputs).
BACKBONE_CONSTANTS = ("up", "fresh", "renoise", "positions", "level", "kv_tokens")


def config_of(manifest: Manifest) -> ECARConfig:
    """The ECAR config of an ECAR build (its manifest's ``model``); a :class:`ManifestError` for another family
    (what reads it — the calibration capture, ``ecar-export check`` — serves ECAR builds only)."""
    where = str(manifest.root / "manifest.json")
    if manifest.model.family != FAMILY:
        raise ManifestError(
            f"{where}: a '{manifest.model.family}' build; this step reads ECAR builds only (family 'ecar')"
        )
    try:
        return ECARConfig.from_dict(dict(manifest.model.settings))
    except ConfigError as exc:
        raise ManifestError(f"{where}: invalid model config: {exc}") from None


def kv_shape(config: ECARConfig, tokens: Dim) -> tuple[Dim, ...]:
    """The token-major KV cache layout: [tokens, layers, 2 (key, value), 2B, heads, head_dim]."""
    return (tokens, config.depth, 2, "2B", config.heads, config.head_dim)


def backbone_spec(config: ECARConfig) -> GraphSpec:
    c, d = config.latent_channels, config.width
    inputs = (
        TensorSpec("labels", ("B",), "int64"),
        TensorSpec("prev", ("B", "P", c), "float32"),
        TensorSpec("noise", ("B", "N", c), "float32"),
        TensorSpec("up", ("N", "P"), "float32"),
        TensorSpec("fresh", ("N", "N"), "float32"),
        TensorSpec("renoise", (2,), "float32"),
        TensorSpec("positions", ("N",), "int64"),
        TensorSpec("level", (1,), "int64"),
        TensorSpec("past_kv", kv_shape(config, "T"), "float32"),
        TensorSpec("kv_tokens", ("E",), "int64"),
    )
    outputs = (
        TensorSpec("z", ("2B", "N", d), "float32"),
        TensorSpec("x", ("B", "N", c), "float32"),
        TensorSpec("kv", kv_shape(config, "E"), "float32"),
    )
    return GraphSpec(Kind.BACKBONE, Kind.BACKBONE, inputs, outputs)


def _flow_spec(config: ECARConfig, kind: Kind, steps: Dim, output: str) -> GraphSpec:
    c, d = config.latent_channels, config.width
    inputs = (
        TensorSpec("x", ("B", "N", c), "float32"),
        TensorSpec("z", ("2B", "N", d), "float32"),
        TensorSpec("t", (steps,), "float32"),
        TensorSpec("dt", (steps,), "float32"),
        TensorSpec("cfg", (1,), "float32"),
    )
    return GraphSpec(kind, kind, inputs, (TensorSpec(output, ("B", "N", c), "float32"),))


def flow_step_spec(config: ECARConfig) -> GraphSpec:
    """``flow_step``: one Euler step of a stage's token grid."""
    return _flow_spec(config, Kind.FLOW_STEP, 1, "x_next")


def flow_loop_spec(config: ECARConfig) -> GraphSpec:
    """``flow_loop``: a stage's Euler steps at the times given (K of them) in one call."""
    return _flow_spec(config, Kind.FLOW_LOOP, "K", "x_end")


def decoder_spec(config: ECARConfig) -> GraphSpec:
    n = config.tokens_per_stage[-1]
    image = ("B", config.image_channels, config.image_size, config.image_size)
    inputs = (TensorSpec("x", ("B", n, config.latent_channels), "float32"),)
    return GraphSpec(Kind.DECODER, Kind.DECODER, inputs, (TensorSpec("image", image, "float32"),))


def graph_specs(config: ECARConfig, fuse_flow_loop: bool = False) -> list[GraphSpec]:
    """Every graph of a build, in the order a request first calls them."""
    flow = flow_loop_spec(config) if fuse_flow_loop else flow_step_spec(config)
    return [backbone_spec(config), flow, decoder_spec(config)]


def decoder_batch(config: ECARConfig) -> int:
    """How many images one decoder call takes at most (the plan's ``decoder_batch``; results are the same)."""
    widest = config.tokenizer_channels[0] if config.tokenizer_channels else config.tokenizer_width
    return plan_module.decoder_batch_for(widest, config.image_size, config.image_size)


@lru_cache(maxsize=64)
def request_plan(config: ECARConfig) -> RequestPlan:
    """ECAR's request plan: its stage grids, KV-cache rows, Euler times and guidance ramp, always guided."""
    tokens = config.tokens_per_stage
    ramp = schedule.cfg_ramp(config)
    stages = []
    start = 0
    for index, st in enumerate(schedule.stages(config)):
        emitted = 0 if index == len(tokens) - 1 else st.tokens  # the last stage's cache nobody reads
        stages.append(
            StagePlan(
                tokens=st.tokens,
                prev_tokens=tokens[index - 1] if index else 1,
                cache_start=start,
                emitted=emitted,
                times=tuple(f32(t) for t in st.times),
                ramp=ramp[index],
            )
        )
        start += emitted
    return RequestPlan(
        stages=tuple(stages),
        channels=config.latent_channels,
        cfg=float(config.cfg_scale),
        guidance_below=None,
        decoder_batch=decoder_batch(config),
    )


@lru_cache(maxsize=256)
def _stage_inputs(config: ECARConfig, stage: int) -> tuple[tuple[str, np.ndarray], ...]:
    st = schedule.stages(config)[stage - 1]
    plan = request_plan(config).stage(stage)
    n = st.tokens
    if st.prev_grid is None:  # stage 1: x = noise, no upsampled input
        up = np.zeros((n, 1), np.float32)
        fresh = np.eye(n, dtype=np.float32)
        coefficients = (0.0, 1.0)
    else:
        up = st.up().astype(np.float32)
        fresh = st.fresh().astype(np.float32)
        coefficients = schedule.renoise_coefficients(st.factor, st.tau_prev)
    start = sum(config.tokens_per_stage[: stage - 1])
    arrays: dict[str, np.ndarray] = {
        "up": up,
        "fresh": fresh,
        "renoise": np.asarray(coefficients, np.float32),
        "positions": np.arange(start, start + n, dtype=np.int64),
        "level": np.array([stage - 1], np.int64),
        "kv_tokens": np.arange(plan.emitted, dtype=np.int64),
    }
    for array in arrays.values():
        array.setflags(write=False)
    return tuple(arrays.items())


def stage_inputs(config: ECARConfig, stage: int) -> dict[str, np.ndarray]:
    """The backbone's stage constants at a 1-based stage (read-only arrays).

    ``up`` [N, P] nearest upsampling and ``fresh`` [N, N] = I - U·D (:mod:`ecar_export.families.ecar.schedule`),
    ``renoise`` the two coefficients of :func:`ecar_export.families.ecar.schedule.renoise`, ``positions`` the
    stage's rows of the position table, ``level`` its index, ``kv_tokens`` the tokens whose
    keys/values it emits. Stage 1: ``up`` one zero column, ``fresh`` the identity and
    coefficients (0, 1), so its start state is its noise.
    """
    return dict(_stage_inputs(config, stage))


def stage_constants(config: ECARConfig) -> dict[str, np.ndarray]:
    """Every stage constant of an ECAR build, by file key (:func:`runtime.stage_constants.key`)."""
    return {
        key(Kind.BACKBONE, stage, name): array
        for stage in range(1, config.num_stages + 1)
        for name, array in stage_inputs(config, stage).items()
    }


@lru_cache(maxsize=64)
def constants(config: ECARConfig) -> StageConstants:
    """:func:`stage_constants` as the runtime reads them from a build."""
    return StageConstants(stage_constants(config))
