"""The torch reference model: sampler equivalences, batch independence, graph contract, training.

Models are tiny and their weights perturbed (see conftest) so every sub-network contributes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from ecar_export.families.ecar import contract as ecar_contract
from ecar_export.families.ecar import schedule
from ecar_export.families.ecar.config import ECARConfig
from ecar_export.families.ecar.model import ECAR
from runtime.errors import ECARError, InvalidRequestError
from runtime.request import first_prev, new_cache

ConfigFactory = Callable[..., ECARConfig]
ModelFactory = Callable[..., ECAR]

SAMPLER_TOL = 1e-5  # float32, same math in a different order (KV cache vs masked prefix, batch size)

# Configs differing in scales / factors / widths / heads / latent channels.
SAMPLER_CONFIGS: dict[str, dict[str, Any]] = {
    "scales-1-2-4": {},
    "scales-1-3-6-linear-cfg": {
        "image_size": 12,
        "latent_size": 6,
        "latent_channels": 5,
        "scales": (1, 3, 6),
        "window_bounds": (1.0, 0.7, 0.3, 0.0),
        "steps": (2, 3, 2),
        "width": 48,
        "heads": 4,
        "head_width": 24,
        "cfg_schedule": "linear",
        "cfg_scale": 3.0,
    },
    "scales-2-6-rgb": {
        "image_size": 6,
        "latent_size": 6,
        "image_channels": 3,
        "latent_channels": 6,
        "scales": (2, 6),
        "window_bounds": (1.0, 0.45, 0.0),
        "steps": (3, 2),
        "width": 32,
        "heads": 4,
        "depth": 3,
    },
    "single-stage": {
        "latent_channels": 6,
        "scales": (4,),
        "steps": (4,),
        "width": 32,
        "heads": 4,
        "head_depth": 2,
    },
}


@pytest.fixture(params=list(SAMPLER_CONFIGS), ids=list(SAMPLER_CONFIGS))
def sampler_config(request: pytest.FixtureRequest, tiny_config: ConfigFactory) -> ECARConfig:
    return tiny_config(**SAMPLER_CONFIGS[request.param])


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().abs().max())


# ------------------------------------------------------------------ sampling
def test_kv_cache_sampler_equals_masked_prefix_sampler(
    sampler_config: ECARConfig, perturbed_model: ModelFactory
) -> None:
    model = perturbed_model(sampler_config, seed=1)
    labels, seed = [0, 3, 9], 17
    cached = model.sample(labels, seed=seed, use_cache=True)
    masked = model.sample(labels, seed=seed, use_cache=False)
    assert torch.isfinite(cached.latents).all()
    assert float(cached.latents.std()) > 0.1
    assert max_diff(cached.latents, masked.latents) <= SAMPLER_TOL
    assert max_diff(cached.images, masked.images) <= SAMPLER_TOL
    # non-trivial: the network (not just the noise) shapes the output -- same noise, other label
    other = model.sample([5, 3, 9], seed=[17, 17, 17])
    same_noise = model.sample([0, 3, 9], seed=[17, 17, 17])
    assert max_diff(other.latents[0], same_noise.latents[0]) > 1e-2


def _backbone(
    model: Any, stage: int, labels: torch.Tensor, prev: torch.Tensor, noise: torch.Tensor, past: torch.Tensor
):
    return model.backbone_graph(labels, prev, noise, **model.stage_feeds(stage), past_kv=past)


def test_kv_cache_sampler_check_can_fail(perturbed_model: ModelFactory, tiny_config: ConfigFactory) -> None:
    # a cache holding other keys/values changes the next stage by far more than SAMPLER_TOL
    config = tiny_config()
    model = perturbed_model(config, seed=1)
    labels = torch.tensor([2, 4])
    generator = torch.Generator().manual_seed(0)
    eps = torch.randn(2, 1, config.latent_channels, generator=generator)
    eta = torch.randn(2, 4, config.latent_channels, generator=generator)
    prev = torch.randn(2, 1, config.latent_channels, generator=generator)
    plan, spec = ecar_contract.request_plan(config), ecar_contract.backbone_spec(config)
    empty = torch.from_numpy(new_cache(plan, spec, 2))[:0]
    with torch.no_grad():
        _, _, past = _backbone(model, 1, labels, torch.zeros(2, 1, config.latent_channels), eps, empty)
        z, _, _ = _backbone(model, 2, labels, prev, eta, past)
        z_wrong, _, _ = _backbone(model, 2, labels, prev, eta, past + torch.randn(past.shape, generator=generator))
    assert max_diff(z, z_wrong) > 100 * SAMPLER_TOL


def test_sample_is_independent_of_batch_composition(perturbed_model: ModelFactory, tiny_config: ConfigFactory) -> None:
    model = perturbed_model(tiny_config(), seed=2)
    alone = model.sample([7], seed=[11])
    batch = model.sample([3, 7, 5], seed=[4, 11, 9])
    assert float(alone.latents.std()) > 0.1
    assert max_diff(alone.latents[0], batch.latents[1]) <= SAMPLER_TOL
    assert max_diff(alone.images[0], batch.images[1]) <= SAMPLER_TOL
    # a one-sample request with seed s is the same as key (s, 0) in a list-seeded batch
    assert max_diff(model.sample([7], seed=11).latents[0], batch.latents[1]) <= SAMPLER_TOL
    # int seed: sample i has key (seed, i); a shorter batch with the same seed shares keys (5, 0), (5, 1)
    three = model.sample([1, 8, 2], seed=5)
    two = model.sample([1, 8], seed=5)
    assert max_diff(three.latents[:2], two.latents) <= SAMPLER_TOL
    assert max_diff(three.latents[0], model.sample([1], seed=[5]).latents[0]) <= SAMPLER_TOL
    # ... and distinct indices get distinct noise: (5, 0) and (5, 1) with equal labels differ
    twins = model.sample([4, 4], seed=5)
    assert max_diff(twins.latents[0], twins.latents[1]) > 0.1
    # sample i == 2 of the int-seeded batch is reproduced by drawing its key (5, 2) alone
    keys = schedule.noise_keys(5, 3)
    assert keys[2] == (5, 2)
    alone_noise = schedule.draw_noise(model.config, [keys[2]])
    batch_noise = schedule.draw_noise(model.config, keys)
    for stage_noise, stage_batch in zip(alone_noise, batch_noise, strict=True):
        np.testing.assert_array_equal(stage_noise[0], stage_batch[2])


def test_sample_is_deterministic_and_seed_dependent(perturbed_model: ModelFactory, tiny_config: ConfigFactory) -> None:
    model = perturbed_model(tiny_config(), seed=3)
    a = model.sample([1, 2], seed=42)
    b = model.sample([1, 2], seed=42)
    c = model.sample([1, 2], seed=43)
    assert torch.equal(a.latents, b.latents)
    assert max_diff(a.latents, c.latents) > 0.1


def test_sample_output_contract(sampler_config: ECARConfig, perturbed_model: ModelFactory) -> None:
    model = perturbed_model(sampler_config, seed=4)
    labels = np.array([1, 0])
    result = model.sample(labels, seed=[8, 9], cfg=1.5)
    size, ch = sampler_config.image_size, sampler_config.image_channels
    assert result.images.shape == (2, ch, size, size)
    assert result.images.dtype == torch.float32
    assert result.latents.shape == (2, sampler_config.latent_size**2, sampler_config.latent_channels)
    assert result.latents.dtype == torch.float32
    assert torch.isfinite(result.images).all()
    assert float(result.images.min()) >= 0.0 and float(result.images.max()) <= 1.0
    assert float(result.images.std()) > 1e-4
    # the images are the decoder applied to the latents
    assert max_diff(model.decode_tokens(result.latents), result.images) <= SAMPLER_TOL
    # torch labels are accepted too
    again = model.sample(torch.tensor([1, 0]), seed=[8, 9], cfg=1.5)
    assert torch.equal(again.latents, result.latents)


@pytest.mark.parametrize(
    "labels",
    [
        [10],
        [-1],
        [],
        [1, 11],
        [1.0],
        [1.5],
        ["3"],
        [True],
        [None],
        np.array([0.5]),
        torch.tensor([1.0]),
        np.array([], dtype=np.int64),
    ],
    ids=repr,
)
def test_sample_rejects_bad_labels(labels: Any, perturbed_model: ModelFactory, tiny_config: ConfigFactory) -> None:
    model = perturbed_model(tiny_config(num_classes=10))
    with pytest.raises(InvalidRequestError) as info:
        model.sample(labels, seed=0)
    assert isinstance(info.value, ValueError) and isinstance(info.value, ECARError)


def test_sample_rejects_bad_seed_and_cfg(perturbed_model: ModelFactory, tiny_config: ConfigFactory) -> None:
    model = perturbed_model(tiny_config())
    with pytest.raises(InvalidRequestError):
        model.sample([1, 2], seed=[1])
    with pytest.raises(InvalidRequestError):
        model.sample([1], seed=-3)
    with pytest.raises(InvalidRequestError):
        model.sample([1], seed=0, cfg=float("nan"))


# ------------------------------------------------------------ graph contract
def test_backbone_graph_contract(sampler_config: ECARConfig, perturbed_model: ModelFactory) -> None:
    """One backbone serves every stage: shapes per stage, renoising, and the token-major cache it grows."""
    config = sampler_config
    model = perturbed_model(config, seed=5)
    batch = 3
    labels = torch.tensor([0, 4, 9])
    noise = schedule.draw_noise(config, schedule.noise_keys(3, batch))
    plan = ecar_contract.request_plan(config)
    cache = torch.from_numpy(new_cache(plan, ecar_contract.backbone_spec(config), batch))
    offsets = [stage.cache_start for stage in plan.stages] + [plan.cache_rows]
    prev = torch.from_numpy(first_prev(plan, batch))
    seen = 0
    with torch.no_grad():
        for st in schedule.stages(config):
            stage = st.index + 1
            eta = torch.from_numpy(noise[st.index])
            past = cache[: offsets[st.index]]
            assert past.shape[0] == seen
            z, x, kv = _backbone(model, stage, labels, prev, eta, past)
            assert z.shape == (2 * batch, st.tokens, config.width)
            assert x.shape == (batch, st.tokens, config.latent_channels)
            emitted = 0 if stage == config.num_stages else st.tokens
            kv_shape = (emitted, config.depth, 2, 2 * batch, config.heads, config.head_dim)
            assert kv.shape == kv_shape, "the last stage emits no cache"
            if st.prev_grid is None:
                assert torch.equal(x, eta)  # P_1 = ε_1
            else:
                up, fresh = st.up(), st.fresh()
                want = schedule.renoise(prev.double().numpy(), eta.double().numpy(), up, fresh, st.factor, st.tau_prev)
                np.testing.assert_allclose(x.numpy(), want, rtol=0, atol=1e-5)
            cache[offsets[st.index] : offsets[st.index] + emitted] = kv
            seen += emitted
            prev = torch.randn(batch, st.tokens, config.latent_channels)  # any end state will do
    assert seen == offsets[-1] == config.total_tokens - config.tokens_per_stage[-1]


def test_the_backbones_cache_equals_the_block_causal_prefix(
    sampler_config: ECARConfig, perturbed_model: ModelFactory
) -> None:
    """A stage run against the cached keys/values equals the whole prefix under the block-causal mask."""
    config = sampler_config
    model = perturbed_model(config, seed=8)
    cached = model.sample([3, 1], seed=[5, 6])
    uncached = model.sample([3, 1], seed=[5, 6], use_cache=False)
    assert max_diff(cached.latents, uncached.latents) <= SAMPLER_TOL


def test_flow_step_contract(perturbed_model: ModelFactory, tiny_config: ConfigFactory) -> None:
    config = tiny_config()
    model = perturbed_model(config, seed=6)
    tokens = 7
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(tokens, config.latent_channels, generator=generator)
    z = torch.randn(2 * tokens, config.width, generator=generator)
    t, dt, cfg = torch.tensor([0.6]), torch.tensor([0.15]), torch.tensor([2.5])
    with torch.no_grad():
        out = model.flow_step(x, z, t, dt, cfg)
        u = model.head(torch.cat([x, x]), z, t)
    assert out.shape == x.shape
    guided = u[tokens:] + 2.5 * (u[:tokens] - u[tokens:])
    assert max_diff(out, x - 0.15 * guided) <= 1e-5
    assert max_diff(out, x) > 1e-3


# ---------------------------------------------------------------- training
def smooth_images(count: int, size: int, channels: int, generator: torch.Generator) -> torch.Tensor:
    """Random smooth patterns in [0, 1]: bilinear upsampled coarse noise plus a random gradient."""
    coarse = torch.randn(count, channels, 3, 3, generator=generator)
    smooth = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=True)
    ramp = torch.linspace(-1.0, 1.0, size)
    slope = torch.randn(count, channels, 1, 1, generator=generator)
    return torch.sigmoid(1.5 * smooth + slope * ramp[None, None, :, None])


def evaluate(model: ECAR, images: torch.Tensor, labels: torch.Tensor, seeds: tuple[int, ...]) -> float:
    losses = []
    with torch.no_grad():
        for seed in seeds:
            torch.manual_seed(seed)  # the loss's own randomness (time, noise, class dropout), like for like
            losses.append(float(model.training_loss(images, labels, head_repeats=2)))
    return float(np.mean(losses))


def train_steps(model: ECAR, images: torch.Tensor, labels: torch.Tensor, steps: int, lr: float) -> list[float]:
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        loss = model.training_loss(images, labels, head_repeats=2)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


EVAL_SEEDS = (1000, 1001, 1002)


def build_trainee(config: ECARConfig, images: torch.Tensor) -> ECAR:
    """A fresh model whose latent_scale makes the (random) tokenizer's latents unit-variance, as train_demo does."""
    torch.manual_seed(0)
    model = ECAR(config)
    with torch.no_grad():
        std = float(model.tokenizer.encode(images).std())
    assert std > 1e-3
    model.config = config.replace(latent_scale=1.0 / std)
    with torch.no_grad():
        assert abs(float(model.encode_tokens(images).std()) - 1.0) < 1e-3
    model.tokenizer.requires_grad_(False)
    return model


def test_training_reduces_loss(tiny_config: ConfigFactory) -> None:
    config = tiny_config()
    generator = torch.Generator().manual_seed(1)
    images = smooth_images(16, config.image_size, config.image_channels, generator)
    labels = torch.randint(0, config.num_classes, (16,), generator=generator)
    model = build_trainee(config, images)
    assert float(images.std()) > 0.1
    before = evaluate(model, images, labels, EVAL_SEEDS)
    assert before == evaluate(model, images, labels, EVAL_SEEDS)  # the evaluation is deterministic
    torch.manual_seed(0)
    losses = train_steps(model, images, labels, steps=30, lr=3e-3)
    after = evaluate(model, images, labels, EVAL_SEEDS)
    assert all(np.isfinite(losses))
    assert np.isfinite(before) and before > 0.1
    assert after <= 0.8 * before, (before, after)  # at least a 20 % decrease
    # the running training losses (each with its own randomness) agree: last 3 vs first 3
    assert np.mean(losses[-3:]) <= 0.8 * np.mean(losses[:3]), losses


def test_single_stage_config_trains_and_samples(tiny_config: ConfigFactory) -> None:
    config = tiny_config(scales=(4,), steps=(3,), latent_channels=6, heads=4)
    assert config.num_stages == 1 and config.window_bounds == (1.0, 0.0)
    generator = torch.Generator().manual_seed(2)
    images = smooth_images(8, config.image_size, config.image_channels, generator)
    labels = torch.randint(0, config.num_classes, (8,), generator=generator)
    model = build_trainee(config, images)
    before = evaluate(model, images, labels, EVAL_SEEDS)
    torch.manual_seed(0)
    losses = train_steps(model, images, labels, steps=12, lr=3e-3)
    after = evaluate(model, images, labels, EVAL_SEEDS)
    assert all(np.isfinite(losses))
    assert after <= 0.8 * before, (before, after)  # at least a 20 % decrease
    model.eval()
    result = model.sample([0, 5], seed=3)
    assert result.images.shape == (2, 1, config.image_size, config.image_size)
    assert result.latents.shape == (2, 16, 6)
    assert torch.isfinite(result.images).all() and torch.isfinite(result.latents).all()
    assert float(result.latents.std()) > 0.1
