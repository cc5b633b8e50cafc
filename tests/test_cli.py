"""Both console scripts, ``ecar-export`` and ``ecar-run``, run as a user runs them: in subprocesses.

One tiny model is saved as a checkpoint and built once with ``ecar-export build`` (max batch 4);
every ``ecar-run`` test uses that build and compares its PNGs with the in-process Pipeline.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import AUTO_CPU_BACKEND, make_perturbed_model, make_tiny_config
from PIL import Image

from ecar_export import checkpoint
from ecar_export.backends.tensorrt import tensorrt_version
from ecar_export.families.ecar.contract import config_of
from runtime import manifest as manifest_io
from runtime.images import grid_image, to_uint8
from runtime.pipeline import Pipeline

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ECAR_EXPORT = str(BIN / "ecar-export")
ECAR_RUN = str(BIN / "ecar-run")
MAX_BATCH = 4
TENSORRT_IMPORTABLE = tensorrt_version() is not None
no_tensorrt = pytest.mark.skipif(TENSORRT_IMPORTABLE, reason="TensorRT is importable here")


def cli(*args: Any, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    env.pop("ECAR_DEBUG", None)
    return subprocess.run([str(a) for a in args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@dataclass
class CliBuild:
    model: Any
    checkpoint: Path
    dir: Path
    build: subprocess.CompletedProcess[str]

    def ok(self) -> Path:
        assert self.build.returncode == 0, f"ecar-export build failed:\n{self.build.stderr}"
        return self.dir


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> CliBuild:
    root = tmp_path_factory.mktemp("cli")
    model = make_perturbed_model(make_tiny_config(), seed=11)
    ckpt = checkpoint.save(model, root / "tiny.safetensors")
    out = root / "engines"
    args = ("build", "--checkpoint", ckpt, "--out", out, "--max-batch", MAX_BATCH, "--backend", "onnxruntime")
    return CliBuild(model, ckpt, out, cli(ECAR_EXPORT, *args))


@pytest.fixture(scope="module")
def pipe(built: CliBuild) -> Pipeline:
    return Pipeline.from_dir(built.ok())


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image)


# ----------------------------------------------------------------------------- help
@pytest.mark.parametrize(
    ("args", "expected"),
    [
        pytest.param((ECAR_EXPORT, "--help"), ("build", "check", "sample", "eval"), id="ecar-export"),
        pytest.param(
            (ECAR_EXPORT, "build", "--help"),
            ("--checkpoint", "--precision", "--backend", "--out", "--max-batch", "--fuse-flow-loop"),
            id="ecar-export-build",
        ),
        pytest.param(
            (ECAR_RUN, "--help"),
            ("--engine-dir", "--labels", "--per-class", "--seed", "--cfg", "--out", "--backend", "--json"),
            id="ecar-run",
        ),
    ],
)
def test_help_describes_the_options(args: tuple[str, ...], expected: tuple[str, ...]):
    result = cli(*args)
    assert result.returncode == 0, result.stderr
    assert "Usage" in result.stdout
    for option in expected:
        assert option in result.stdout, option


def test_fuse_flow_loop_help_says_what_it_writes() -> None:
    result = cli(ECAR_EXPORT, "build", "--help")
    text = " ".join(result.stdout.replace("│", " ").split())
    assert "unrolled" not in text and "also" not in text.split("--fuse-flow-loop", 1)[1][:200]
    assert "ONNX Loop" in text and "instead of" in text


# ----------------------------------------------------------------------------- build
def test_build_reports_the_backend_and_writes_a_loadable_build(built: CliBuild):
    out = built.ok()
    assert "backend: onnxruntime" in built.build.stderr
    assert "(auto)" not in built.build.stderr
    assert "Traceback" not in built.build.stderr
    assert built.build.stdout.strip() == str(out)
    manifest = manifest_io.load(out)
    assert manifest.backend == "onnxruntime" and manifest.precision == "fp32"
    assert manifest.max_batch == MAX_BATCH
    assert re.fullmatch(r"[0-9a-f]{64}", manifest.checkpoint_sha256)
    assert config_of(manifest) == built.model.config


def test_build_records_the_sha256_of_the_checkpoint_file(built: CliBuild):
    manifest = manifest_io.load(built.ok())
    assert manifest.checkpoint_sha256 == hashlib.sha256(built.checkpoint.read_bytes()).hexdigest()


@no_tensorrt
def test_build_with_backend_auto_picks_onnxruntime(tmp_path: Path):
    model = make_perturbed_model(make_tiny_config(scales=(4,), steps=(2,)), seed=12)
    ckpt = checkpoint.save(model, tmp_path / "single.safetensors")
    out = tmp_path / "engines"
    result = cli(ECAR_EXPORT, "build", "--checkpoint", ckpt, "--out", out, "--max-batch", 2, "--backend", "auto")
    assert result.returncode == 0, result.stderr
    assert "backend: onnxruntime (auto)" in result.stderr
    assert manifest_io.load(out).backend == "onnxruntime"
    latents = Pipeline.from_dir(out).generate([7, 3], seed=4).latents
    assert float(np.max(np.abs(latents - model.sample([7, 3], seed=4).latents.numpy()))) <= 1e-4


# ----------------------------------------------------------------------------- run
def test_run_writes_a_grid_and_one_png_per_sample(built: CliBuild, pipe: Pipeline, tmp_path: Path):
    out = tmp_path / "out"
    result = cli(ECAR_RUN, "--engine-dir", built.ok(), "--labels", "3,1,2", "--seed", 5, "--out", out)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(out / "grid.png")

    expected = pipe.generate([3, 1, 2], seed=5).images
    names = ["sample_000_class3.png", "sample_001_class1.png", "sample_002_class2.png"]
    assert sorted(p.name for p in out.iterdir()) == sorted(["grid.png", *names])
    side = built.model.config.image_size
    for index, name in enumerate(names):
        with Image.open(out / name) as image:
            assert image.size == (side, side) and image.mode == "L"
        assert np.array_equal(pixels(out / name), expected[index][..., 0]), name

    grid = grid_image(expected, [3, 1, 2])
    with Image.open(out / "grid.png") as image:
        assert image.size == grid.size
        assert image.size[0] > 3 * side and image.size[1] > side
    assert np.array_equal(pixels(out / "grid.png"), np.asarray(grid))


def test_run_per_class_is_chunked_into_batches(built: CliBuild, pipe: Pipeline, tmp_path: Path):
    out = tmp_path / "out"
    result = cli(ECAR_RUN, "--engine-dir", built.ok(), "--per-class", 2, "--seed", 1, "--out", out)
    assert result.returncode == 0, result.stderr
    classes = built.model.config.num_classes
    assert classes * 2 > MAX_BATCH
    samples = sorted(out.glob("sample_*.png"))
    assert len(samples) == 2 * classes
    assert (out / "grid.png").is_file()
    labels = [c for c in range(classes) for _ in range(2)]
    assert [p.name for p in samples] == [f"sample_{i:03d}_class{c}.png" for i, c in enumerate(labels)]
    expected = pipe.generate_many(labels, seed=1).images
    for index, path in enumerate(samples):
        assert np.array_equal(pixels(path), expected[index][..., 0]), path.name


def test_run_json_reports_paths_and_timings(built: CliBuild, tmp_path: Path):
    out = tmp_path / "out"
    result = cli(ECAR_RUN, "--engine-dir", built.ok(), "--labels", "0,9", "--seed", 2, "--json", "--out", out)
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    config = built.model.config
    assert payload["labels"] == [0, 9] and payload["seed"] == 2
    assert Path(payload["grid"]) == out / "grid.png" and Path(payload["grid"]).is_file()
    assert len(payload["samples"]) == 2 and all(Path(p).is_file() for p in payload["samples"])
    assert payload["backend"]["backend"] == AUTO_CPU_BACKEND
    timings = payload["timings"]
    assert len(timings["stages_s"]) == config.num_stages
    assert timings["graph_calls"] == {"backbone": config.num_stages, "flow_step": sum(config.steps), "decoder": 1}
    assert timings["total_s"] >= timings["backend_s"] > 0


def test_sample_writes_a_grid_with_the_torch_model(built: CliBuild, tmp_path: Path):
    out = tmp_path / "out2"
    result = cli(ECAR_EXPORT, "sample", "--checkpoint", built.checkpoint, "--labels", "1,2", "--out", out)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(out / "grid.png")
    expected = to_uint8(built.model.sample([1, 2], seed=0).images.numpy())
    assert np.array_equal(pixels(out / "grid.png"), np.asarray(grid_image(expected, [1, 2])))
    assert np.array_equal(pixels(out / "sample_001_class2.png"), expected[1][..., 0])


# ----------------------------------------------------------------------------- user errors
def _out_file(tmp: Path) -> Path:
    path = tmp / "taken.txt"
    path.write_text("not a directory\n")
    return path


def _build_args(ckpt: Path, tmp: Path, *extra: str) -> tuple[Any, ...]:
    return (ECAR_EXPORT, "build", "--checkpoint", ckpt, *extra, "--out", tmp / "e")


USER_ERRORS: dict[str, Any] = {
    "run-missing-engine-dir": (
        lambda b, tmp: (ECAR_RUN, "--engine-dir", tmp / "no-engines", "--labels", "1", "--out", tmp / "o"),
        ("no-engines", "does not exist"),
    ),
    "run-label-out-of-range": (
        lambda b, tmp: (ECAR_RUN, "--engine-dir", b.ok(), "--labels", "3,10", "--out", tmp / "o"),
        ("class 10 is out of range", "0..9"),
    ),
    "run-labels-not-integers": (
        lambda b, tmp: (ECAR_RUN, "--engine-dir", b.ok(), "--labels", "a,b", "--out", tmp / "o"),
        ("'a' is not an integer",),
    ),
    "run-out-is-a-file": (
        lambda b, tmp: (ECAR_RUN, "--engine-dir", b.ok(), "--labels", "1", "--out", _out_file(tmp)),
        ("taken.txt", "not a directory"),
    ),
    "build-missing-checkpoint": (
        lambda b, tmp: _build_args(tmp / "missing.safetensors", tmp),
        ("missing.safetensors", "does not exist"),
    ),
    "build-unknown-precision": (
        lambda b, tmp: _build_args(b.checkpoint, tmp, "--precision", "int4"),
        ("unknown precision 'int4'",),
    ),
    "build-unknown-calibration-method": (
        lambda b, tmp: _build_args(b.checkpoint, tmp, "--precision", "int8", "--calibration-method", "magic"),
        ("unknown calibration method 'magic'",),
    ),
    "build-tensorrt": (
        lambda b, tmp: _build_args(b.checkpoint, tmp, "--backend", "tensorrt"),
        ("TensorRT is not available",),
    ),
}


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=no_tensorrt) if n == "build-tensorrt" else n for n in USER_ERRORS]
)
def test_user_errors_exit_2_with_a_one_paragraph_message(name: str, built: CliBuild, tmp_path: Path):
    make_args, expected = USER_ERRORS[name]
    result = cli(*make_args(built, tmp_path))
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stdout + result.stderr
    assert result.stdout.strip() == ""
    assert "error:" in result.stderr, result.stderr
    message = result.stderr[result.stderr.index("error:") :].strip()
    assert "\n\n" not in message and len(message.splitlines()) <= 3, message
    for words in expected:
        assert words in message, message
    assert not (tmp_path / "e" / manifest_io.MANIFEST_NAME).exists()
    assert not (tmp_path / "o").exists()
    if name == "run-out-is-a-file":
        assert (tmp_path / "taken.txt").read_text() == "not a directory\n"
