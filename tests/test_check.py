"""``ecar-export check``: every graph of a build against the torch model, at every stage, on fresh random inputs."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import BuildCache, build_model, make_perturbed_model
from typer.testing import CliRunner

from ecar_export import check, checkpoint, random_inputs
from ecar_export.check import check_build
from ecar_export.cli import app
from ecar_export.families.ecar.contract import backbone_spec
from runtime import manifest as manifest_io

TINY = "tiny-1-2-4"
MIN_COSINE = 0.99999


def test_torch_runner_reports_inference_time(tiny_config, perturbed_model, rng: np.random.Generator):
    model = perturbed_model(tiny_config())
    spec = backbone_spec(model.config)
    runner = check._torch_runner(model, spec)
    runner.activate()
    try:
        runner.infer(random_inputs.for_config(spec, model.config, 2, 2, rng, family="ecar"))
        assert runner.last_inference_time() is not None
    finally:
        runner.deactivate()


def fresh_seed(rng: np.random.Generator) -> int:
    return int(rng.integers(0, 2**32))


def stages_run(build_dir: Path) -> list[tuple[str, int]]:
    """(graph, stage) of every distinct call of a request, in order."""
    manifest = manifest_io.load(build_dir)
    calls = [(c.graph, c.stage) for c in manifest.plan.calls(manifest.fuse_flow_loop)]
    return list(dict.fromkeys(calls))


@pytest.fixture(scope="module")
def swapped(build_cache: BuildCache, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A copy of the tiny build whose backbone weights file holds another model's backbone weights
    (same layout, other values), and the model's checkpoint."""
    build = build_cache.get(TINY)
    root = tmp_path_factory.mktemp("swapped") / "engines"
    shutil.copytree(build.dir, root)
    other_dir = tmp_path_factory.mktemp("other") / "engines"
    build_model(make_perturbed_model(build.model.config, seed=777), other_dir, max_batch=build.max_batch)
    (mine,) = manifest_io.load(root).graphs["backbone"].data_files
    (theirs,) = manifest_io.load(other_dir).graphs["backbone"].data_files
    shutil.copyfile(other_dir / theirs, root / mine)
    ckpt = checkpoint.save(build.model, root.parent / "tiny.safetensors")
    return root, ckpt


def test_fresh_build_passes_check(build_cache: BuildCache, rng: np.random.Generator):
    build = build_cache.get(TINY)
    seed = fresh_seed(rng)
    results, used = check_build(build.dir, build.model, seed=seed)
    assert used == seed
    assert [(r.graph, r.stage) for r in results] == stages_run(build.dir)
    assert [r.stage for r in results if r.graph == "backbone"] == [1, 2, 3]
    for r in results:
        assert r.ok and r.sha_ok and r.error is None, r
        assert r.cosine >= MIN_COSINE, r
        assert math.isfinite(r.max_abs) and r.max_abs <= 1e-3, r


def test_check_fails_against_a_different_model(build_cache: BuildCache, rng: np.random.Generator):
    # the numeric comparison itself can fail: the same files checked against other weights
    build = build_cache.get(TINY)
    other = make_perturbed_model(build.model.config, seed=4321)
    results, _ = check_build(build.dir, other, seed=fresh_seed(rng))
    assert all(r.sha_ok for r in results)  # the files are intact; their numbers are not this model's
    assert len(results) == len(stages_run(build.dir))
    for r in results:
        assert not r.ok, r


def test_swapped_graph_file_fails_only_that_graph(swapped: tuple[Path, Path], build_cache: BuildCache, rng):
    root, _ = swapped
    results, _ = check_build(root, build_cache.get(TINY).model, seed=fresh_seed(rng))
    swapped_graph = [r for r in results if r.graph == "backbone"]
    assert [r.stage for r in swapped_graph] == [1, 2, 3]
    for r in swapped_graph:  # every stage runs the other weights
        assert not r.ok and not r.sha_ok and r.cosine < MIN_COSINE, r
    others = [r for r in results if r.graph != "backbone"]
    assert others
    for r in others:
        assert r.ok and r.sha_ok and r.cosine >= MIN_COSINE, r


def test_check_cli_passes_an_intact_build(build_cache: BuildCache, swapped: tuple[Path, Path], rng):
    _, ckpt = swapped  # the tiny model's checkpoint; the intact build is the shared one
    args = ["check", "--engine-dir", str(build_cache.get(TINY).dir), "--checkpoint", str(ckpt)]
    result = CliRunner().invoke(app, [*args, "--seed", str(fresh_seed(rng))], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    assert "check failed" not in result.output
    # stdout is not a terminal here (as when piped): whole values, never cut to 80 columns
    assert "…" not in result.stdout, result.stdout
    rows = [line for line in result.stdout.splitlines() if "backbone-" in line]
    assert len(rows) == 3 and all(re.search(r"\b1\.0000000\b|\b0\.99999\d\d\b", row) for row in rows), rows


def test_check_cli_exits_nonzero_and_names_the_swapped_graph(swapped: tuple[Path, Path], rng):
    root, ckpt = swapped
    args = ["check", "--engine-dir", str(root), "--checkpoint", str(ckpt), "--seed", str(fresh_seed(rng))]
    result = CliRunner().invoke(app, args)
    assert result.exit_code != 0, result.output
    assert "check failed for: backbone@stage1, backbone@stage2, backbone@stage3\n" in result.output, result.output
    assert "Traceback" not in result.output

    as_json = CliRunner().invoke(app, [*args, "--json"])
    assert as_json.exit_code != 0
    payload = json.loads(as_json.stdout)
    assert [(g["graph"], g["stage"]) for g in payload["graphs"] if not g["ok"]] == [("backbone", s) for s in (1, 2, 3)]
