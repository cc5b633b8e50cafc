"""The shared torch reference (``ecar_export.torch_walk``): the runtime's request walk over a model's graphs."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ecar_export.torch_walk import TorchWalk
from runtime.graphs import Kind


def test_the_walk_is_ecars_own_sampler(tiny_config, perturbed_model, rng: np.random.Generator) -> None:  # type: ignore[no-untyped-def]
    """Same labels, seed and guidance: the walk's latents and images are ``ECAR.sample``'s."""
    model = perturbed_model(tiny_config(), seed=int(rng.integers(1 << 31)))
    labels = rng.integers(0, model.config.num_classes, size=int(rng.integers(1, 4)))
    seed, cfg = int(rng.integers(1 << 31)), float(rng.uniform(1.0, 4.0))
    ref = model.sample(labels, seed=seed, cfg=cfg)
    got = TorchWalk(model).generate(labels, seed=seed, cfg=cfg)
    torch.testing.assert_close(got.latents, ref.latents, rtol=0, atol=1e-6)
    torch.testing.assert_close(got.images, ref.images, rtol=0, atol=1e-6)
    # and another seed is another request
    other = TorchWalk(model).generate(labels, seed=seed + 1, cfg=cfg)
    assert float((other.latents - ref.latents).abs().max()) > 1e-3


def test_given_functions_answer_every_call_of_the_plan(tiny_config, perturbed_model, rng: np.random.Generator) -> None:  # type: ignore[no-untyped-def]
    """Swapped-in functions (as torch.compile's) are what the walk calls, once per call of the plan."""
    model = perturbed_model(tiny_config(), seed=int(rng.integers(1 << 31)))
    eager = TorchWalk.eager_functions(model)
    calls: list[Kind] = []

    def counted(kind: Kind) -> Any:
        def run(*inputs: torch.Tensor) -> Any:
            calls.append(kind)
            return eager[kind](*inputs)

        return run

    walk = TorchWalk(model, {kind: counted(kind) for kind in eager})
    result = walk.generate([0, 1], seed=3)
    assert calls == [Kind(call.graph) for call in walk.plan.calls()]
    torch.testing.assert_close(result.latents, TorchWalk(model).generate([0, 1], seed=3).latents, rtol=0, atol=0)
