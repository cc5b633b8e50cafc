"""ECAR's multistage flow schedule (DESIGN §3) and the per-sample noise (DESIGN §4).

This module is the single home of the schedule's formulas. The torch reference
model, the exported graphs and ECAR's build data (:mod:`ecar_export.families.ecar.contract`) call these
functions.
Resampling between stage grids is expressed as small constant matrices acting on
the token axis (``tokens [.., N, C]``, row-major over the r×r grid), so every
formula here is written with ``@``, ``*``, ``+`` and ``-`` only and works unchanged
on numpy arrays and on torch tensors (the caller passes matrices of its own kind).

The per-sample noise is :mod:`runtime.noise`'s: stage by stage for s = 1..S, one array
``standard_normal((r_s * r_s, C), dtype=float32)`` per sample, ``ε_1`` for the first stage and
``η_s`` for every later one. The runtime's request path uses none of this module: the build
writes what it needs as data (:mod:`ecar_export.families.ecar.contract`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from ecar_export.families.ecar.config import ECARConfig
from runtime import noise
from runtime.noise import MAX_SEED, check_keys, noise_keys  # noqa: F401  (the export side's imports)
from runtime.plan import check_cfg  # noqa: F401

A = Any  # a numpy array or a torch tensor: the formulas below use only @, *, + and -


# ----------------------------------------------------------------- time windows
def start_time(factor: int, tau_prev: float) -> float:
    """Corrected start time t'_s of a stage whose window opens at tau_{s-1} (t'_1 = 1)."""
    if tau_prev >= 1.0:
        return 1.0
    return factor * tau_prev / (1.0 - tau_prev + factor * tau_prev)


def time_grid(t_start: float, t_end: float, steps: int) -> np.ndarray:
    """The ``steps + 1`` times of a uniform Euler grid from t_start down to t_end (float64)."""
    return np.linspace(t_start, t_end, steps + 1, dtype=np.float64)


# ------------------------------------------------------------ grid resampling
def down_matrix(r_from: int, r_to: int) -> np.ndarray:
    """[r_to², r_from²] block-mean (area) downsampling of a row-major token grid."""
    factor = r_from // r_to
    if factor * r_to != r_from:
        raise ValueError(f"grid {r_from} is not a multiple of {r_to}")
    rows = np.arange(r_from) // factor
    parent = (rows[:, None] * r_to + rows[None, :]).reshape(-1)
    matrix = np.zeros((r_to * r_to, r_from * r_from), dtype=np.float64)
    matrix[parent, np.arange(r_from * r_from)] = 1.0 / (factor * factor)
    return matrix


def up_matrix(r_from: int, r_to: int) -> np.ndarray:
    """[r_to², r_from²] nearest upsampling: each token copied to an f×f block."""
    factor = r_to // r_from
    return down_matrix(r_to, r_from).T * (factor * factor)


def fresh_matrix(r_prev: int, r: int) -> np.ndarray:
    """[r², r²] operator I - U·D: the part of a grid-r field invisible at grid r_prev."""
    return np.eye(r * r) - up_matrix(r_prev, r) @ down_matrix(r, r_prev)


# ------------------------------------------------------------- stage formulas
def chain_noise(prev_eps: A, eta: A, up: Any, fresh: Any, factor: int) -> A:
    """ε_s = (1/f)·U(ε_{s-1}) + (η_s - U(D(η_s))): white noise at the finer grid."""
    return (up @ prev_eps) * (1.0 / factor) + fresh @ eta


def start_state(clean_prev: A | None, eps: A, up: Any, t_start: float) -> A:
    """Training start point P_s = (1 - t'_s)·U(D_{s-1}x) + t'_s·ε_s (P_1 = ε_1)."""
    if clean_prev is None:
        return eps
    return (up @ clean_prev) * (1.0 - t_start) + eps * t_start


def end_state(clean: A, eps: A, tau: float) -> A:
    """Training end point Q_s = (1 - τ_s)·D_s x + τ_s·ε_s."""
    return clean * (1.0 - tau) + eps * tau


def renoise_coefficients(factor: int, tau_prev: float) -> tuple[float, float]:
    """(a, b) of the renoising P_s = a·U(Q_{s-1}) + b·(I - U·D)·η_s: 1/denom and f·τ_{s-1}/denom."""
    denom = 1.0 - tau_prev + factor * tau_prev
    return 1.0 / denom, factor * tau_prev / denom


def renoise_with(prev_end: A, eta: A, up: Any, fresh: Any, a: A | float, b: A | float) -> A:
    """P_s = a·(U @ Q_{s-1}) + b·(fresh @ η_s), the coefficients given (the exported graphs take them as inputs)."""
    return (up @ prev_end) * a + (fresh @ eta) * b


def renoise(prev_end: A, eta: A, up: Any, fresh: Any, factor: int, tau_prev: float) -> A:
    """Inference start P_s from the previous stage's end state Q_{s-1} and fresh η_s."""
    a, b = renoise_coefficients(factor, tau_prev)
    return renoise_with(prev_end, eta, up, fresh, a, b)


def interpolate(start: A, end: A, lam: A | float) -> A:
    """x(t) = (1-λ)·P_s + λ·Q_s, with λ = (t'_s - t)/(t'_s - τ_s)."""
    return start * (1.0 - lam) + end * lam


def velocity(start: A, end: A, t_start: float, tau: float) -> A:
    """Target u = dx/dt = (P_s - Q_s)/(t'_s - τ_s)."""
    return (start - end) * (1.0 / (t_start - tau))


def euler_step(x: A, u: A, dt: A | float) -> A:
    """One Euler step from t to t - dt: x ← x - dt·u."""
    return x - u * dt


def guide(u_cond: A, u_uncond: A, weight: A | float) -> A:
    """Classifier-free guidance: u = u_u + w·(u_c - u_u)."""
    return u_uncond + (u_cond - u_uncond) * weight


# ----------------------------------------------------------- per-stage tables
@dataclass(frozen=True)
class Stage:
    """Everything the samplers need to know about one stage (index 0-based)."""

    index: int
    grid: int
    prev_grid: int | None
    factor: int
    tau_prev: float
    tau: float
    t_start: float
    times: tuple[float, ...]

    @property
    def tokens(self) -> int:
        return self.grid * self.grid

    @property
    def steps(self) -> int:
        return len(self.times) - 1

    def up(self) -> np.ndarray:
        assert self.prev_grid is not None
        return up_matrix(self.prev_grid, self.grid)

    def fresh(self) -> np.ndarray:
        assert self.prev_grid is not None
        return fresh_matrix(self.prev_grid, self.grid)


@lru_cache(maxsize=64)
def stages(config: ECARConfig) -> tuple[Stage, ...]:
    result = []
    bounds = config.window_bounds
    for index, grid in enumerate(config.scales):
        prev_grid = config.scales[index - 1] if index else None
        factor = grid // prev_grid if prev_grid else 1
        tau_prev, tau = float(bounds[index]), float(bounds[index + 1])
        t_start = start_time(factor, tau_prev) if index else 1.0
        times = tuple(float(t) for t in time_grid(t_start, tau, config.steps[index]))
        result.append(Stage(index, grid, prev_grid, factor, tau_prev, tau, t_start, times))
    return tuple(result)


def cfg_ramp(config: ECARConfig) -> tuple[float, ...]:
    """The guidance ramp of each stage (w_s = 1 + (cfg - 1)·ramp_s): 'constant' 1 each, 'linear' (s+1)/S."""
    count = config.num_stages
    if config.cfg_schedule == "linear":
        return tuple((s + 1) / count for s in range(count))
    return tuple(1.0 for _ in range(count))


# --------------------------------------------------------------- noise source
def draw_noise(config: ECARConfig, keys: Sequence[tuple[int, int]]) -> list[np.ndarray]:
    """Noise of a batch, one float32 [B, N_s, C] array per stage (ε_1, then η_2..η_S): :func:`runtime.noise.draw`."""
    return noise.draw(config.tokens_per_stage, config.latent_channels, keys)
