"""Convert the authors' FlowAR checkpoints (``FlowAR-S.pth`` and so on) into safetensors files.

The ``.pth`` is read only with ``torch.load(weights_only=True)``: anything other than tensors and
plain containers is refused by torch's restricted unpickler. The state dict may be flat (as the
released files are loaded by the authors' eval script) or sit under ``model_ema`` or ``model``.

Key names need no mapping: this package's modules carry the authors' names. The authors' persistent
buffers are the only difference; they are checked and dropped, since this package derives them:

* ``mask``: the block-causal training mask ``[1, 1, T, T]`` (unused when sampling);
* ``<...>.rope.freqs``: the RoPE frequencies of every attention and cross-attention module.

Anything else that does not fit the model (an unknown key, a missing key, a wrong shape) is refused
with a :class:`CheckpointError` naming the key. The result carries the config in its metadata and is
written atomically.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ecar_export import torch_files
from ecar_export.families.flowar.config import FLOWAR_H, FLOWAR_L, FLOWAR_S, FlowARConfig
from ecar_export.families.flowar.layers import RoPE2D
from ecar_export.families.flowar.model import FlowAR
from runtime.errors import CheckpointError, ConfigError, shown
from runtime.fileio import atomic_path
from runtime.formats import Format

FORMAT = Format("flowar-checkpoint", "1", "checkpoint", "a FlowAR checkpoint", CheckpointError, "convert it again")
ENTRIES = ("model_ema", "model")  # where a wrapped state dict may sit, in order of preference
MASK_KEY = "mask"
ROPE_SUFFIX = ".rope.freqs"


def is_buffer_key(key: str) -> bool:
    """Whether ``key`` names one of the authors' persistent buffers (recomputed here, never loaded)."""
    return key == MASK_KEY or key.endswith(ROPE_SUFFIX)


def buffer_shapes(config: FlowARConfig) -> dict[str, tuple[int, ...]]:
    """The authors' persistent buffers for ``config`` and their shapes."""
    with torch.device("meta"):
        model = FlowAR(config)
    shapes: dict[str, tuple[int, ...]] = {MASK_KEY: (1, 1, config.total_tokens, config.total_tokens)}
    for name, module in model.named_modules():
        if isinstance(module, RoPE2D):
            shapes[name + ".freqs"] = tuple(module.get_buffer("freqs").shape)
    return shapes


def model_shapes(config: FlowARConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor this package's model loads, with its shape (the authors' keys less their buffers)."""
    with torch.device("meta"):
        model = FlowAR(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def read_official(path: str | os.PathLike[str], entry: str | None = None) -> dict[str, torch.Tensor]:
    """The state dict in an authors' ``.pth``: flat, or under ``entry`` (by default ``model_ema`` if present,
    else ``model``)."""
    path = Path(path)
    loaded = torch_files.load_tensors_only(path)
    if not isinstance(loaded, Mapping):
        raise CheckpointError(f"'{path}' holds a {type(loaded).__name__}, not a state dict")
    names = (entry,) if entry is not None else ENTRIES
    for name in names:
        inner = loaded.get(name)
        if isinstance(inner, Mapping):
            loaded = inner
            break
    else:
        if entry is not None:
            raise CheckpointError(f"'{path}' has no state dict under '{entry}' (top-level keys: {sorted(loaded)[:8]})")
    state: dict[str, torch.Tensor] = {}
    for key, value in loaded.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"'{path}': entry {shown(key)} is a {type(value).__name__}, not a tensor")
        state[str(key)] = value
    return state


def to_model_state(
    state: Mapping[str, torch.Tensor], config: FlowARConfig, where: str = "checkpoint"
) -> dict[str, torch.Tensor]:
    """The float32 tensors :class:`FlowAR` loads, from a state dict in the authors' layout.

    Buffers are checked (shape; RoPE frequencies also by value) and dropped; unknown keys, missing
    keys, wrong shapes, non-float or non-finite tensors are refused.
    """
    expected, buffers = model_shapes(config), buffer_shapes(config)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        shape = tuple(tensor.shape)
        if key in buffers:
            if shape != buffers[key]:
                raise CheckpointError(f"{where}: buffer '{key}' has shape {shape}, {config.name} needs {buffers[key]}")
            if key.endswith(ROPE_SUFFIX):
                derived = RoPE2D(4 * shape[0]).get_buffer("freqs")
                if not torch.allclose(tensor.float(), derived, rtol=1e-6, atol=0.0):
                    raise CheckpointError(f"{where}: buffer '{key}' differs from the RoPE frequencies of the model")
            continue
        if key not in expected:
            raise CheckpointError(f"{where}: unexpected key '{key}' (shape {shape}); {config.name} has no such tensor")
        if shape != expected[key]:
            raise CheckpointError(
                f"{where}: key '{key}' has shape {shape} in the checkpoint, {config.name} needs {expected[key]}"
            )
        if not tensor.is_floating_point():
            raise CheckpointError(f"{where}: key '{key}' is {tensor.dtype}, expected floating point")
        tensor = tensor.detach().to(torch.float32).contiguous()
        if not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{where}: key '{key}' holds NaN or infinite values")
        out[key] = tensor
    missing = sorted(set(expected) - set(out))
    if missing:
        raise CheckpointError(
            f"{where}: missing key '{missing[0]}' (shape {expected[missing[0]]}; {len(missing)} missing in all)"
        )
    return out


def guess_config(state: Mapping[str, torch.Tensor]) -> FlowARConfig:
    """The preset (FlowAR-S, -L or -H) whose tensor shapes ``state`` has."""
    found = {key: tuple(t.shape) for key, t in state.items() if not is_buffer_key(key)}
    for config in (FLOWAR_S, FLOWAR_L, FLOWAR_H):
        if model_shapes(config) == found:
            return config
    raise CheckpointError("the checkpoint's tensors fit none of FlowAR-S, -L, -H; pass the config it was trained with")


def save(tensors: Mapping[str, torch.Tensor], config: FlowARConfig, path: str | os.PathLike[str]) -> Path:
    """Write ``tensors`` (this package's layout) and ``config`` to a safetensors file, atomically."""
    metadata = {"format": FORMAT.name, "format_version": str(FORMAT.version), "config": config.to_json()}
    target = Path(path)
    with atomic_path(target) as temp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(temp), metadata=metadata)
    return target


def convert(
    source: str | os.PathLike[str],
    target: str | os.PathLike[str],
    config: FlowARConfig | None = None,
    entry: str | None = None,
) -> Path:
    """Read an authors' ``.pth``, check it against ``config`` (default: the preset its shapes match) and
    write the safetensors file ``target``."""
    state = read_official(source, entry)
    config = config or guess_config(state)
    return save(to_model_state(state, config, f"'{source}'"), config, target)


def load(path: str | os.PathLike[str]) -> FlowAR:
    """A :class:`FlowAR` (eval mode) from a file :func:`convert` or :func:`save` wrote."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata: dict[str, Any] = handle.metadata() or {}
            FORMAT.check(metadata, f"'{path}'")
            try:
                config = FlowARConfig.from_json(metadata.get("config", ""))
            except ConfigError as exc:
                raise CheckpointError(f"'{path}': {exc}") from None
            stored = {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
            expected = model_shapes(config)
            for name, shape in stored.items():  # shapes before any allocation the file asks for
                if name in expected and shape != expected[name]:
                    raise CheckpointError(
                        f"'{path}': key '{name}' has shape {shape}, {config.name} needs {expected[name]}"
                    )
            tensors = {name: handle.get_tensor(name) for name in stored}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"'{path}' is not a readable safetensors checkpoint: {shown(exc, 200)}") from None
    model = FlowAR(config)
    model.load_state_dict(to_model_state(tensors, config, f"'{path}'"), strict=True)
    return model.eval()
