"""Checkpoints: exact safetensors round trip and refusal of anything that does not fit (or is a pickle)."""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from ecar_export import checkpoint, torch_files
from ecar_export.families.ecar.config import ECARConfig
from ecar_export.families.ecar.model import ECAR
from runtime.errors import CheckpointError, ECARError


@pytest.fixture
def model(tiny_config: Callable[..., ECARConfig], perturbed_model: Callable[..., ECAR]) -> ECAR:
    config = tiny_config(latent_scale=1.75, cfg_schedule="linear", window_bounds=(1.0, 0.6, 0.25, 0.0))
    return perturbed_model(config, seed=9)


def metadata_for(config: ECARConfig, changes: dict[str, str] | None = None) -> dict[str, str]:
    """The metadata ecar_export.checkpoint writes, with optional changes."""
    return {"format": "ecar-checkpoint", "format_version": "1", "config": config.to_json(), **(changes or {})}


def state_of(model: ECAR) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone().contiguous() for name, tensor in model.state_dict().items()}


def write(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    save_file(tensors, str(path), metadata=metadata)
    return path


# ------------------------------------------------------------------ round trip
def test_save_load_round_trip_is_exact(model: ECAR, tmp_path: Path) -> None:
    path = checkpoint.save(model, tmp_path / "sub" / "model.safetensors")
    assert path.is_file()
    assert [p.name for p in path.parent.iterdir()] == ["model.safetensors"]  # no temporary files left
    loaded = checkpoint.load(path)
    assert loaded.config == model.config
    assert checkpoint.read_config(path) == model.config
    assert not loaded.training
    original, restored = model.state_dict(), loaded.state_dict()
    assert set(original) == set(restored)
    for name, tensor in original.items():
        assert restored[name].dtype == tensor.dtype, name
        assert torch.equal(restored[name], tensor), name
    # the loaded model samples bit-identically
    a = model.sample([1, 6], seed=4)
    b = loaded.sample([1, 6], seed=4)
    assert float(a.latents.std()) > 0.1
    assert torch.equal(a.latents, b.latents)
    assert torch.equal(a.images, b.images)


def test_round_trip_check_can_fail(model: ECAR, tmp_path: Path) -> None:
    # a different model is not mistaken for the saved one
    path = checkpoint.save(model, tmp_path / "model.safetensors")
    other = ECAR(model.config)
    loaded = checkpoint.load(path)
    assert not torch.equal(loaded.head.out_proj.weight, other.head.out_proj.weight)


def test_save_replaces_existing_file(model: ECAR, tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"old contents")
    checkpoint.save(model, path)
    assert checkpoint.load(path).config == model.config


# ------------------------------------------------------------- tensors refused
def _tensor_cases(model: ECAR) -> dict[str, tuple[dict[str, torch.Tensor], str]]:
    """name -> (tensors to write, name of the tensor the error must mention)."""
    state = state_of(model)
    names = sorted(state)
    cases: dict[str, tuple[dict[str, torch.Tensor], str]] = {}
    missing = dict(state)
    victim = "backbone.blocks.1.attn.qkv.weight"
    del missing[victim]
    cases["missing"] = (missing, victim)
    extra = dict(state)
    extra["backbone.blocks.7.attn.qkv.weight"] = torch.randn(3, 3)
    cases["unexpected"] = (extra, "backbone.blocks.7.attn.qkv.weight")
    misshaped = dict(state)
    victim = "head.in_proj.weight"
    misshaped[victim] = torch.randn(misshaped[victim].shape[0], misshaped[victim].shape[1] + 1)
    cases["misshaped"] = (misshaped, victim)
    transposed = dict(state)
    victim = "backbone.in_proj.weight"
    transposed[victim] = transposed[victim].t().contiguous()
    cases["transposed"] = (transposed, victim)
    nan = dict(state)
    victim = "backbone.pos_embed"
    poisoned = nan[victim].clone()
    poisoned.view(-1)[5] = float("nan")
    nan[victim] = poisoned
    cases["nan"] = (nan, victim)
    inf = dict(state)
    victim = names[len(names) // 2]
    poisoned = inf[victim].clone()
    poisoned.view(-1)[0] = float("inf")
    inf[victim] = poisoned
    cases["inf"] = (inf, victim)
    wrong_dtype = dict(state)
    victim = "head.out_proj.bias"
    wrong_dtype[victim] = wrong_dtype[victim].double()
    cases["float64"] = (wrong_dtype, victim)
    return cases


@pytest.mark.parametrize("case", ["missing", "unexpected", "misshaped", "transposed", "nan", "inf", "float64"])
def test_bad_tensor_is_refused_by_name(case: str, model: ECAR, tmp_path: Path) -> None:
    tensors, victim = _tensor_cases(model)[case]
    path = write(tmp_path / f"{case}.safetensors", tensors, metadata_for(model.config))
    with pytest.raises(CheckpointError) as info:
        checkpoint.load(path)
    assert f"'{victim}'" in str(info.value), str(info.value)
    assert isinstance(info.value, ECARError)


def test_tensor_cases_are_otherwise_loadable(model: ECAR, tmp_path: Path) -> None:
    # the same writer with the untouched state loads, so each refusal above is about its one change
    path = write(tmp_path / "good.safetensors", state_of(model), metadata_for(model.config))
    loaded = checkpoint.load(path)
    assert torch.equal(loaded.backbone.pos_embed, model.backbone.pos_embed)


def test_checkpoint_for_another_config_is_refused(model: ECAR, tmp_path: Path) -> None:
    wider = model.config.replace(width=64)
    path = write(tmp_path / "mismatch.safetensors", state_of(model), metadata_for(wider))
    with pytest.raises(CheckpointError, match="shape"):
        checkpoint.load(path)


# ------------------------------------------------------------- files refused
def test_random_bytes_are_refused(tmp_path: Path) -> None:
    rng = np.random.default_rng(12)
    for index in range(4):
        data = rng.integers(0, 256, size=int(rng.integers(1, 4096)), dtype=np.uint8).tobytes()
        path = tmp_path / f"random{index}.safetensors"
        path.write_bytes(data)
        with pytest.raises(CheckpointError):
            checkpoint.load(path)
        with pytest.raises(CheckpointError):
            checkpoint.read_config(path)


@pytest.mark.parametrize("fraction", [0.0, 0.001, 0.02, 0.5, 0.999])
def test_truncated_file_is_refused(fraction: float, model: ECAR, tmp_path: Path) -> None:
    good = checkpoint.save(model, tmp_path / "good.safetensors")
    data = good.read_bytes()
    path = tmp_path / "truncated.safetensors"
    path.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(CheckpointError):
        checkpoint.load(path)


def test_missing_file_and_directory_are_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpoint.load(tmp_path / "nowhere.safetensors")
    with pytest.raises(CheckpointError):
        checkpoint.load(tmp_path)
    with pytest.raises(CheckpointError):
        checkpoint.read_config(tmp_path / "nowhere.safetensors")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"format_version": "2"}, "version"),
        ({"format_version": ""}, "version"),
        ({"format": "something-else"}, "ecar-checkpoint"),
        ({"config": "{not json"}, "config"),
        ({"config": '{"width": 33, "heads": 4}'}, "heads"),
        ({"config": '{"unknown_field": 1}'}, "unknown_field"),
    ],
    ids=["version-2", "version-empty", "format", "config-not-json", "config-invalid", "config-unknown-field"],
)
def test_bad_metadata_is_refused(changes: dict[str, str], message: str, model: ECAR, tmp_path: Path) -> None:
    path = write(tmp_path / "meta.safetensors", state_of(model), metadata_for(model.config, changes))
    with pytest.raises(CheckpointError, match=message):
        checkpoint.load(path)
    with pytest.raises(CheckpointError):
        checkpoint.read_config(path)


@pytest.mark.parametrize("drop", ["config", "format_version", "format", "all"])
def test_missing_metadata_is_refused(drop: str, model: ECAR, tmp_path: Path) -> None:
    metadata = metadata_for(model.config)
    if drop == "all":
        metadata = {}
    else:
        del metadata[drop]
    path = tmp_path / "meta.safetensors"
    save_file(state_of(model), str(path), metadata=metadata or None)
    with pytest.raises(CheckpointError):
        checkpoint.load(path)


# ------------------------------------------------------------- no unpickling
class _Exploit:
    """Unpickling this creates (opens for writing) the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


def test_exploit_payload_is_live(tmp_path: Path) -> None:
    # proves the payloads below would leave a marker if anything unpickled them
    marker = tmp_path / "proof"
    handle = pickle.loads(pickle.dumps(_Exploit(marker)))
    handle.close()
    assert marker.exists()


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_pickle_file_is_never_unpickled(protocol: int, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "model.safetensors"
    path.write_bytes(pickle.dumps(_Exploit(marker), protocol=protocol))
    assert not marker.exists()
    with pytest.raises(CheckpointError):
        checkpoint.load(path)
    with pytest.raises(CheckpointError):
        checkpoint.read_config(path)
    assert not marker.exists()


@pytest.mark.parametrize("name", ["model.pt", "model.safetensors"])
def test_torch_save_file_is_never_unpickled(name: str, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / name
    torch.save({"weights": torch.randn(3), "payload": _Exploit(marker)}, path)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="pickle"):
        checkpoint.load(path)
    assert not marker.exists()


def test_a_safetensors_header_length_that_opens_like_a_pickle_still_loads(model: ECAR, tmp_path: Path) -> None:
    # a safetensors file opens with its header's length; one in 32 lengths has the low byte 0x80 that also
    # opens a pickle, and such a checkpoint must load like any other
    path = tmp_path / "model.safetensors"
    for padding in range(0, 512, 8):
        write(path, state_of(model), metadata_for(model.config, {"note": "x" * padding}))
        if path.read_bytes()[0] == 0x80:
            break
    else:
        pytest.fail("no padding gave a header length whose low byte is 0x80")
    assert torch_files.sniff(path) == "safetensors"
    loaded = checkpoint.load(path)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
