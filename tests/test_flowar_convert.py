"""Converting the authors' FlowAR checkpoints: what is accepted, what is refused and how it is named."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from ecar_export.families.flowar import convert
from ecar_export.families.flowar.config import FLOWAR_H, FLOWAR_L, FLOWAR_S, FLOWAR_TINY, FlowARConfig
from ecar_export.families.flowar.model import FlowAR
from runtime.errors import CheckpointError, ConfigError, ECARError


class Payload:
    """An object a malicious pickle could carry: unpickling it would run ``Path.touch``."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (Path.touch, (str(self.target),))  # type: ignore[return-value]


def official_state(config: FlowARConfig = FLOWAR_TINY, seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict as the authors' model writes it: this package's tensors plus their persistent buffers."""
    torch.manual_seed(seed)
    state = dict(FlowAR(config).state_dict())
    for key, shape in convert.buffer_shapes(config).items():
        if key == convert.MASK_KEY:
            state[key] = torch.zeros(shape)
        else:
            state[key] = convert.RoPE2D(4 * shape[0]).get_buffer("freqs").clone()
    return state


@pytest.mark.parametrize("wrap", [None, "model", "model_ema"])
def test_official_layout_converts_and_loads(tmp_path: Path, wrap: str | None) -> None:
    state = official_state()
    source = tmp_path / "FlowAR-tiny.pth"
    saved: dict[str, object] = dict(state) if wrap is None else {wrap: state, "epoch": 3}
    if wrap == "model_ema":
        saved["model"] = official_state(seed=1)  # the EMA weights are preferred
    torch.save(saved, source)
    target = convert.convert(source, tmp_path / "out" / "flowar.safetensors", FLOWAR_TINY)
    model = convert.load(target)
    assert model.config == FLOWAR_TINY and not model.training
    loaded = model.state_dict()
    assert set(loaded) == {k for k in state if not convert.is_buffer_key(k)}
    assert all(torch.equal(loaded[k], state[k]) for k in loaded)


def refusal(tmp_path: Path, state: dict[str, torch.Tensor]) -> str:
    source = tmp_path / "bad.pth"
    torch.save(state, source)
    with pytest.raises(CheckpointError) as info:
        convert.convert(source, tmp_path / "bad.safetensors", FLOWAR_TINY)
    assert not (tmp_path / "bad.safetensors").exists()
    assert isinstance(info.value, ECARError)
    return str(info.value)


def test_unknown_key_is_refused(tmp_path: Path) -> None:
    state = official_state()
    state["flownet.extra.weight"] = torch.zeros(3, 5)
    message = refusal(tmp_path, state)
    assert "'flownet.extra.weight'" in message and "(3, 5)" in message


def test_missing_key_is_refused(tmp_path: Path) -> None:
    state = official_state()
    del state["decoder_blocks.1.mlp.fc2.bias"]
    message = refusal(tmp_path, state)
    assert "missing key 'decoder_blocks.1.mlp.fc2.bias'" in message and "(32,)" in message


def test_wrong_shape_is_refused_naming_both_shapes(tmp_path: Path) -> None:
    state = official_state()
    state["flownet.input_proj.weight"] = torch.zeros(64, 8)
    message = refusal(tmp_path, state)
    assert re.search(r"'flownet\.input_proj\.weight' has shape \(64, 8\).*needs \(64, 16\)", message), message


def test_buffers_are_checked_not_loaded(tmp_path: Path) -> None:
    state = official_state()
    state["encoder_blocks.0.attn.rope.freqs"] = state["encoder_blocks.0.attn.rope.freqs"] * 2
    assert "'encoder_blocks.0.attn.rope.freqs'" in refusal(tmp_path, state)
    state = official_state()
    state["mask"] = torch.zeros(1, 1, 5, 5)
    message = refusal(tmp_path, state)
    assert "'mask'" in message and "(1, 1, 5, 5)" in message and "(1, 1, 341, 341)" in message


def test_pickled_objects_are_refused_unexecuted(tmp_path: Path) -> None:
    marker = tmp_path / "executed"
    state: dict[str, object] = dict(official_state())
    state["payload"] = Payload(marker)
    source = tmp_path / "evil.pth"
    torch.save(state, source)
    with pytest.raises(
        CheckpointError, match="weights_only=True refused it: WeightsUnpickler error: Unsupported global"
    ):
        convert.read_official(source)
    assert not marker.exists()


def test_non_tensor_entries_and_non_checkpoints_are_refused(tmp_path: Path) -> None:
    source = tmp_path / "odd.pth"
    torch.save({"model": {"z_proj.weight": [1.0, 2.0]}}, source)
    with pytest.raises(CheckpointError, match="'z_proj.weight' is a list"):
        convert.read_official(source)
    (tmp_path / "text.pth").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="not a torch checkpoint"):
        convert.read_official(tmp_path / "text.pth")
    with pytest.raises(CheckpointError, match="does not exist"):
        convert.read_official(tmp_path / "absent.pth")


def test_load_refuses_a_foreign_safetensors_file(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"), metadata={"format": "ecar-checkpoint"})
    with pytest.raises(CheckpointError, match="not a FlowAR checkpoint"):
        convert.load(tmp_path / "other.safetensors")


def test_presets_have_the_published_sizes_and_are_recognised() -> None:
    expected = {FLOWAR_S: (171_718_072, 189), FLOWAR_L: (586_862_912, 443), FLOWAR_H: (1_913_316_880, 611)}
    for config, (parameters, tensors) in expected.items():
        with torch.device("meta"):
            state = FlowAR(config).state_dict()
        assert (sum(t.numel() for t in state.values()), len(state)) == (parameters, tensors), config.name
        assert convert.guess_config(state) == config
        assert len(convert.buffer_shapes(config)) == {"flowar-s": 15, "flowar-l": 41, "flowar-h": 55}[config.name]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"heads": 5}, "heads"),
        ({"head_width": 100}, "head_width"),
        ({"scales": (1, 2, 4, 8)}, "scales"),
        ({"scales": (1, 3, 16)}, "resample_size"),
        ({"steps": 1}, "steps"),
        ({"guidance": 1.5}, "guidance"),
        ({"cfg": float("nan")}, "cfg"),
        ({"width": 10**9}, "width"),
        ({"cross": 1}, "cross"),
    ],
)
def test_config_fields_are_bounds_checked(change: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError, match=f"'{field}'"):
        FLOWAR_TINY.replace(**change)


def test_config_json_round_trip() -> None:
    for config in (FLOWAR_S, FLOWAR_L, FLOWAR_H, FLOWAR_TINY):
        assert FlowARConfig.from_json(config.to_json()) == config
    with pytest.raises(ConfigError, match="unknown FlowAR config field"):
        FlowARConfig.from_dict({"depth": 3})
