"""Builds are atomic and cached: a build killed at any of its moments never hurts the previous
build, the next build leaves nothing its manifest does not name, unchanged graphs are reused.

Builds are killed deterministically: ``ECAR_BUILD_KILL_AT=<moment>`` makes ``ecar-export build``
SIGKILL itself at one of its named moments (``ecar_export.build.moment``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import make_perturbed_model, make_tiny_config

from ecar_export import checkpoint, export
from ecar_export.build import KILL_AT, build_engines
from runtime import manifest as manifest_io
from runtime.errors import ECARError, ManifestError
from runtime.graphs import Kind
from runtime.pipeline import Pipeline

TESTS = Path(__file__).resolve().parent
ECAR_EXPORT = Path(sys.executable).parent / "ecar-export"
GRAPHS = ("backbone", "flow_step", "decoder")
# (moment, extra build options): every graph traced, every graph (and its weights) moved in, the
# INT8 capture, a TensorRT plan written (fake TensorRT), everything staged, the manifest committed.
MOMENTS = [
    *[(f"export:{name}", ()) for name in GRAPHS],
    *[(f"placed:{name}", ()) for name in GRAPHS],
    ("calibration:2", ("--precision", "int8")),
    ("plan:backbone", ("--backend", "tensorrt")),
    ("plan:decoder", ("--backend", "tensorrt")),
    ("staged", ()),
    ("committed", ()),
]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two different tiny checkpoints, "a" and "b"."""
    folder = tmp_path_factory.mktemp("ckpts")
    paths = {"a": folder / "a.safetensors", "b": folder / "b.safetensors"}
    for seed, path in zip((21, 22), paths.values()):
        checkpoint.save(make_perturbed_model(make_tiny_config(), seed=seed), path)
    return paths


@pytest.fixture(scope="module")
def expected(checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    """The images each checkpoint's build generates (from reference builds made once)."""
    images = {}
    for key, path in checkpoints.items():
        out = tmp_path_factory.mktemp(f"reference-{key}")
        build_engines(path, out, max_batch=4)
        images[key] = _images(out)
    return images


def _images(directory: Path) -> np.ndarray:
    return Pipeline.from_dir(directory, backend="onnxruntime", device="cpu").generate([1, 4, 7], seed=9).images


def _build_cmd(ckpt: Path, out: Path, *extra: str) -> list[str]:
    command = [str(ECAR_EXPORT)]
    if "tensorrt" in extra:  # the fake TensorRT of tests/fake_tensorrt.py behind the real CLI
        command = [sys.executable, str(TESTS / "fake_tensorrt.py"), "ecar-export"]
    options = [*extra] if "--backend" in extra else [*extra, "--backend", "onnxruntime"]
    return [*command, "build", "--checkpoint", str(ckpt), "--out", str(out), "--max-batch", "4", *options]


def _killed_build(ckpt: Path, out: Path, moment: str, *extra: str) -> None:
    env = {**os.environ, KILL_AT: moment}
    result = subprocess.run(_build_cmd(ckpt, out, *extra), env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == -signal.SIGKILL, f"the build did not die at {moment}: {result.stderr[-2000:]}"


def unnamed_files(out: Path) -> list[str]:
    named = manifest_io.named_files(json.loads((out / manifest_io.MANIFEST_NAME).read_text()))
    return sorted(set(os.listdir(out)) - named)


def _sha(path: Path) -> str:
    from runtime.fileio import sha256_file

    return sha256_file(path)


def test_a_build_killed_at_any_moment_leaves_the_previous_build_and_the_next_build_clean(
    checkpoints: dict[str, Path], expected: dict[str, np.ndarray], tmp_path: Path
) -> None:
    """The directory holds build "a"; builds of "b" are killed at every moment. After each kill
    the directory still loads and generates a's images (b's, after a kill past the commit); the
    next build (of the other weights than the killed build's) leaves no file its manifest does
    not name: the killed build's orphans are gone."""
    assert len(MOMENTS) >= 10
    engines = tmp_path / "engines"
    build_engines(checkpoints["a"], engines, max_batch=4)
    for moment, extra in MOMENTS:
        manifest_before = (engines / "manifest.json").read_bytes()
        _killed_build(checkpoints["b"], engines, moment, *extra)
        manifest = manifest_io.load(engines)
        committed = "b" if moment == "committed" else "a"
        if committed == "b":
            assert manifest.checkpoint_sha256 == _sha(checkpoints["b"]), moment
            assert unnamed_files(engines), "a kill between commit and sweep leaves the old files behind"
        else:
            assert (engines / "manifest.json").read_bytes() == manifest_before, moment
        np.testing.assert_array_equal(_images(engines), expected[committed], err_msg=moment)
        build_engines(checkpoints["a"], engines, max_batch=4)  # other weights than the killed build's
        assert unnamed_files(engines) == [], f"after the build that followed a kill at {moment}"
        np.testing.assert_array_equal(_images(engines), expected["a"], err_msg=moment)


@pytest.mark.parametrize("moment", ["placed:flow_step", "staged"])
def test_a_killed_first_build_is_never_loadable(checkpoints: dict[str, Path], tmp_path: Path, moment: str) -> None:
    engines = tmp_path / "fresh"
    _killed_build(checkpoints["a"], engines, moment)
    assert list(engines.iterdir()), "the killed build wrote nothing: the kill came too early to test anything"
    with pytest.raises(ManifestError, match="holds no complete build"):
        Pipeline.from_dir(engines, backend="onnxruntime", device="cpu")
    build_engines(checkpoints["a"], engines, max_batch=4)  # a later build clears the leftovers
    assert unnamed_files(engines) == []
    _images(engines)


def test_the_sweep_keeps_what_the_toolchain_did_not_write(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    engines = tmp_path / "engines"
    engines.mkdir()
    (engines / "README.md").write_text("my notes")
    (engines / "backbone-final.onnx").write_bytes(b"a user's file, not content-addressed")
    build_engines(checkpoints["a"], engines, max_batch=4)
    build_engines(checkpoints["b"], engines, max_batch=4)
    assert unnamed_files(engines) == ["README.md", "backbone-final.onnx"]


def test_unchanged_graphs_are_reused_and_force_rebuilds(
    checkpoints: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engines = tmp_path / "engines"
    build_engines(checkpoints["a"], engines, max_batch=4)
    first = json.loads((engines / "manifest.json").read_text())
    files = {name: record["file"] for name, record in first["graphs"].items()}
    stats = {name: (engines / f).stat() for name, f in files.items()}
    exported: list[str] = []
    original = export.export_graph

    def counting(model, spec, path, *args, **kwargs):  # type: ignore[no-untyped-def]
        exported.append(spec.name)
        return original(model, spec, path, *args, **kwargs)

    monkeypatch.setattr(export, "export_graph", counting)
    build_engines(checkpoints["a"], engines, max_batch=4)
    second = json.loads((engines / "manifest.json").read_text())
    # reuse means: no graph traced again, every file untouched, the same records
    assert exported == []
    assert all(record["reused"] for record in second["graphs"].values())
    assert {name: record["file"] for name, record in second["graphs"].items()} == files
    for name, f in files.items():
        now = (engines / f).stat()
        assert (now.st_ino, now.st_mtime_ns, now.st_size) == (
            stats[name].st_ino,
            stats[name].st_mtime_ns,
            stats[name].st_size,
        )
    build_engines(checkpoints["a"], engines, max_batch=4, force=True)
    forced = json.loads((engines / "manifest.json").read_text())
    assert sorted(exported) == sorted(files) and not any(r["reused"] for r in forced["graphs"].values())
    # same inputs, same graph bytes
    assert {name: r["sha256"] for name, r in forced["graphs"].items()} == {
        name: r["sha256"] for name, r in first["graphs"].items()
    }
    exported.clear()
    build_engines(checkpoints["b"], engines, max_batch=4)  # other weights: nothing reusable
    third = json.loads((engines / "manifest.json").read_text())
    assert not any(r["reused"] for r in third["graphs"].values()) and sorted(exported) == sorted(files)
    assert unnamed_files(engines) == []


def test_a_reused_graph_takes_the_family_s_current_bf16_decision(
    checkpoints: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``bf16_safe`` tells backends how to run a graph, not how it was made: when the family's
    ``bf16_unsafe`` changes, a rebuild that reuses every graph writes the new flags."""
    import dataclasses

    from ecar_export import families

    engines = tmp_path / "engines"
    build_engines(checkpoints["a"], engines, max_batch=4, precision="fp16")
    family = families.of(checkpoint.load(checkpoints["a"]))
    before = manifest_io.load(engines).graphs
    assert not before["flow_step"].bf16_safe and before["backbone"].bf16_safe  # ECAR's flow step: off bf16
    changed = dataclasses.replace(family, bf16_unsafe=frozenset({Kind.BACKBONE}))
    monkeypatch.setattr(families, "of", lambda model: changed)
    build_engines(checkpoints["a"], engines, max_batch=4, precision="fp16")
    after = manifest_io.load(engines).graphs
    assert all(entry.reused for entry in after.values())
    assert {name: entry.bf16_safe for name, entry in after.items()} == {name: name != "backbone" for name in after}


def test_a_second_build_into_the_same_directory_is_refused(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    import fcntl

    engines = tmp_path / "engines"
    engines.mkdir()
    handle = os.open(engines, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what a running build holds
        with pytest.raises(ECARError, match="another build"):
            build_engines(checkpoints["a"], engines, max_batch=4)
    finally:
        os.close(handle)
    build_engines(checkpoints["a"], engines, max_batch=4)
    assert unnamed_files(engines) == []
