"""The lower bounds of the package metadata, installed: the runtime wheel with every direct dependency at its floor.

``constraints-floors.txt`` pins the oldest release of each runtime dependency that pyproject.toml admits
(numpy 1.24.2, ONNX Runtime 1.18.0, pillow 9.2.0, typer 0.15.4, rich 12.0.0, packaging 22.0); everything
those pull in resolves to its newest release, as it does for a service that pins one old package. A fresh
virtual environment gets the wheel (built by test_packaging's ``dist`` fixture) with ``[onnxruntime]``
under those pins, and generates from the demo model's fp32, fp16 and int8 builds (made earlier in the run;
other tests use them too) what the locked install (this interpreter: constraints.txt's versions) generates,
and ``ecar-run`` works there.

Not bit-exact, by design: ONNX Runtime's CPU kernels (GEMM blocking, vectorised exp/erf, the fused
LayerNorm and attention paths) changed between 1.18 and today's release, so float32 sums round differently
at ~1e-7 relative, and the sampler carries that through every stage and Euler step. fp16 builds add
half-precision rounding (~1e-3 relative) on top; in an int8 build a last-bit difference in front of a
QuantizeLinear can round to the neighbouring quantisation level, moving that activation by one scale step.
The tolerances below are a few times the differences measured (see TOLERANCE) and far below what a real
regression does (a wrong graph or sampler changes latents by O(1) and images by tens of levels).

The OpenVINO floor (2025.1.0) is established by hand (README "Installing"), not here: its wheel is large
and the suite already runs the locked OpenVINO.
"""

from __future__ import annotations

import json
import re
import textwrap
import tomllib
import venv
from pathlib import Path

import numpy as np
import pytest
from conftest import BuildCache, needs_demo
from PIL import Image
from test_packaging import ROOT, TINY, dist, run  # noqa: F401 - `dist` is the wheel fixture, shared

from runtime.pipeline import Pipeline

FLOORS = ROOT / "constraints-floors.txt"
LABELS = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 3, 1]  # more than one engine batch (max batch 5)
SEED = 11

# precision -> (latents: max |difference|, images: max |difference| in 8-bit levels, images: share of pixels
# that may differ). Measured on the demo model's builds (16x16 images, latents within +-3.5), numpy 1.24.2 +
# onnxruntime 1.18.0 against numpy 2.4.6 + onnxruntime 1.32.0: here (12 labels, seed 11) fp32 1.8e-6 / 0 levels,
# fp16 7.8e-4 / 1 level on 0.13 % of pixels, int8 5.7e-3 / 1 level on 0.07 %; with 16 labels at seed 1234
# fp32 2e-6 / 0, fp16 8.1e-4 / 1 level on 0.27 %, int8 0.096 / 2 levels on 5.1 %.
TOLERANCE = {"fp32": (1e-4, 1, 0.01), "fp16": (5e-3, 2, 0.02), "int8": (0.2, 3, 0.10)}


def pins(path: Path) -> dict[str, str]:
    found = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            found[name.strip().lower()] = version.strip()
    return found


def lower_bounds(requirements: list[str]) -> dict[str, str]:
    found = {}
    for requirement in requirements:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)(?:\[[^]]*\])?\s*>=\s*([^,;\s]+).*", requirement)
        assert match, f"{requirement!r} has no lower bound"
        found[match[1].lower()] = match[2]
    return found


def test_the_floor_pins_are_the_lower_bounds_of_the_package_metadata() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    declared = lower_bounds(project["dependencies"] + extras["onnxruntime"] + extras["openvino"] + extras["gpu"])
    assert pins(FLOORS) == declared, "constraints-floors.txt and pyproject.toml's lower bounds disagree"


GENERATE = textwrap.dedent(
    """
    import importlib.metadata as md, json, sys
    import numpy as np
    from runtime import Pipeline
    labels, seed, out = json.loads(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    arrays = {}
    for index, engine_dir in enumerate(sys.argv[4:]):
        result = Pipeline.from_dir(engine_dir, backend="onnxruntime", device="cpu").generate_many(labels, seed=seed)
        arrays[f"images{index}"], arrays[f"latents{index}"] = result.images, result.latents
    np.savez(out, **arrays)
    names = ["numpy", "onnxruntime", "pillow", "typer", "rich", "packaging", "click"]
    print(json.dumps({name: md.version(name) for name in names} | {"torch": "torch" in sys.modules}))
    """
)


@pytest.fixture(scope="module")
def floor_env(dist: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    """A fresh virtual environment: the runtime wheel and ``onnxruntime``, every direct dependency at its floor."""
    env_dir = tmp_path_factory.mktemp("floors") / "venv"
    venv.create(env_dir, with_pip=True)
    pip = [env_dir / "bin" / "python", "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    result = run([*pip, "--only-binary=:all:", "-c", FLOORS, f"{dist['wheel']}[onnxruntime]"], cwd=env_dir.parent)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return env_dir


@needs_demo
def test_the_runtime_at_its_dependency_floors_generates_what_the_locked_install_does(
    floor_env: Path, build_cache: BuildCache, tmp_path: Path
) -> None:
    builds = {precision: build_cache.get("demo", precision=precision).dir for precision in TOLERANCE}
    arrays = tmp_path / "floors.npz"
    result = run(
        [floor_env / "bin" / "python", "-c", GENERATE, json.dumps(LABELS), SEED, arrays, *builds.values()],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    versions = json.loads(result.stdout.strip().splitlines()[-1])
    floors = pins(FLOORS)
    assert {name: versions[name] for name in ("numpy", "onnxruntime", "pillow", "typer", "rich", "packaging")} == {
        name: floors[name] for name in ("numpy", "onnxruntime", "pillow", "typer", "rich", "packaging")
    }, "the environment does not hold the floors"
    assert versions["torch"] is False
    floor = np.load(arrays)
    for index, (precision, engine_dir) in enumerate(builds.items()):
        locked = Pipeline.from_dir(engine_dir, backend="onnxruntime", device="cpu").generate_many(LABELS, seed=SEED)
        latents, images = floor[f"latents{index}"], floor[f"images{index}"]
        assert latents.shape == locked.latents.shape and images.shape == locked.images.shape
        assert images.dtype == locked.images.dtype == np.uint8
        latent_tol, level_tol, share_tol = TOLERANCE[precision]
        latent_diff = float(np.abs(latents - locked.latents).max())
        level_diff = np.abs(images.astype(np.int16) - locked.images.astype(np.int16))
        report = (
            f"{precision}: latents differ by {latent_diff:.3g}, images by up to {level_diff.max()} levels on "
            f"{(level_diff > 0).mean():.2%} of pixels ({versions})"
        )
        assert latent_diff <= latent_tol and level_diff.max() <= level_tol, report
        assert (level_diff > 0).mean() <= share_tol, report


def test_ecar_run_works_at_the_dependency_floors(floor_env: Path, build_cache: BuildCache, tmp_path: Path) -> None:
    """typer, click and rich at their floors: help, a run that writes PNGs, an error message without a traceback."""
    engine_dir = build_cache.get(TINY).dir
    for command in (["ecar-run", "--help"], ["ecar-run", "serve", "--help"], ["ecar-export", "--help"]):
        helped = run([floor_env / "bin" / command[0], *command[1:]], cwd=tmp_path)
        assert helped.returncode == 0 and "--help" in helped.stdout, helped.stderr[-3000:]
    out = tmp_path / "out"
    cli = run([floor_env / "bin" / "ecar-run", "--engine-dir", engine_dir, "--labels", "1,2,3", "--seed", "7",
               "--out", out], cwd=tmp_path)  # fmt: skip
    assert cli.returncode == 0, cli.stderr[-3000:]
    expected = Pipeline.from_dir(engine_dir, backend="onnxruntime", device="cpu").generate([1, 2, 3], seed=7).images
    singles = sorted(p for p in out.glob("*.png") if p.name != "grid.png")
    assert (out / "grid.png").is_file() and len(singles) == 3
    for index, path in enumerate(singles):
        written = np.asarray(Image.open(path)).reshape(expected[index].shape).astype(np.int16)
        assert np.abs(written - expected[index]).max() <= TOLERANCE["fp32"][1]
    missing = run([floor_env / "bin" / "ecar-run", "--engine-dir", tmp_path / "none", "--labels", "1"], cwd=tmp_path)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr, missing.stderr[-3000:]
    assert "does not exist" in missing.stderr and str(tmp_path / "none") in " ".join(missing.stderr.split())
