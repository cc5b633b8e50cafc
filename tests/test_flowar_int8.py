"""FlowAR at INT8: a converted official-layout checkpoint built by `ecar-export build --precision int8`.

FlowAR's flow head attends across a stage's tokens, so its calibration inputs are stored as whole token
grids, one group per stage (``calibration.model.CapturedModel``), where ECAR's per-token head is stored
as token rows. The model is flowar-tiny with FlowAR's 1000 classes, calibrated as a user on a budget
would: 8 requests of 8 samples with ``--calibration-some-classes`` (their seven calibration requests
hold classes 0-55; holding all 1000 takes 245 requests); its weights are random and non-zero, fresh per
run (ECAR_TEST_SEED reproduces one). One build for OpenVINO runs on both CPU engines.
"""

from __future__ import annotations

import json
import os
import secrets
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from test_flowar_convert import official_state
from test_vae import ldm_shapes, random_weights
from typer.testing import CliRunner

from calibration import load_calibration
from ecar_export.cli import app as export_app
from ecar_export.families.flowar import convert
from ecar_export.families.flowar.config import FLOWAR_TINY
from ecar_export.precision import qdq
from ecar_export.torch_walk import TorchWalk
from runtime import manifest as manifest_io
from runtime.errors import InvalidRequestError
from runtime.pipeline import Pipeline

SEED = int(os.environ.get("ECAR_TEST_SEED", secrets.randbelow(2**31)))
CONFIG = FLOWAR_TINY
REQUESTS = 8  # 7 calibration requests of 8 samples hold classes 0-55; the 8th is held out


@pytest.fixture(scope="module")
def int8_build(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("flowar-int8")
    torch.save({"model_ema": official_state(CONFIG, SEED)}, tmp / "FlowAR-tiny.pth")
    torch.save({"model": random_weights(ldm_shapes(CONFIG), SEED + 1)}, tmp / "kl16.ckpt")
    checkpoint = convert.convert(tmp / "FlowAR-tiny.pth", tmp / "kl16.ckpt", tmp / "flowar.safetensors", CONFIG)
    out = tmp / "engines"
    argv = ["build", "--checkpoint", str(checkpoint), "--out", str(out), "--precision", "int8"]
    argv += ["--calibration-requests", str(REQUESTS), "--calibration-some-classes"]
    argv += ["--max-batch", "2", "--backend", "openvino"]
    result = CliRunner().invoke(export_app, argv)
    assert result.exit_code == 0, result.output
    return {"checkpoint": checkpoint, "out": out}


def test_calibration_keeps_whole_token_grids_per_stage(int8_build: dict[str, Any]) -> None:
    manifest = manifest_io.load(int8_build["out"])
    assert manifest.model.family == "flowar" and manifest.calibration is not None
    assert manifest.calibration.requests == REQUESTS
    kept = load_calibration(int8_build["out"] / manifest.calibration.dir)
    assert not kept.plan.every_class and kept.plan.covered_classes() == set(range(56))
    assert kept.raw["flow_rows"] == "grid" and not kept.model.token_rows
    stages = range(1, CONFIG.num_stages + 1)
    assert kept.groups("flow_step") == [f"stage{s}" for s in stages]
    for stage, tokens in zip(stages, manifest.plan.tokens, strict=True):
        group = f"stage{stage}"
        for split in ("calibration", "held_out"):
            rows, meta = kept.rows("flow_step", split, group), kept.meta("flow_step", split, group)
            assert rows["x"].shape[1:] == (tokens, CONFIG.token_dim)  # a sample's whole grid
            assert rows["z"].shape[1:] == (2, tokens, CONFIG.width)  # its conditional and unconditional rows
            assert "token" not in meta and set(meta["stage"]) == {stage}
            # every Euler step of the stage is represented
            assert set(meta["step"]) == set(range(manifest.plan.stage(stage).steps)), (group, split)
        # a batch of held-out feeds is one valid call: the stage's rotary tables come from the build
        feeds = next(kept.stage_feeds("flow_step", stage))
        constants = manifest.constants.get("flow_step", stage)
        assert feeds["x"].shape[1] == tokens and constants
        for name, value in constants.items():
            np.testing.assert_array_equal(feeds[name], value)
    with pytest.raises(InvalidRequestError, match="no row group .all."):
        kept.rows("flow_step", "calibration", "all")


def test_int8_graphs_are_quantized_and_pass_check_on_both_engines(int8_build: dict[str, Any]) -> None:
    """Q/DQ where int8 builds quantize (``int8.op_types_for``: the backbone's products; the flow head and every
    convolution stay float, also in a build for OpenVINO), each graph within the INT8 tolerance of today's
    check against the torch model, on held-out calibration inputs, on both engines."""
    manifest = manifest_io.load(int8_build["out"])
    for name, entry in manifest.graphs.items():
        graph = onnx.load(str(manifest.path(entry.file)))
        producer = {out: node.op_type for node in graph.graph.node for out in node.output}
        assert not any(n.op_type == "Conv" and producer.get(n.input[1]) == "DequantizeLinear" for n in graph.graph.node)
        if entry.spec.kind == "flow_step":
            assert not any(n.op_type in qdq.QDQ_OPS for n in graph.graph.node), name
            continue
        if entry.spec.kind == "backbone":
            assert qdq.check_qdq(graph), f"{name} has no Q/DQ pairs"
        assert min(entry.builder["held_out_cosine"].values()) >= 0.99, (name, entry.builder["held_out_cosine"])
    for backend in ("onnxruntime", "openvino"):
        argv = ["check", "--engine-dir", str(int8_build["out"]), "--checkpoint", str(int8_build["checkpoint"])]
        result = CliRunner().invoke(export_app, [*argv, "--json", "--backend", backend])
        assert result.exit_code == 0, (backend, result.output)
        checks = json.loads(result.output[result.output.index("{") :])["graphs"]
        ran = {(c["graph"], c["stage"]) for c in checks}
        stages = range(1, CONFIG.num_stages + 1)
        assert ran == {*((g, s) for g in ("backbone", "flow_step") for s in stages), ("decoder", stages[-1])}
        assert all(c["ok"] for c in checks), (backend, checks)
        assert {c["inputs"] for c in checks} == {"held-out"}


def test_int8_build_generates_on_both_engines(int8_build: dict[str, Any], rng: np.random.Generator) -> None:
    """`Pipeline` on ONNX Runtime and OpenVINO, for a class the calibration held and one it did not: finite
    images and latents closer to the torch model's than another label's are. Measured on random flowar-tiny
    weights: 8 to 14 % of what the labels change on both engines (10 classes, all calibrated: 17 %), with
    the flow head float (``int8.FLOAT_KINDS``); when it was quantized, 31 to 49 % (latent
    cosine 0.98 to fp32: the held-out x_next cosine per call was 0.9997, but the velocity's relative error
    25-30 % per call, 16 quantized products of a 64-wide head over 5 stages x 24 steps)."""
    model = convert.load(int8_build["checkpoint"])
    labels = [int(rng.integers(0, 56)), int(rng.integers(56, CONFIG.num_classes))]  # one calibrated, one not
    seed = int(rng.integers(0, 2**62))
    want = TorchWalk(model).generate(labels, seed=seed).latents
    other = TorchWalk(model).generate([(v + 5) % CONFIG.num_classes for v in labels], seed=seed).latents
    effect = float((other - want).norm())
    assert effect > 0.1 * float(want.norm()), "the labels barely change the output: vacuous check"
    found: dict[str, float] = {}
    for backend in ("onnxruntime", "openvino"):
        result = Pipeline.from_dir(int8_build["out"], backend=backend).generate(labels, seed=seed)
        assert np.isfinite(result.latents).all() and result.images.dtype == np.uint8
        got = torch.from_numpy(result.latents)
        share = float((got - want).norm()) / effect
        assert share <= 0.4, (backend, share)
        found[backend] = share
    print(f"int8 latents' distance to torch fp32 over the labels' effect: {found}")
