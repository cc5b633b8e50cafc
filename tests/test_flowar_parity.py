"""FlowAR re-implementation against the authors' code: golden tensors in tests/golden/flowar/.

The fixtures come from the authors' code run on the CPU at two reduced configs with random weights
and injected noise (scripts/flowar_golden.py; tests/golden/flowar/README.md says how). Per-graph
outputs must agree to 1e-4 and whole requests to 1e-3, relative to max(1, max|reference|).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ecar_export.families.flowar import convert
from ecar_export.families.flowar.backbone import resample_matrix
from ecar_export.families.flowar.config import FlowARConfig
from ecar_export.families.flowar.model import FlowAR
from ecar_export.families.flowar.sampler import sample, stage_cfg, time_grid

GOLDEN = Path(__file__).resolve().parent / "golden" / "flowar"
WEIGHTS = {"tiny": "weights.safetensors", "cross": "weights_cross.safetensors"}
GRAPH_TOL, REQUEST_TOL = 1e-4, 1e-3


@pytest.fixture(scope="module", autouse=True)
def _threads() -> object:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is the fastest and deterministic
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def io() -> dict[str, np.ndarray]:
    with np.load(GOLDEN / "io.npz") as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="module", params=sorted(WEIGHTS))
def case(request: pytest.FixtureRequest, io: dict[str, np.ndarray]) -> tuple[FlowAR, dict[str, torch.Tensor]]:
    tag = request.param
    model = convert.load(GOLDEN / WEIGHTS[tag], tokenizer=False)  # the golden files hold the generator alone
    assert model.config == FlowARConfig.from_json(str(io[f"{tag}/config_json"]))
    arrays = {
        k.split("/", 1)[1]: torch.from_numpy(v)
        for k, v in io.items()
        if k.startswith(tag + "/") and v.dtype.kind != "U"
    }
    return model, arrays


def assert_close(got: torch.Tensor, ref: torch.Tensor, tol: float, what: str) -> None:
    assert got.shape == ref.shape, (what, got.shape, ref.shape)
    err = (got.double() - ref.double()).abs().max().item()
    bound = tol * max(1.0, ref.double().abs().max().item())
    assert err <= bound, f"{what}: max |diff| {err:.3e} > {bound:.3e}"


def test_backbone_matches_per_stage(case: tuple[FlowAR, dict[str, torch.Tensor]]) -> None:
    """Each stage's backbone graph, fed the authors' sampled tokens of the stage before (teacher forcing)."""
    model, ref = case
    labels = ref["labels"]
    cond = model.class_embedding(torch.cat([labels, torch.full_like(labels, model.config.null_class)]))
    cache, x = None, cond[:, None]
    with torch.no_grad():
        for k in range(model.config.num_stages):
            if k > 0:
                x = model.stage_input(ref[f"tokens{k - 1}"].float()[: len(labels)].repeat(2, 1, 1), k)
            assert_close(x, ref[f"input{k}"], GRAPH_TOL, f"stage {k} input")
            z, cache = model(x, cond, k, cache)
            assert_close(z, ref[f"z{k}"], GRAPH_TOL, f"stage {k} backbone z")


@pytest.mark.parametrize("name", ["head8", "head16"])
def test_head_velocity_matches(case: tuple[FlowAR, dict[str, torch.Tensor]], name: str) -> None:
    model, ref = case
    with torch.no_grad():
        v = model.flownet(ref[f"{name}_x"], ref[f"{name}_t"], ref[f"{name}_z"])
    assert_close(v, ref[f"{name}_v"], GRAPH_TOL, f"{name} velocity")


def test_whole_request_matches(case: tuple[FlowAR, dict[str, torch.Tensor]]) -> None:
    """Labels and per-stage noise in, final latents out: backbone, Euler with the cfg ramp, resampling."""
    model, ref = case
    noise = [ref[f"noise{k}"] for k in range(model.config.num_stages)]
    result = sample(model, ref["labels"], noise=noise)
    for k, tokens in enumerate(result.tokens):
        assert_close(tokens, ref[f"tokens{k}"], REQUEST_TOL, f"stage {k} sampled tokens")
    assert_close(result.latents, ref["latents"], REQUEST_TOL, "final latents")
    assert torch.equal(time_grid(model.config.steps), ref["time_grid"])


@pytest.mark.parametrize(("size_in", "size_out"), [(1, 2), (2, 4), (4, 8), (8, 16), (3, 5)])
def test_resampling_is_bicubic_then_area(size_in: int, size_out: int) -> None:
    grid = torch.randn(2, 16, size_in, size_in, generator=torch.Generator().manual_seed(size_in))
    ref = F.interpolate(F.interpolate(grid, (16, 16), mode="bicubic"), (size_out, size_out), mode="area")
    m = resample_matrix(size_in, size_out, 16)
    assert_close(m @ grid @ m.T, ref, 1e-6, f"{size_in}->{size_out}")


def test_time_grids_and_guidance_ramp() -> None:
    steps25 = (time_grid(25)[:-1].float() * 1000).long().tolist()
    head_steps = [1000, 936, 872, 809, 745, 681, 618, 554, 490, 427, 363, 300]  # 12 points from 1 to 0.3
    head_steps += [250, 229, 208, 187, 166, 145, 125, 104, 83, 62, 41, 20]  # then 0.25 to 0 (0 not evaluated)
    assert steps25 == head_steps
    assert len(time_grid(50)) == 51 and float(time_grid(50)[35]) == pytest.approx(0.3)
    assert [stage_cfg(4.3, k, 5) for k in (0, 4)] == [1.0, 4.3]


def test_sampling_without_guidance_has_no_null_rows() -> None:
    torch.manual_seed(0)
    model = FlowAR(FlowARConfig(name="t", width=32, encoder_depth=1, decoder_depth=1, heads=2, head_width=64,
                                head_depth=1, scales=(1, 2, 4), image_size=64), tokenizer=False).eval()  # fmt: skip
    result = sample(model, torch.tensor([1, 2, 3]), steps=4, cfg=1.0, generator=torch.Generator().manual_seed(0))
    assert result.latents.shape == (3, 16, 4, 4) and [z.shape[0] for z in result.z] == [3, 3, 3]
    assert bool(torch.isfinite(result.latents).all())
