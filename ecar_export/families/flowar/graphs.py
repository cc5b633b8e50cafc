"""FlowAR's graphs in the form of graph contract 3, the per-stage data fed to them and a request's walk.

Three graphs serve a whole request, the first two every stage alike:

* ``backbone`` (:meth:`FlowAR.backbone_graph`): inputs ``labels`` int64 ``[B]``, ``prev`` ``[B, P, C]``,
  ``noise`` ``[B, N, C]``, then the stage constants of :data:`BACKBONE_CONSTANTS` — ``up`` ``[N, P]``,
  ``positions`` int64 ``[N]``, ``level`` int64 ``[1]``, ``rope_cos`` / ``rope_sin`` ``[N, Dh]``,
  ``kv_tokens`` int64 ``[E]`` — and last ``past_kv`` ``[T, L, 2, 2B, H, Dh]``; outputs ``z``
  ``[2B, N, D]``, ``x`` ``[B, N, C]`` (the noise: every stage starts at t = 1) and ``kv``
  ``[E, L, 2, 2B, H, Dh]``.
* ``flow_step`` (:meth:`FlowAR.flow_step`): inputs ``x`` ``[B, N, C]``, ``z`` ``[2B, N, D]``, ``t``,
  ``dt``, ``cfg`` ``[1]``, then the stage constants of :data:`FLOW_STEP_CONSTANTS` — ``head_rope_cos``
  / ``head_rope_sin`` ``[N, 64]``; output ``x_next`` ``[B, N, C]``.
* ``decoder`` (:meth:`FlowAR.decode_tokens`), once after the last stage: input ``x`` ``[B, grid², C]`` (row-major
  over the grid, channels last, times ``latent_scale``); output ``image`` ``[B, 3, image_size, image_size]`` in
  [0, 1]; the names and layout of ECAR's decoder graph (:func:`runtime.graphs.decoder_spec`).

C is the token dim, D the backbone width, H its heads, Dh = D / H, L = encoder_depth + decoder_depth;
all float32 unless said. Stages are 1-based here, as in :mod:`runtime.graphs`; FlowAR's own modules
count them from 0 (``level`` = stage - 1).

:func:`stage_inputs` gives a stage's constant inputs by name (numpy, read-only), :func:`stage_constants`
all of them by the stages file's keys, :func:`request_plan` the build's :class:`runtime.plan.RequestPlan`
(token counts, cache rows, every stage's time grid, the guidance ramp and threshold), and :func:`walk`
runs a request through the graph functions with the runtime's own walk (:func:`runtime.request.walk`),
so that the graphs can be checked against the reference sampler (:mod:`ecar_export.families.flowar.sampler`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from ecar_export.families.flowar.backbone import area_matrix, bicubic_matrix
from ecar_export.families.flowar.config import HEAD_HEAD_DIM, FlowARConfig
from ecar_export.families.flowar.layers import RoPE2D
from ecar_export.families.flowar.model import FlowAR
from ecar_export.families.flowar.sampler import time_grid
from runtime.graphs import GraphSpec, Kind, TensorSpec
from runtime.plan import RequestPlan, StagePlan, decoder_batch_for, f32
from runtime.request import RequestInputs
from runtime.stage_constants import key

CONTRACT_VERSION = 3
# The per-stage constant inputs of each graph, in their input order (between noise and past_kv in the
# backbone, after cfg in flow_step). One name space: stage_constants returns both graphs' constants.
BACKBONE_CONSTANTS = ("up", "positions", "level", "rope_cos", "rope_sin", "kv_tokens")
FLOW_STEP_CONSTANTS = ("head_rope_cos", "head_rope_sin")


# ------------------------------------------------------------------ the graphs' inputs and outputs
def layers(config: FlowARConfig) -> int:
    """L: the blocks whose keys/values the cache holds, the encoder's then the decoder's."""
    return config.encoder_depth + config.decoder_depth


def kv_shape(config: FlowARConfig, tokens: int | str) -> tuple[int | str, ...]:
    """The token-major cache layout ``[tokens, L, 2 (keys after RoPE, values), 2B, heads, head_dim]``."""
    return (tokens, layers(config), 2, "2B", config.heads, config.head_dim)


def backbone_spec(config: FlowARConfig) -> GraphSpec:
    c, d, dh = config.token_dim, config.width, config.head_dim
    inputs = (
        TensorSpec("labels", ("B",), "int64"),
        TensorSpec("prev", ("B", "P", c), "float32"),
        TensorSpec("noise", ("B", "N", c), "float32"),
        TensorSpec("up", ("N", "P"), "float32"),
        TensorSpec("positions", ("N",), "int64"),
        TensorSpec("level", (1,), "int64"),
        TensorSpec("rope_cos", ("N", dh), "float32"),
        TensorSpec("rope_sin", ("N", dh), "float32"),
        TensorSpec("kv_tokens", ("E",), "int64"),
        TensorSpec("past_kv", kv_shape(config, "T"), "float32"),
    )
    outputs = (
        TensorSpec("z", ("2B", "N", d), "float32"),
        TensorSpec("x", ("B", "N", c), "float32"),
        TensorSpec("kv", kv_shape(config, "E"), "float32"),
    )
    return GraphSpec(Kind.BACKBONE, Kind.BACKBONE, inputs, outputs)


def flow_step_spec(config: FlowARConfig) -> GraphSpec:
    c, d = config.token_dim, config.width
    inputs = (
        TensorSpec("x", ("B", "N", c), "float32"),
        TensorSpec("z", ("2B", "N", d), "float32"),
        TensorSpec("t", (1,), "float32"),
        TensorSpec("dt", (1,), "float32"),
        TensorSpec("cfg", (1,), "float32"),
        TensorSpec("head_rope_cos", ("N", HEAD_HEAD_DIM), "float32"),
        TensorSpec("head_rope_sin", ("N", HEAD_HEAD_DIM), "float32"),
    )
    return GraphSpec(Kind.FLOW_STEP, Kind.FLOW_STEP, inputs, (TensorSpec("x_next", ("B", "N", c), "float32"),))


def decoder_spec(config: FlowARConfig) -> GraphSpec:
    image = ("B", config.image_channels, config.image_size, config.image_size)
    inputs = (TensorSpec("x", ("B", config.grid * config.grid, config.token_dim), "float32"),)
    return GraphSpec(Kind.DECODER, Kind.DECODER, inputs, (TensorSpec("image", image, "float32"),))


def graph_specs(config: FlowARConfig) -> list[GraphSpec]:
    """The three graphs, in the order a request first calls them."""
    return [backbone_spec(config), flow_step_spec(config), decoder_spec(config)]


def graph_function(model: FlowAR, kind: Kind) -> Callable[..., Any]:
    """The torch function of a graph: its arguments are the graph's inputs in order."""
    functions: dict[Kind, Callable[..., Any]] = {
        Kind.BACKBONE: model.backbone_graph,
        Kind.FLOW_STEP: model.flow_step,
        Kind.DECODER: model.decode_tokens,
    }
    if kind not in functions:
        raise ValueError(f"FlowAR has no graph of kind {kind!r}")
    return functions[kind]


# ------------------------------------------------------------------ per-stage constants
def up_matrix(config: FlowARConfig, stage: int) -> np.ndarray:
    """``[N, P]`` float32: the stage input's resampling of the previous stage's row-major tokens.

    The reference resamples each channel's grid X as ``M X Mᵀ`` (M = area ∘ bicubic, separable), which
    on flattened tokens is ``kron(M, M)``. Stage 1 has no previous stage: one zero (``level`` 0 selects
    the class token there instead).
    """
    if stage == 1:
        return np.zeros((1, 1), np.float32)
    size_in, size_out, via = config.scales[stage - 2], config.scales[stage - 1], config.resample_size
    m = (area_matrix(via, size_out) @ bicubic_matrix(size_in, via)).numpy()
    return np.kron(m, m).astype(np.float32)


@lru_cache(maxsize=64)
def _stage_constants(config: FlowARConfig, stage: int) -> tuple[tuple[str, np.ndarray], ...]:
    if not 1 <= stage <= config.num_stages:
        raise ValueError(f"stage {stage} is not one of 1..{config.num_stages}")
    n = config.tokens_per_stage[stage - 1]
    start, end = config.stage_slices[stage - 1]
    with torch.no_grad():
        cos, sin = RoPE2D(config.head_dim, config.rope_grid).angles(n)
        head_cos, head_sin = RoPE2D(HEAD_HEAD_DIM, config.rope_grid).angles(n)
    arrays = {
        "up": up_matrix(config, stage),
        "positions": np.arange(start, end, dtype=np.int64),
        "level": np.array([stage - 1], np.int64),
        "rope_cos": cos.numpy(),
        "rope_sin": sin.numpy(),
        "kv_tokens": np.arange(0 if stage == config.num_stages else n, dtype=np.int64),
        "head_rope_cos": head_cos.numpy(),
        "head_rope_sin": head_sin.numpy(),
    }
    for array in arrays.values():
        array.setflags(write=False)
    return tuple(arrays.items())


def stage_inputs(config: FlowARConfig, stage: int) -> dict[str, np.ndarray]:
    """The constant inputs of a 1-based stage, by input name (read-only arrays), for both graphs.

    Backbone (:data:`BACKBONE_CONSTANTS`): ``up`` (:func:`up_matrix`), ``positions`` the stage's rows
    ``start..end-1`` of the position tables, ``level`` ``[stage - 1]``, ``rope_cos`` / ``rope_sin`` the
    backbone attention's 2-D rotary tables ``[N, width / heads]``, ``kv_tokens`` ``0..N-1`` (empty at the
    last stage). Flow step (:data:`FLOW_STEP_CONSTANTS`): the head's rotary tables ``[N, 64]``.
    """
    return dict(_stage_constants(config, stage))


def stage_constants(config: FlowARConfig) -> dict[str, np.ndarray]:
    """Every stage constant of a FlowAR build, by the stages file's keys (:func:`runtime.stage_constants.key`)."""
    names = {Kind.BACKBONE: BACKBONE_CONSTANTS, Kind.FLOW_STEP: FLOW_STEP_CONSTANTS}
    return {
        key(graph, stage, name): stage_inputs(config, stage)[name]
        for stage in range(1, config.num_stages + 1)
        for graph, inputs in names.items()
        for name in inputs
    }


# ------------------------------------------------------------------ the request plan
@lru_cache(maxsize=64)
def request_plan(
    config: FlowARConfig, *, steps: int | None = None, cfg: float | None = None, guidance: float | None = None
) -> RequestPlan:
    """FlowAR's request plan (settings default to the config's sampling settings).

    Every stage integrates the reference's whole time grid (:func:`sampler.time_grid`: 1 -> 0, 24 Euler
    steps for 25, or 50 uniform), each time rounded to float32 (the reference steps in float64; dt is
    taken between the float32 times, a difference of at most one float32 ulp per step). Guidance ramps
    ``w_s = 1 + (cfg - 1)(s - 1)/(S - 1)`` (:func:`sampler.stage_cfg`) and applies only at steps with
    ``t <= guidance``. The reference also skips guidance where ``w_s <= 1``; the runtime mixes at ``w_s``
    there, which at ``w_s = 1`` (the first stage) is the conditional velocity itself, so the two differ
    only for a ``cfg`` below 1. Stage s reads the cache rows of stages before it and emits its N_s rows
    (none at the last stage, whose keys nobody reads).
    """
    steps = config.steps if steps is None else steps
    cfg = config.cfg if cfg is None else cfg
    guidance = config.guidance if guidance is None else guidance
    times = tuple(f32(float(t)) for t in time_grid(steps).tolist())
    tokens = config.tokens_per_stage
    stages, start = [], 0
    for index, n in enumerate(tokens):
        emitted = 0 if index == len(tokens) - 1 else n
        ramp = index / (config.num_stages - 1) if config.num_stages > 1 else 1.0  # sampler.stage_cfg's ramp
        stages.append(StagePlan(n, tokens[index - 1] if index else 1, start, emitted, times, ramp))
        start += emitted
    widest = config.tokenizer_channels[0]
    return RequestPlan(
        stages=tuple(stages),
        channels=config.token_dim,
        cfg=float(cfg),
        guidance_below=float(guidance),
        decoder_batch=decoder_batch_for(widest, config.image_size, config.image_size),
    )


# ------------------------------------------------------------------ a request's walk
def noise_shapes(config: FlowARConfig, batch: int) -> list[tuple[int, int, int]]:
    """The ``noise`` input of each stage, ``[B, N, C]``."""
    return [(batch, n, config.token_dim) for n in config.tokens_per_stage]


@torch.no_grad()
def walk(
    model: FlowAR,
    labels: Sequence[int] | np.ndarray,
    noise: Sequence[np.ndarray],
    *,
    steps: int | None = None,
    cfg: float | None = None,
    guidance: float | None = None,
) -> torch.Tensor:
    """Run a request through ``backbone_graph`` and ``flow_step`` as a runtime does -> final latents ``[B, N, C]``.

    ``noise`` holds each stage's noise ``[B, N, C]`` (:func:`noise_shapes`); ``steps``, ``cfg`` and ``guidance``
    override the config's plan. The walk is the shared torch reference (:class:`ecar_export.torch_walk.TorchWalk`:
    the runtime's walk on torch tensors), up to the decoder.
    """
    config = model.config
    label_array = np.asarray(labels, dtype=np.int64)
    batch = len(label_array)
    if [tuple(n.shape) for n in noise] != noise_shapes(config, batch):
        raise ValueError(
            f"noise shapes {[n.shape for n in noise]} do not match the stages' {noise_shapes(config, batch)}"
        )
    from ecar_export.torch_walk import TorchWalk

    plan = request_plan(config, steps=steps, cfg=cfg, guidance=guidance)
    inputs = RequestInputs(label_array, tuple(np.asarray(n, np.float32) for n in noise), plan.weights())
    return TorchWalk(model, plan=plan).run(inputs, decode=False).latents
