"""scikit-learn's bundled handwritten digits (1,797 images, 10 classes; no download).

The 8×8 digits are upsampled to 16×16 and split once, deterministically, into the
half the generator trains on and the held-out half the evaluation classifier learns from.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

IMAGE_SIZE = 16
SPLIT_SEED = 0


@dataclass(frozen=True)
class DigitSplit:
    images: np.ndarray  # float32 [N, 1, 16, 16] in [0, 1]
    labels: np.ndarray  # int64 [N]


@lru_cache(maxsize=1)
def _load() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    small = digits.images.astype(np.float64) / 16.0
    return _upsample(small).astype(np.float32)[:, None], digits.target.astype(np.int64)


def _upsample(images: np.ndarray) -> np.ndarray:
    """Bilinear 2× upsampling (half-pixel centres, edge clamped) of [N, 8, 8] images."""
    size = images.shape[-1]
    coords = (np.arange(2 * size) + 0.5) / 2.0 - 0.5
    lo = np.clip(np.floor(coords).astype(int), 0, size - 1)
    hi = np.clip(lo + 1, 0, size - 1)
    frac = np.clip(coords - lo, 0.0, 1.0)
    rows = images[:, lo, :] * (1 - frac)[None, :, None] + images[:, hi, :] * frac[None, :, None]
    return rows[:, :, lo] * (1 - frac)[None, None, :] + rows[:, :, hi] * frac[None, None, :]


def split(name: str) -> DigitSplit:
    """``train`` (the generator's half), ``heldout`` (the classifier's half) or ``all``."""
    images, labels = _load()
    order = np.random.default_rng(SPLIT_SEED).permutation(len(labels))
    half = len(labels) // 2
    chosen = {"train": order[:half], "heldout": order[half:], "all": np.arange(len(labels))}
    if name not in chosen:
        raise ValueError(f"unknown split {name!r}: use train, heldout or all")
    index = np.sort(chosen[name])
    return DigitSplit(images[index], labels[index])
