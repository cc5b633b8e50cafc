"""The multistage flow schedule (DESIGN §3) and the per-sample noise contract (DESIGN §4).

Resampling is checked against an independent reshape-based implementation; the
stage formulas against DESIGN's equations written out here in float64.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from ecar_export.families.ecar import contract as ecar_contract
from ecar_export.families.ecar import schedule
from ecar_export.families.ecar.config import ECARConfig
from runtime.errors import ECARError, InvalidRequestError

ConfigFactory = Callable[..., ECARConfig]

TIGHT = 1e-12  # float64 identities
RENOISE_TOL = 1e-6  # DESIGN: renoise equals the training start state up to rounding


# ------------------------------------------------------ independent reference
def block_mean(x: np.ndarray, r_to: int, factor: int) -> np.ndarray:
    """[N_from, C] row-major grid -> [r_to², C] f×f block means (reshape, not matrices)."""
    channels = x.shape[-1]
    return x.reshape(r_to, factor, r_to, factor, channels).mean(axis=(1, 3)).reshape(-1, channels)


def nearest_up(x: np.ndarray, r_from: int, factor: int) -> np.ndarray:
    """[r_from², C] -> [(r_from·f)², C] with every value copied to an f×f block."""
    channels = x.shape[-1]
    grid = x.reshape(r_from, r_from, channels)
    return np.repeat(np.repeat(grid, factor, axis=0), factor, axis=1).reshape(-1, channels)


def design_start_time(factor: int, tau_prev: float) -> float:
    return factor * tau_prev / (1.0 - tau_prev + factor * tau_prev)


@pytest.fixture
def chain_config(tiny_config: ConfigFactory) -> ECARConfig:
    """Factors 2 and 3 and non-uniform windows."""
    return tiny_config(
        image_size=12, latent_size=6, scales=(1, 2, 6), window_bounds=(1.0, 0.82, 0.37, 0.0), steps=(3, 2, 4)
    )


# ------------------------------------------------------------------ time
@pytest.mark.parametrize("factor", [2, 3, 4])
def test_start_time_matches_design_formula(factor: int) -> None:
    rng = np.random.default_rng(factor)
    for tau_prev in rng.uniform(0.01, 0.99, size=50):
        got = schedule.start_time(factor, float(tau_prev))
        want = factor * tau_prev / (1.0 - tau_prev + factor * tau_prev)
        assert abs(got - want) <= TIGHT
        # a stage restarts noisier than where the previous stage stopped, but below pure noise
        assert tau_prev < got < 1.0
    assert schedule.start_time(factor, 1.0) == 1.0
    assert schedule.start_time(factor, 0.0) == 0.0


def test_stage_table_times(chain_config: ECARConfig) -> None:
    stages = schedule.stages(chain_config)
    bounds = chain_config.window_bounds
    assert len(stages) == 3
    assert stages[0].t_start == 1.0  # t'_1 = 1
    for st in stages:
        assert st.tau_prev == bounds[st.index]
        assert st.tau == bounds[st.index + 1]
        if st.index:
            assert st.factor == chain_config.scales[st.index] // chain_config.scales[st.index - 1]
            assert abs(st.t_start - design_start_time(st.factor, st.tau_prev)) <= TIGHT
        times = np.array(st.times)
        assert len(times) == chain_config.steps[st.index] + 1 == st.steps + 1
        assert times[0] == pytest.approx(st.t_start, abs=TIGHT)
        assert times[-1] == pytest.approx(st.tau, abs=TIGHT)
        gaps = -np.diff(times)
        np.testing.assert_allclose(gaps, (st.t_start - st.tau) / st.steps, rtol=0, atol=TIGHT)
    assert [st.factor for st in stages] == [1, 2, 3]
    assert stages[-1].times[-1] == 0.0


def test_time_grid() -> None:
    grid = schedule.time_grid(0.9, 0.25, 5)
    assert grid.dtype == np.float64
    np.testing.assert_allclose(grid, [0.9, 0.77, 0.64, 0.51, 0.38, 0.25], rtol=0, atol=TIGHT)


# ------------------------------------------------------------ resampling
@pytest.mark.parametrize(("r_to", "factor"), [(1, 2), (2, 2), (3, 2), (1, 3), (2, 3), (4, 3)])
def test_down_and_up_matrices_match_reshape_reference(r_to: int, factor: int) -> None:
    rng = np.random.default_rng(100 * r_to + factor)
    r_from = r_to * factor
    channels = 3
    fine = rng.standard_normal((r_from * r_from, channels))
    coarse = rng.standard_normal((r_to * r_to, channels))
    down = schedule.down_matrix(r_from, r_to)
    up = schedule.up_matrix(r_to, r_from)
    assert down.shape == (r_to * r_to, r_from * r_from)
    assert up.shape == (r_from * r_from, r_to * r_to)
    np.testing.assert_allclose(down @ fine, block_mean(fine, r_to, factor), rtol=0, atol=TIGHT)
    np.testing.assert_allclose(up @ coarse, nearest_up(coarse, r_to, factor), rtol=0, atol=TIGHT)
    # D·U = I (upsampling loses nothing); U·D is the block-mean projection
    np.testing.assert_allclose(down @ up, np.eye(r_to * r_to), rtol=0, atol=TIGHT)
    fresh = schedule.fresh_matrix(r_to, r_from)
    np.testing.assert_allclose(fresh, np.eye(r_from**2) - up @ down, rtol=0, atol=TIGHT)
    np.testing.assert_allclose(block_mean(fresh @ fine, r_to, factor), 0.0, rtol=0, atol=TIGHT)
    np.testing.assert_allclose(fresh @ fresh, fresh, rtol=0, atol=TIGHT)


def test_down_matrix_composes_and_refuses_non_multiples() -> None:
    rng = np.random.default_rng(7)
    fine = rng.standard_normal((36, 2))
    direct = schedule.down_matrix(6, 1) @ fine
    np.testing.assert_allclose(direct, fine.mean(axis=0, keepdims=True), rtol=0, atol=TIGHT)
    via = schedule.down_matrix(2, 1) @ (schedule.down_matrix(6, 2) @ fine)
    np.testing.assert_allclose(direct, via, rtol=0, atol=TIGHT)
    with pytest.raises(ValueError):
        schedule.down_matrix(6, 4)


# ------------------------------------------------------------ stage formulas
def test_renoise_reproduces_training_start_state(chain_config: ECARConfig) -> None:
    rng = np.random.default_rng(2024)
    full = chain_config.latent_size
    channels = chain_config.latent_channels
    stages = schedule.stages(chain_config)
    for trial in range(5):
        clean = rng.standard_normal((full * full, channels)) * rng.uniform(0.5, 2.0) + rng.standard_normal(channels)
        eps = rng.standard_normal((stages[0].tokens, channels))
        clean_prev = schedule.down_matrix(full, stages[0].grid) @ clean
        end_prev = schedule.end_state(clean_prev, eps, stages[0].tau)
        np.testing.assert_allclose(schedule.start_state(None, eps, None, 1.0), eps, rtol=0, atol=0)
        for st in stages[1:]:
            eta = rng.standard_normal((st.tokens, channels))
            up, fresh = st.up(), st.fresh()
            prev_grid, factor = st.prev_grid, st.factor
            assert prev_grid is not None
            # DESIGN's ε_s written out with the reshape reference
            eps_ref = nearest_up(eps, prev_grid, factor) / factor + (
                eta - nearest_up(block_mean(eta, prev_grid, factor), prev_grid, factor)
            )
            eps = schedule.chain_noise(eps, eta, up, fresh, factor)
            assert np.max(np.abs(eps - eps_ref)) <= TIGHT
            trained = schedule.start_state(clean_prev, eps, up, st.t_start)
            renoised = schedule.renoise(end_prev, eta, up, fresh, factor, st.tau_prev)
            assert np.max(np.abs(renoised - trained)) <= RENOISE_TOL, (trial, st.index)
            # and DESIGN's P_s written out with the reshape reference
            design = (1 - st.t_start) * nearest_up(clean_prev, prev_grid, factor) + st.t_start * eps_ref
            assert np.max(np.abs(renoised - design)) <= RENOISE_TOL
            assert np.std(renoised) > 0.1
            clean_prev = schedule.down_matrix(full, st.grid) @ clean
            end_prev = schedule.end_state(clean_prev, eps, st.tau)
        # the last stage ends at tau_S = 0: its end state is the clean latent
        np.testing.assert_allclose(end_prev, clean, rtol=0, atol=TIGHT)


def test_renoise_check_can_fail(chain_config: ECARConfig) -> None:
    # with an independent η (or the wrong tau) the two start states differ clearly
    rng = np.random.default_rng(5)
    st = schedule.stages(chain_config)[2]
    channels = chain_config.latent_channels
    clean_prev = rng.standard_normal((st.prev_grid**2, channels))
    eps_prev = rng.standard_normal((st.prev_grid**2, channels))
    eta = rng.standard_normal((st.tokens, channels))
    up, fresh = st.up(), st.fresh()
    eps = schedule.chain_noise(eps_prev, eta, up, fresh, st.factor)
    end_prev = schedule.end_state(clean_prev, eps_prev, st.tau_prev)
    trained = schedule.start_state(clean_prev, eps, up, st.t_start)
    other = schedule.renoise(end_prev, rng.standard_normal(eta.shape), up, fresh, st.factor, st.tau_prev)
    assert np.max(np.abs(other - trained)) > 0.1
    wrong_tau = schedule.renoise(end_prev, eta, up, fresh, st.factor, st.tau_prev * 0.9)
    assert np.max(np.abs(wrong_tau - trained)) > 1e-3


def _chain(samples: np.ndarray, etas: list[np.ndarray], scales: tuple[int, ...], correct: bool) -> list[np.ndarray]:
    """Run a batch [n, N_1] of ε_1 through the chain; returns ε_s [n, N_s] for every stage."""
    eps = samples
    out = [eps]
    for prev_grid, grid, eta in zip(scales[:-1], scales[1:], etas, strict=True):
        factor = grid // prev_grid
        up = schedule.up_matrix(prev_grid, grid)
        fresh = schedule.fresh_matrix(prev_grid, grid) if correct else np.eye(grid * grid)
        # tokens are rows in the schedule's convention: [N, C] with C = the n Monte-Carlo samples
        eps = schedule.chain_noise(eps.T, eta.T, up, fresh, factor).T
        out.append(eps)
    return out


def _whiteness_errors(eps: np.ndarray, grid: int, factor: int) -> dict[str, float]:
    mean = eps.mean(axis=0)
    centred = eps - mean
    cov = centred.T @ centred / (len(eps) - 1)
    off = cov - np.diag(np.diag(cov))
    block = np.arange(grid) // factor
    parent = (block[:, None] * grid + block[None, :]).reshape(-1)  # same-block positions share a parent
    same_block = (parent[:, None] == parent[None, :]) & ~np.eye(grid * grid, dtype=bool)
    return {
        "mean": float(np.max(np.abs(mean))),
        "var": float(np.max(np.abs(np.diag(cov) - 1.0))),
        "off": float(np.max(np.abs(off))),
        "block": float(np.max(np.abs(cov[same_block]))),
    }


def test_noise_chain_is_white() -> None:
    rng = np.random.default_rng(11)
    n = 20000
    scales = (1, 2, 6)  # factors 2 and 3
    eps1 = rng.standard_normal((n, 1))
    etas = [rng.standard_normal((n, r * r)) for r in scales[1:]]
    chain = _chain(eps1, etas, scales, correct=True)
    for stage, (grid, eps) in enumerate(zip(scales, chain, strict=True)):
        assert eps.shape == (n, grid * grid)
        if stage == 0:
            continue
        errors = _whiteness_errors(eps, grid, grid // scales[stage - 1])
        # sampling std: mean ~0.007, variance ~0.01, covariance ~0.007 for n = 20000
        assert errors["mean"] <= 0.05, errors
        assert errors["var"] <= 0.05, errors
        assert errors["off"] <= 0.05, errors
        assert errors["block"] <= 0.05, errors
    # the same statistics catch a chain without the fresh-noise correction (η added raw)
    broken = _chain(eps1, etas, scales, correct=False)
    errors = _whiteness_errors(broken[2], 6, 3)
    assert errors["var"] > 0.05 and errors["block"] > 0.05, errors


# ---------------------------------------------------------------- noise
def reference_noise(config: ECARConfig, key: tuple[int, int]) -> list[np.ndarray]:
    """DESIGN §4's documented drawing order, written out independently."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([key[0], key[1]])))
    return [rng.standard_normal((r * r, config.latent_channels), dtype=np.float32) for r in config.scales]


def test_draw_noise_follows_documented_order(chain_config: ECARConfig) -> None:
    keys = [(123, 0), (123, 1), (9, 4), (2**63 - 1, 2)]
    noise = schedule.draw_noise(chain_config, keys)
    assert len(noise) == chain_config.num_stages
    for s, grid in enumerate(chain_config.scales):
        assert noise[s].shape == (len(keys), grid * grid, chain_config.latent_channels)
        assert noise[s].dtype == np.float32
    for i, key in enumerate(keys):
        for s, want in enumerate(reference_noise(chain_config, key)):
            np.testing.assert_array_equal(noise[s][i], want)
    # fresh, non-trivial noise that differs between samples
    assert np.std(noise[2]) > 0.5
    assert not np.array_equal(noise[2][0], noise[2][1])


def test_draw_noise_per_sample_independent_of_batch(chain_config: ECARConfig) -> None:
    keys = [(4, 0), (11, 0), (11, 3), (5, 7), (0, 1)]
    batch = schedule.draw_noise(chain_config, keys)
    for i, key in enumerate(keys):
        alone = schedule.draw_noise(chain_config, [key])
        for s in range(chain_config.num_stages):
            assert alone[s].shape[0] == 1
            np.testing.assert_array_equal(alone[s][0], batch[s][i])
    reordered = schedule.draw_noise(chain_config, keys[::-1])
    for s in range(chain_config.num_stages):
        np.testing.assert_array_equal(reordered[s], batch[s][::-1])


def test_noise_keys_int_and_list() -> None:
    assert schedule.noise_keys(5, 3) == [(5, 0), (5, 1), (5, 2)]
    assert schedule.noise_keys([4, 11, 9], 3) == [(4, 0), (11, 0), (9, 0)]
    assert schedule.noise_keys((7,), 1) == [(7, 0)]
    assert schedule.noise_keys(np.int64(6), 2) == [(6, 0), (6, 1)]
    assert schedule.noise_keys([np.int32(3)], 1) == [(3, 0)]
    assert schedule.noise_keys(0, 1) == [(0, 0)]
    assert schedule.noise_keys(2**63 - 1, 1) == [(2**63 - 1, 0)]
    # int seed s, sample i == list seed form of its key only for i == 0
    config = ECARConfig(image_size=4, latent_size=4, scales=(1, 2, 4), steps=(1, 1, 1))
    by_int = schedule.draw_noise(config, schedule.noise_keys(21, 2))
    by_list = schedule.draw_noise(config, schedule.noise_keys([21, 21], 2))
    for s in range(3):
        np.testing.assert_array_equal(by_int[s][0], by_list[s][0])
        np.testing.assert_array_equal(by_list[s][0], by_list[s][1])
        assert not np.array_equal(by_int[s][1], by_list[s][1])


@pytest.mark.parametrize(
    ("seed", "batch"),
    [
        (-1, 1),
        (2**63, 1),
        (True, 1),
        (np.bool_(False), 1),
        (1.0, 1),
        (np.float64(2.0), 1),
        ("3", 1),
        (b"3", 1),
        (None, 1),
        ([1, 2], 3),
        ([1, 2, 3], 2),
        ([], 1),
        ([1, -2], 2),
        ([1, 2**63], 2),
        ([1, True], 2),
        ([1, 2.5], 2),
        ([1, "2"], 2),
    ],
    ids=repr,
)
def test_noise_keys_rejects_bad_seeds(seed: object, batch: int) -> None:
    with pytest.raises(InvalidRequestError) as info:
        schedule.noise_keys(seed, batch)  # type: ignore[arg-type]
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, ECARError)
    assert "seed" in str(info.value)


# ---------------------------------------------------------------- guidance
def cfg_weights(config: ECARConfig, cfg: float | None = None) -> tuple[float, ...]:
    """The stage weights an ECAR build's plan gives ``cfg`` (its ramp from the config's cfg_schedule)."""
    return ecar_contract.request_plan(config).weights(cfg)


def test_cfg_weights_constant(tiny_config: ConfigFactory) -> None:
    config = tiny_config(cfg_scale=2.5, cfg_schedule="constant")
    assert schedule.cfg_ramp(config) == (1.0, 1.0, 1.0)
    assert cfg_weights(config) == (2.5, 2.5, 2.5)
    assert cfg_weights(config, 4.0) == (4.0, 4.0, 4.0)
    assert cfg_weights(config, 0) == (0.0, 0.0, 0.0)


@pytest.mark.parametrize("scales", [(1, 2, 4), (1, 2, 4, 8), (8,)])
@pytest.mark.parametrize("cfg", [3.0, 0.5])
def test_cfg_weights_linear_ramps_to_cfg(tiny_config: ConfigFactory, scales: tuple[int, ...], cfg: float) -> None:
    side = scales[-1]
    config = tiny_config(image_size=side, latent_size=side, scales=scales, cfg_schedule="linear", cfg_scale=1.7)
    weights = cfg_weights(config, cfg)
    count = len(scales)
    assert len(weights) == count
    assert weights[-1] == pytest.approx(cfg, abs=TIGHT)
    expected = [1.0 + (cfg - 1.0) * (s + 1) / count for s in range(count)]
    np.testing.assert_allclose(weights, expected, rtol=0, atol=TIGHT)
    if count > 1:
        np.testing.assert_allclose(np.diff(weights), (cfg - 1.0) / count, rtol=0, atol=TIGHT)
    # the config default is used when cfg is None
    assert cfg_weights(config)[-1] == pytest.approx(1.7, abs=TIGHT)


@pytest.mark.parametrize("cfg", [float("nan"), float("inf"), -float("inf"), np.float64("nan"), True, "2.0", [2.0]])
def test_cfg_weights_rejects_non_finite(tiny_config: ConfigFactory, cfg: object) -> None:
    with pytest.raises(InvalidRequestError):
        cfg_weights(tiny_config(), cfg)  # type: ignore[arg-type]


# ------------------------------------------------- small helpers of the flow
def test_interpolate_velocity_euler_are_consistent() -> None:
    rng = np.random.default_rng(3)
    start, end = rng.standard_normal((2, 16, 4))
    t_start, tau = 0.8, 0.3
    u = schedule.velocity(start, end, t_start, tau)
    # exact Euler integration of the straight path from t_start to tau in any number of steps
    x = start.copy()
    times = schedule.time_grid(t_start, tau, 7)
    for t, t_next in zip(times, times[1:], strict=False):
        lam = (t_start - t) / (t_start - tau)
        np.testing.assert_allclose(x, schedule.interpolate(start, end, lam), rtol=0, atol=1e-12)
        x = schedule.euler_step(x, u, t - t_next)
    np.testing.assert_allclose(x, end, rtol=0, atol=1e-12)
    u_c, u_u = rng.standard_normal((2, 16, 4))
    np.testing.assert_allclose(schedule.guide(u_c, u_u, 1.0), u_c, rtol=0, atol=TIGHT)
    np.testing.assert_allclose(schedule.guide(u_c, u_u, 0.0), u_u, rtol=0, atol=0)
    np.testing.assert_allclose(schedule.guide(u_c, u_u, 3.0), u_u + 3.0 * (u_c - u_u), rtol=0, atol=TIGHT)
