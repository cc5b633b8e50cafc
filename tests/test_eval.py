"""The quality yardstick and the bundled demo model's quality (torch and engines)."""

from __future__ import annotations

import numpy as np
import pytest

from ecar_export import presets
from ecar_export.data import split
from ecar_export.evaluate import eval_requests, evaluate, frechet_distance, yardstick
from runtime.images import to_uint8

BUNDLED = presets.TRAINED[presets.DEMO]
needs_bundled = pytest.mark.skipif(not BUNDLED.is_file(), reason="bundled ecar-digits checkpoint missing")


def test_frechet_distance_of_known_gaussians() -> None:
    rng = np.random.default_rng(123)
    a = rng.standard_normal((20000, 3))
    shift = np.array([1.0, -2.0, 0.5])
    # same covariance, shifted mean: the distance is |shift|^2 (tolerance for sampling error)
    assert frechet_distance(a, a + shift) == pytest.approx(float(shift @ shift), rel=1e-6)
    b = rng.standard_normal((20000, 3)) * 2.0  # variance 4: trace term 3 * (1 + 4 - 2*2) = 3
    assert frechet_distance(a, b) == pytest.approx(3.0, abs=0.15)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)


def test_yardstick_recognises_real_digits_and_rejects_wrong_labels() -> None:
    stick = yardstick()
    train = split("train")
    pixels = to_uint8(train.images[:300])
    right = stick.score(pixels, train.labels[:300].tolist())
    wrong = stick.score(pixels, ((train.labels[:300] + 1) % 10).tolist())
    assert stick.classifier_accuracy >= 0.9
    assert right.accuracy >= 0.9
    assert wrong.accuracy <= 0.1
    # real digits sit near the floor; noise images are far away
    noise = np.random.default_rng(0).integers(0, 256, size=pixels.shape, dtype=np.uint8)
    assert right.frechet_distance < 3 * stick.floor + 0.5
    assert stick.score(noise, train.labels[:300].tolist()).frechet_distance > 10 * right.frechet_distance


def test_eval_requests_are_batch_independent() -> None:
    labels, seeds = eval_requests(per_class=3, seed=7)
    assert labels == [c for c in range(10) for _ in range(3)]
    assert seeds == list(range(7, 37))


@needs_bundled
def test_bundled_demo_quality() -> None:
    """The shipped checkpoint draws recognisable digits (README reports the 500-sample figures)."""
    model = presets.load(presets.DEMO)

    def sampler(labels: list[int], seeds: list[int]) -> np.ndarray:
        return to_uint8(model.sample(labels, seed=seeds).images.numpy())

    result = evaluate(sampler, per_class=15, seed=1000)
    assert result.samples == 150
    assert result.accuracy >= 0.9
    assert result.frechet_distance < 20 * result.frechet_floor


@needs_bundled
def test_engine_quality_equals_checkpoint(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """`ecar-export eval --engine-dir` and the checkpoint give the same yardstick numbers, same seeds."""
    from ecar_export.build import build_engines
    from runtime.pipeline import Pipeline

    model = presets.load(presets.DEMO)
    build_engines(model, tmp_path / "engines", max_batch=8)
    pipe = Pipeline.from_dir(tmp_path / "engines", backend="onnxruntime", device="cpu")

    def torch_sampler(labels: list[int], seeds: list[int]) -> np.ndarray:
        return to_uint8(model.sample(labels, seed=seeds).images.numpy())

    def engine_sampler(labels: list[int], seeds: list[int]) -> np.ndarray:
        return pipe.generate_many(labels, seed=seeds).images

    reference = evaluate(torch_sampler, per_class=6, seed=3000, batch=60)
    engines = evaluate(engine_sampler, per_class=6, seed=3000, batch=60)
    assert engines.accuracy == reference.accuracy
    assert engines.per_class_accuracy == reference.per_class_accuracy
    assert engines.frechet_distance == pytest.approx(reference.frechet_distance, rel=1e-3)
