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

:func:`stage_constants` gives a stage's constant inputs by name (numpy, read-only), :func:`stage_plan`
the numbers the runtime feeds the flow steps (times, step sizes, guidance weights), and :func:`walk`
runs a request through the two graph functions exactly as a runtime does, so that the graphs can be
checked against the reference sampler (:mod:`ecar_export.families.flowar.sampler`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from ecar_export.families.flowar.backbone import area_matrix, bicubic_matrix
from ecar_export.families.flowar.config import HEAD_HEAD_DIM, FlowARConfig
from ecar_export.families.flowar.layers import RoPE2D
from ecar_export.families.flowar.model import FlowAR
from ecar_export.families.flowar.sampler import stage_cfg, time_grid
from runtime.graphs import GraphSpec, Kind, TensorSpec

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


def stage_dims(config: FlowARConfig, stage: int, batch: int) -> dict[str, int]:
    """Every symbolic dim at a 1-based stage and batch size."""
    tokens = config.tokens_per_stage
    n = tokens[stage - 1]
    return {
        "B": batch,
        "2B": 2 * batch,
        "N": n,
        "P": tokens[stage - 2] if stage > 1 else 1,
        "T": sum(tokens[: stage - 1]),
        "E": 0 if stage == config.num_stages else n,
    }


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


def stage_constants(config: FlowARConfig, stage: int) -> dict[str, np.ndarray]:
    """The constant inputs of a 1-based stage, by input name (read-only arrays), for both graphs.

    Backbone (:data:`BACKBONE_CONSTANTS`): ``up`` (:func:`up_matrix`), ``positions`` the stage's rows
    ``start..end-1`` of the position tables, ``level`` ``[stage - 1]``, ``rope_cos`` / ``rope_sin`` the
    backbone attention's 2-D rotary tables ``[N, width / heads]``, ``kv_tokens`` ``0..N-1`` (empty at the
    last stage). Flow step (:data:`FLOW_STEP_CONSTANTS`): the head's rotary tables ``[N, 64]``.
    """
    return dict(_stage_constants(config, stage))


# ------------------------------------------------------------------ the flow steps' numbers
@dataclass(frozen=True)
class StagePlan:
    """What the runtime feeds the flow steps of one stage.

    ``weight``: the stage's guidance weight w_s = 1 + (cfg - 1)·(stage - 1)/(S - 1); ``t`` / ``dt``
    ``[K]`` float32: each step's time on the reference grid (:func:`sampler.time_grid`) and
    ``t - t_next`` (taken in float64, then rounded); ``cfg`` ``[K]`` float32: the weight each step is
    fed, w_s where the reference guides (``w_s > 1 and 0 <= t <= guidance``, t the float64 time), else 1.
    """

    stage: int
    weight: float
    guidance: float
    t: np.ndarray
    dt: np.ndarray
    cfg: np.ndarray


def stage_plan(
    config: FlowARConfig,
    stage: int,
    *,
    steps: int | None = None,
    cfg: float | None = None,
    guidance: float | None = None,
) -> StagePlan:
    """The flow steps' inputs at a 1-based stage; settings default to the config's."""
    steps = config.steps if steps is None else steps
    cfg = config.cfg if cfg is None else cfg
    guidance = config.guidance if guidance is None else guidance
    grid = time_grid(steps).numpy()
    weight = stage_cfg(cfg, stage - 1, config.num_stages)
    guided = (weight > 1.0) & (grid[:-1] >= 0.0) & (grid[:-1] <= guidance)
    return StagePlan(
        stage=stage,
        weight=weight,
        guidance=guidance,
        t=grid[:-1].astype(np.float32),
        dt=(grid[:-1] - grid[1:]).astype(np.float32),
        cfg=np.where(guided, weight, 1.0).astype(np.float32),
    )


def request_plan(
    config: FlowARConfig, *, steps: int | None = None, cfg: float | None = None, guidance: float | None = None
) -> tuple[StagePlan, ...]:
    """:func:`stage_plan` of every stage, in order."""
    return tuple(
        stage_plan(config, stage, steps=steps, cfg=cfg, guidance=guidance) for stage in range(1, config.num_stages + 1)
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

    ``noise`` holds each stage's noise ``[B, N, C]`` (:func:`noise_shapes`). Per stage: the backbone on
    the previous stage's result (stage 1: one zero token) and the cache so far, its kv appended to the
    cache; then the flow steps of :func:`stage_plan`, each fed the last one's ``x_next``. Every graph is
    called with its inputs gathered by name in its spec's order.
    """
    config = model.config
    label_array = np.asarray(labels, dtype=np.int64)
    batch = len(label_array)
    if [tuple(n.shape) for n in noise] != noise_shapes(config, batch):
        raise ValueError(
            f"noise shapes {[n.shape for n in noise]} do not match the stages' {noise_shapes(config, batch)}"
        )
    backbone, flow = backbone_spec(config), flow_step_spec(config)
    prev = torch.zeros(batch, 1, config.token_dim)
    past = torch.zeros(kv_shape_concrete(config, 0, batch))
    plans = request_plan(config, steps=steps, cfg=cfg, guidance=guidance)
    for stage, plan in enumerate(plans, start=1):
        constants = {name: torch.from_numpy(np.array(a)) for name, a in stage_constants(config, stage).items()}
        feeds = {
            "labels": torch.from_numpy(label_array),
            "prev": prev,
            "noise": torch.from_numpy(np.asarray(noise[stage - 1], np.float32)),
            "past_kv": past,
            **constants,
        }
        z, x, kv = model.backbone_graph(*(feeds[name] for name in backbone.input_names()))
        past = torch.cat([past, kv])
        for t, dt, weight in zip(plan.t, plan.dt, plan.cfg):
            step = {"x": x, "z": z, "t": _scalar(t), "dt": _scalar(dt), "cfg": _scalar(weight), **constants}
            x = model.flow_step(*(step[name] for name in flow.input_names()))
        prev = x
    return prev


def kv_shape_concrete(config: FlowARConfig, tokens: int, batch: int) -> tuple[int, ...]:
    return (tokens, layers(config), 2, 2 * batch, config.heads, config.head_dim)


def _scalar(value: np.floating) -> torch.Tensor:
    return torch.tensor([value], dtype=torch.float32)
