"""Values that parse but are absurd, and a build that commits while a reader loads it.

Each test here failed on the runtime before it learned these cases (an ``OverflowError`` or
``TypeError`` out of ``generate``, black images from a guidance scale that overflows float32,
a load that raced a rebuild read as a broken build). The CLI and checkpoint cases live in the
failure table (tests/test_error_table.py); the HTTP ones in tests/test_serving.py.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import BuildCache

from runtime import Pipeline
from runtime import manifest as manifest_io
from runtime.backends import selection
from runtime.errors import ECARError, EngineError, InvalidRequestError, ManifestError
from runtime.graphs import Call, Kind

TINY = "tiny-1-2-4"


@pytest.fixture(scope="module")
def pipe(build_cache: BuildCache) -> Pipeline:
    return Pipeline.from_dir(build_cache.get(TINY).dir, backend="onnxruntime", threads=1)


@pytest.mark.parametrize(
    ("labels", "fragment"),
    [
        (3, "labels must be a list of integers, got 3"),
        (None, "labels must be a list of integers, got None"),
        (np.array(3), "labels must be a list of integers"),
        (np.zeros((2, 2), dtype=np.int64), "labels must be a list of integers"),
        ("12", "labels must be a list of integers, got '12'"),
        ([1, 10**5000], "label <an integer of about 5,001 digits> is"),
    ],
)
def test_labels_that_are_not_a_list_of_classes_are_refused(pipe: Pipeline, labels: Any, fragment: str) -> None:
    with pytest.raises(InvalidRequestError, match=fragment) as caught:
        pipe.generate(labels, seed=1)
    assert isinstance(caught.value, ValueError)


@pytest.mark.parametrize("cfg", [10**400, 1e308, -1e39, 3.5e38, 101, float("inf"), float("nan")])
def test_guidance_scales_outside_the_float32_safe_range_are_refused(pipe: Pipeline, cfg: float) -> None:
    with pytest.raises(InvalidRequestError, match=r"cfg must be a finite number in \[-100, 100\]") as caught:
        pipe.generate([1, 2], seed=3, cfg=cfg)
    assert isinstance(caught.value, ValueError)


def test_the_edges_of_the_cfg_range_run(pipe: Pipeline) -> None:
    for cfg in (-100, 100.0):
        result = pipe.generate([1], seed=3, cfg=cfg)
        assert np.isfinite(result.latents).all()


def test_too_many_samples_in_one_call_are_refused_before_any_work(pipe: Pipeline) -> None:
    from runtime.pipeline import MAX_SAMPLES

    calls: list[Call] = []
    original = pipe.backend.run
    pipe.backend.run = lambda call, feeds: calls.append(call) or original(call, feeds)  # type: ignore[method-assign]
    try:
        with pytest.raises(InvalidRequestError, match="at most 10,000"):
            pipe.generate_many([1] * (MAX_SAMPLES + 1), seed=0)
    finally:
        del pipe.backend.run  # type: ignore[method-assign]
    assert calls == []


class _Poisoned:
    """A backend whose flow output of one stage comes back NaN (an engine whose numbers overflowed)."""

    def __init__(self, inner: Any, stage: int) -> None:
        self.inner, self.stage = inner, stage

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def run(self, call: Call, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        outputs = self.inner.run(call, feeds)
        decoder = self.stage == 0 and call.graph == Kind.DECODER  # stage 0: the decoder's pixels
        if decoder or (call.stage == self.stage and call.graph != Kind.BACKBONE and call.ends_stage):
            poisoned = np.array(outputs[0], dtype=np.float32)
            poisoned.flat[len(poisoned.flat) // 2] = np.inf if decoder else np.nan  # one bad value is enough
            outputs = [poisoned, *outputs[1:]]
        return list(outputs)


@pytest.mark.parametrize("stage", [1, 2])
def test_non_finite_latents_are_an_error_naming_the_stage(pipe: Pipeline, stage: int) -> None:
    poisoned = Pipeline(pipe.manifest, _Poisoned(pipe.backend, stage))  # type: ignore[arg-type]
    with pytest.raises(EngineError, match=f"stage {stage} produced non-finite latents"):
        poisoned.generate([1, 2], seed=4)


def test_a_decoder_that_overflows_is_an_error_not_a_black_image(pipe: Pipeline) -> None:
    """An fp16 VAE whose GroupNorm overflowed gives inf/NaN pixels, which uint8 conversion would turn into
    black or white pixels without a word; the pipeline refuses them instead."""
    poisoned = Pipeline(pipe.manifest, _Poisoned(pipe.backend, 0))  # type: ignore[arg-type]
    with pytest.raises(EngineError, match="the decoder produced non-finite pixels"):
        poisoned.generate([1, 2], seed=4)
    assert pipe.generate([1, 2], seed=4).images.shape[0] == 2  # the healthy pipeline is untouched


# ---------------------------------------------------------------------------------- a rebuild
def _commit(source: Path, target: Path) -> None:
    """What a build's commit does to ``target``: the new graph files, then the manifest, the old files swept."""
    for old in target.iterdir():
        if old.name != manifest_io.MANIFEST_NAME:
            old.unlink()
    for item in source.iterdir():
        if item.name != manifest_io.MANIFEST_NAME:
            shutil.copy2(item, target / item.name)
    shutil.copy2(source / manifest_io.MANIFEST_NAME, target / manifest_io.MANIFEST_NAME)


def test_a_build_committed_during_the_load_is_loaded_instead(
    build_cache: BuildCache, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old, new = build_cache.get(TINY), build_cache.get(TINY, fuse_flow_loop=True)
    engines = shutil.copytree(old.dir, tmp_path / "engines")
    real_open = selection.open_backend
    opened: list[str] = []

    def racing_open(manifest: Any, *args: Any) -> Any:
        opened.append(manifest_io.committed_digest(engines) or "")
        if len(opened) == 1:  # the rebuild commits between the manifest check and the session load
            _commit(new.dir, engines)
            raise ECARError("ONNX Runtime cannot load graph 'backbone': External data path does not exist")
        return real_open(manifest, *args)

    monkeypatch.setattr(selection, "open_backend", racing_open)
    pipe = Pipeline.from_dir(engines, backend="onnxruntime", threads=1)
    assert len(opened) == 2 and opened[0] != opened[1]
    assert pipe.manifest.fuse_flow_loop, "the newly committed build was loaded"
    assert np.isfinite(pipe.generate([1], seed=2).latents).all()


def test_a_directory_that_keeps_changing_says_retry(
    build_cache: BuildCache, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    builds = [build_cache.get(TINY, fuse_flow_loop=True), build_cache.get(TINY)]
    engines = shutil.copytree(builds[1].dir, tmp_path / "engines")
    calls = 0

    def always_racing(manifest: Any, *args: Any) -> Any:
        nonlocal calls
        _commit(builds[calls % 2].dir, engines)
        calls += 1
        raise ECARError("External data path does not exist")

    monkeypatch.setattr(selection, "open_backend", always_racing)
    with pytest.raises(ManifestError, match="changed while it was being loaded.*retry"):
        Pipeline.from_dir(engines, backend="onnxruntime")
    assert calls == 2


def test_an_error_of_an_unchanged_build_is_not_retried(
    build_cache: BuildCache, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engines = shutil.copytree(build_cache.get(TINY).dir, tmp_path / "engines")
    calls = 0

    def broken(manifest: Any, *args: Any) -> Any:
        nonlocal calls
        calls += 1
        raise ECARError("this build is broken")

    monkeypatch.setattr(selection, "open_backend", broken)
    with pytest.raises(ECARError, match="this build is broken"):
        Pipeline.from_dir(engines, backend="onnxruntime")
    assert calls == 1
