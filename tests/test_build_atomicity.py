"""Builds are atomic and cached: killed builds never hurt the previous build, unchanged graphs are reused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import make_perturbed_model, make_tiny_config

from ecar_export import checkpoint
from ecar_export.build import build_engines
from runtime import manifest as manifest_io
from runtime.errors import ECARError, ManifestError
from runtime.pipeline import Pipeline

ECAR_EXPORT = Path(sys.executable).parent / "ecar-export"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two different tiny checkpoints: the 'old' build's and the 'new' one's."""
    folder = tmp_path_factory.mktemp("ckpts")
    old, new = folder / "old.safetensors", folder / "new.safetensors"
    checkpoint.save(make_perturbed_model(make_tiny_config(), seed=21), old)
    checkpoint.save(make_perturbed_model(make_tiny_config(), seed=22), new)
    return old, new


def _images(directory: Path) -> np.ndarray:
    return Pipeline.from_dir(directory, backend="onnxruntime", device="cpu").generate([1, 4, 7], seed=9).images


def _build_cmd(ckpt: Path, out: Path, *extra: str) -> list[str]:
    return [
        str(ECAR_EXPORT),
        "build",
        "--checkpoint",
        str(ckpt),
        "--out",
        str(out),
        "--backend",
        "onnxruntime",
        "--max-batch",
        "4",
        *extra,
    ]


def test_killed_builds_leave_the_previous_build_working(checkpoints: tuple[Path, Path], tmp_path: Path) -> None:
    old, new = checkpoints
    engines = tmp_path / "engines"
    subprocess.run(_build_cmd(old, engines), check=True, capture_output=True)
    before = _images(engines)
    manifest_before = (engines / "manifest.json").read_bytes()
    # how long a full build of the new checkpoint takes, to spread the kills over it
    probe = tmp_path / "probe"
    start = time.perf_counter()
    subprocess.run(_build_cmd(new, probe), check=True, capture_output=True)
    duration = time.perf_counter() - start
    moments = np.linspace(0.05, 0.95, 12) * duration
    for delay in moments:
        process = subprocess.Popen(
            _build_cmd(new, engines, "--force"),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        time.sleep(float(delay))
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        # whatever moment it died, the directory loads: the old build, or (if it got that far) the new one
        manifest = manifest_io.load(engines)
        images = _images(engines)
        if (engines / "manifest.json").read_bytes() == manifest_before:
            np.testing.assert_array_equal(images, before)
        else:
            assert manifest.checkpoint_sha256 == manifest_io.load(probe).checkpoint_sha256
            np.testing.assert_array_equal(images, _images(probe))
            break  # the new build committed; later kills would test the new build instead


def test_a_killed_first_build_is_never_loadable(checkpoints: tuple[Path, Path], tmp_path: Path) -> None:
    old, _ = checkpoints
    for delay in (0.5, 1.5, 3.0):
        engines = tmp_path / f"fresh-{delay}"
        process = subprocess.Popen(
            _build_cmd(old, engines), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        time.sleep(delay)
        finished = process.poll() is not None
        if not finished:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        if not finished:
            with pytest.raises(ManifestError):
                Pipeline.from_dir(engines, backend="onnxruntime", device="cpu")
    # a later build into such a directory clears the leftovers and succeeds
    subprocess.run(_build_cmd(old, tmp_path / "fresh-0.5"), check=True, capture_output=True)
    assert not list((tmp_path / "fresh-0.5").glob(".staging-*"))
    _images(tmp_path / "fresh-0.5")


def test_unchanged_graphs_are_reused_and_force_rebuilds(checkpoints: tuple[Path, Path], tmp_path: Path) -> None:
    old, new = checkpoints
    engines = tmp_path / "engines"
    build_engines(old, engines, max_batch=4)
    first = json.loads((engines / "manifest.json").read_text())
    files = {name: record["file"] for name, record in first["graphs"].items()}
    mtimes = {name: (engines / f).stat().st_mtime_ns for name, f in files.items()}
    start = time.perf_counter()
    build_engines(old, engines, max_batch=4)
    reuse_seconds = time.perf_counter() - start
    second = json.loads((engines / "manifest.json").read_text())
    assert all(record["reused"] for record in second["graphs"].values())
    assert {name: record["file"] for name, record in second["graphs"].items()} == files
    assert {name: (engines / f).stat().st_mtime_ns for name, f in files.items()} == mtimes
    build_engines(old, engines, max_batch=4, force=True)
    forced = json.loads((engines / "manifest.json").read_text())
    assert not any(record["reused"] for record in forced["graphs"].values())
    # same inputs, same graph bytes
    assert {name: record["sha256"] for name, record in forced["graphs"].items()} == {
        name: record["sha256"] for name, record in first["graphs"].items()
    }
    build_engines(new, engines, max_batch=4)  # other weights: nothing reusable
    third = json.loads((engines / "manifest.json").read_text())
    assert not any(record["reused"] for record in third["graphs"].values())
    assert reuse_seconds < 5.0


def test_a_second_build_into_the_same_directory_is_refused(checkpoints: tuple[Path, Path], tmp_path: Path) -> None:
    import fcntl

    old, _ = checkpoints
    engines = tmp_path / "engines"
    engines.mkdir()
    with open(engines / ".build.lock", "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(ECARError, match="another build"):
            build_engines(old, engines, max_batch=4)
