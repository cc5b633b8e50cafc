"""The reference sampling loop of FlowAR (the authors' ``sample_tokens`` with their Euler sampler).

Per stage k: run the backbone on the stage input, draw fresh noise at the stage's own resolution,
integrate the flow ODE from t = 1 (noise) to t = 0 (data) with Euler steps, and feed the sampled
tokens (conditional rows) to the next stage. With guidance the batch is ``[conditional; null class]``
rows; the guidance weight ramps linearly from 1 at the first stage to ``cfg`` at the last and applies
only at steps with ``t <= guidance``, where the conditional state drives both halves. The ODE state,
the time grid and the guidance combination are float64, the networks float32, as in the reference.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ecar_export.families.flowar.head import FlowHead
from ecar_export.families.flowar.layers import KVCache
from ecar_export.families.flowar.model import FlowAR

UNIFORM_STEPS = 50  # the reference uses a uniform grid for exactly this step count


def time_grid(steps: int) -> torch.Tensor:
    """The float64 times ``1 = t_0 > ... > t_K = 0`` of the reference sampler.

    50 steps: uniform. Otherwise ``steps // 2`` points from 1 to 0.3, then ``steps // 2 + 1`` points from
    0.25 to 0 (25 steps give 24 Euler steps, finer below t = 0.3).
    """
    if steps == UNIFORM_STEPS:
        return torch.linspace(1, 0, steps + 1, dtype=torch.float64)
    return torch.cat(
        [
            torch.linspace(1, 0.3, steps // 2, dtype=torch.float64),
            torch.linspace(0.25, 0, steps // 2 + 1, dtype=torch.float64),
        ]
    )


def stage_cfg(cfg: float, stage: int, num_stages: int) -> float:
    """Guidance weight of ``stage``: 1 at the first stage, ``cfg`` at the last, linear in between."""
    return (cfg - 1) * stage / (num_stages - 1) + 1 if num_stages > 1 else cfg


def euler(
    head: FlowHead, noise: torch.Tensor, z: torch.Tensor, steps: int, cfg: float, guidance: float
) -> torch.Tensor:
    """Integrate one stage: noise and z ``[rows, N, ·]`` (rows ``[conditional; null]`` when guided) -> float64
    tokens at t = 0."""
    grid = time_grid(steps)
    x = noise.to(torch.float64)
    half = x.shape[0] // 2
    for t_cur, t_next in zip(grid[:-1], grid[1:]):
        guided = cfg > 1.0 and 0.0 <= t_cur <= guidance
        inputs = torch.cat([x[:half], x[:half]]) if guided else x
        t = torch.full((inputs.shape[0],), float(t_cur), dtype=torch.float64)
        v = head(inputs.float(), t.float(), z.float()).to(torch.float64)
        if guided:
            v_cond, v_null = v.chunk(2)
            v = v_null + cfg * (v_cond - v_null)
            v = torch.cat([v, v])
        x = x + (t_next - t_cur) * v
    return x


@dataclass
class SampleResult:
    latents: torch.Tensor  # [B, token_dim, grid, grid] float32, still times latent_scale (divide before decoding)
    z: list[torch.Tensor]  # backbone output per stage, [rows, N_k, width]
    tokens: list[torch.Tensor]  # Euler result per stage, all rows, float64 [rows, N_k, token_dim]


def noise_shapes(model: FlowAR, batch: int, cfg: float) -> list[tuple[int, int, int]]:
    """Shapes of the per-stage noise ``sample`` draws (rows double with guidance)."""
    rows = batch if cfg == 1.0 else 2 * batch
    return [(rows, n, model.config.token_dim) for n in model.config.tokens_per_stage]


@torch.no_grad()
def sample(
    model: FlowAR,
    labels: torch.Tensor,
    *,
    steps: int | None = None,
    cfg: float | None = None,
    guidance: float | None = None,
    noise: Sequence[torch.Tensor] | None = None,
    generator: torch.Generator | None = None,
) -> SampleResult:
    """Generate the token grids of ``labels`` ``[B]``; settings default to the model config's.

    ``noise`` gives each stage's starting noise (shapes from :func:`noise_shapes`); otherwise it is drawn
    from ``generator``, stage by stage, as the reference draws it. ``cfg == 1`` runs without null-class rows
    (the reference cannot run that setting).
    """
    config = model.config
    steps = config.steps if steps is None else steps
    cfg = config.cfg if cfg is None else cfg
    guidance = config.guidance if guidance is None else guidance
    batch = labels.shape[0]
    shapes = noise_shapes(model, batch, cfg)
    if noise is not None and [tuple(n.shape) for n in noise] != shapes:
        raise ValueError(f"noise shapes {[tuple(n.shape) for n in noise]} do not match the stages' {shapes}")
    if cfg != 1.0:
        labels = torch.cat([labels, torch.full_like(labels, config.null_class)])
    cond = model.class_embedding(labels)
    x = cond[:, None]
    cache: list[KVCache] | None = None
    sampled = torch.empty(0)
    result = SampleResult(latents=torch.empty(0), z=[], tokens=[])
    for stage, shape in enumerate(shapes):
        if stage > 0:
            x = model.stage_input(sampled.repeat(shape[0] // batch, 1, 1), stage)
        z, cache = model(x, cond, stage, cache)
        eps = noise[stage] if noise is not None else torch.randn(shape, generator=generator)
        tokens = euler(model.flownet, eps, z, steps, stage_cfg(cfg, stage, config.num_stages), guidance)
        sampled = tokens.float()[:batch]
        result.z.append(z)
        result.tokens.append(tokens)
    side = config.grid
    result.latents = sampled.reshape(batch, side, side, config.token_dim).permute(0, 3, 1, 2)
    return result
