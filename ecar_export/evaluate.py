"""The quality yardstick: class accuracy and a Fréchet distance of generated digits.

A small MLP classifier learns the *held-out* half of the real digits (the generator
never saw it). Generated samples are scored by (a) the fraction the classifier assigns
to the requested class and (b) the Fréchet distance between the classifier's hidden
features of generated and held-out real digits. The floor is the same distance between
the generator's training half and the held-out half of the real data.

Every sampler is judged on identical requests: labels 0..9 × ``per_class``, sample
``i`` drawn with its own seed ``seed + i`` (noise key ``(seed + i, 0)``), so the result
does not depend on the batch size or on the backend's batching.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np

from ecar_export.data import split

if TYPE_CHECKING:
    from ecar_export.families.ecar.model import ECAR
    from runtime.pipeline import Pipeline

# (labels, per-sample seeds) -> uint8 images [B, H, W, ch]
Sampler = Callable[[list[int], list[int]], np.ndarray]


def torch_sampler(model: ECAR, cfg: float | None = None) -> Sampler:
    """The torch reference as a sampler: ``model.sample`` with each sample's seed, as uint8 images."""
    from runtime.images import to_uint8

    def sample(labels: list[int], seeds: list[int]) -> np.ndarray:
        return to_uint8(model.sample(labels, seed=seeds, cfg=cfg).images.numpy())

    return sample


def pipeline_sampler(pipe: Pipeline, cfg: float | None = None) -> Sampler:
    """A built engine directory as a sampler: ``Pipeline.generate_many`` with each sample's seed."""

    def sample(labels: list[int], seeds: list[int]) -> np.ndarray:
        return pipe.generate_many(labels, seed=seeds, cfg=cfg).images

    return sample


@dataclass(frozen=True)
class EvalResult:
    samples: int
    accuracy: float
    per_class_accuracy: list[float]
    frechet_distance: float
    frechet_floor: float
    classifier_accuracy_on_real: float

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


class Yardstick:
    def __init__(self) -> None:
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.neural_network import MLPClassifier

        heldout, train = split("heldout"), split("train")
        self.classifier = MLPClassifier(hidden_layer_sizes=(128,), alpha=1e-3, max_iter=600, random_state=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            self.classifier.fit(_flat(heldout.images), heldout.labels)
        self.real_features = self.features(_flat(heldout.images))
        train_x = _flat(train.images)
        self.classifier_accuracy = float(np.mean(self.classifier.predict(train_x) == train.labels))
        self.floor = frechet_distance(self.features(train_x), self.real_features)

    def features(self, flat: np.ndarray) -> np.ndarray:
        weights, bias = self.classifier.coefs_[0], self.classifier.intercepts_[0]
        return np.maximum(flat.astype(np.float64) @ weights + bias, 0.0)

    def score(self, images: np.ndarray, labels: Sequence[int]) -> EvalResult:
        flat = _flat(images.transpose(0, 3, 1, 2).astype(np.float32) / 255.0)
        labels_arr = np.asarray(labels)
        correct = self.classifier.predict(flat) == labels_arr
        per_class = [float(np.mean(correct[labels_arr == c])) for c in range(10) if np.any(labels_arr == c)]
        return EvalResult(
            samples=len(labels_arr),
            accuracy=float(np.mean(correct)),
            per_class_accuracy=per_class,
            frechet_distance=frechet_distance(self.features(flat), self.real_features),
            frechet_floor=self.floor,
            classifier_accuracy_on_real=self.classifier_accuracy,
        )


@lru_cache(maxsize=1)
def yardstick() -> Yardstick:
    return Yardstick()


def eval_requests(per_class: int, seed: int = 0) -> tuple[list[int], list[int]]:
    labels = [c for c in range(10) for _ in range(per_class)]
    return labels, [seed + i for i in range(len(labels))]


def evaluate(
    sampler: Sampler,
    per_class: int = 50,
    seed: int = 0,
    batch: int = 100,
    progress: Callable[[int, int], None] | None = None,
) -> EvalResult:
    labels, seeds = eval_requests(per_class, seed)
    images = []
    for start in range(0, len(labels), batch):
        images.append(sampler(labels[start : start + batch], seeds[start : start + batch]))
        if progress:
            progress(min(start + batch, len(labels)), len(labels))
    return yardstick().score(np.concatenate(images), labels)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (rows are samples)."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root_a = _sqrtm_psd(cov_a)
    cross = _sqrtm_psd(root_a @ cov_b @ root_a)
    return float(np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2.0 * np.trace(cross))


def _sqrtm_psd(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2.0)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def _flat(images: np.ndarray) -> np.ndarray:
    return images.reshape(len(images), -1)
