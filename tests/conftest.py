"""Shared fixtures: tiny model configs and deterministically perturbed models.

Everything here is sized to run in milliseconds on a CPU: tests build many models.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from runtime.config import ECARConfig

# Tests share the machine with other work; one intra-op thread keeps runs light and deterministic.
torch.set_num_threads(1)

TINY_DEFAULTS: dict[str, Any] = {
    "name": "tiny",
    "image_size": 8,
    "image_channels": 1,
    "latent_size": 4,
    "latent_channels": 4,
    "tokenizer_width": 8,
    "scales": (1, 2, 4),
    "width": 32,
    "depth": 2,
    "heads": 2,
    "mlp_ratio": 2.0,
    "head_width": 32,
    "head_depth": 1,
    "num_classes": 10,
    "cfg_scale": 2.0,
}


def make_tiny_config(**overrides: Any) -> ECARConfig:
    """A small valid :class:`ECARConfig`; ``steps`` defaults to two Euler steps per stage."""
    values = {**TINY_DEFAULTS, **overrides}
    values.setdefault("steps", (2,) * len(values["scales"]))
    return ECARConfig(**values)


def make_perturbed_model(config: ECARConfig, seed: int = 0, scale: float = 0.1) -> Any:
    """An ECAR model built under ``torch.manual_seed(seed)`` with every parameter perturbed.

    Fresh models have zero-initialised AdaLN gates and output layers (their flow head
    predicts u = 0), which would make sampler comparisons vacuous; the perturbation
    makes every sub-network contribute. Returned in eval mode.
    """
    from ecar_export.model import ECAR

    torch.manual_seed(seed)
    model = ECAR(config)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * scale)
    return model.eval()


@pytest.fixture
def tiny_config() -> Callable[..., ECARConfig]:
    return make_tiny_config


@pytest.fixture
def perturbed_model() -> Callable[..., Any]:
    return make_perturbed_model
