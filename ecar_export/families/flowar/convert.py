"""Convert the authors' FlowAR checkpoints (``FlowAR-S.pth`` and so on) and MAR's KL-16 VAE (``kl16.ckpt``)
into one safetensors checkpoint (``ecar-export convert --flowar FlowAR-S.pth --vae kl16.ckpt --out ...``).

The ``.pth`` is read only with ``torch.load(weights_only=True)``: anything other than tensors and
plain containers is refused by torch's restricted unpickler. The state dict may be flat (as the
released files are loaded by the authors' eval script) or sit under ``model_ema`` or ``model``.
The VAE is read, renamed (LDM names to diffusers') and checked by :mod:`ecar_export.vae`, as for
ECAR, and lands under ``tokenizer.vae.``.

Key names need no mapping: this package's modules carry the authors' names. The authors' persistent
buffers are the only difference; they are checked and dropped, since this package derives them:

* ``mask``: the block-causal training mask ``[1, 1, T, T]`` (unused when sampling);
* ``<...>.rope.freqs``: the RoPE frequencies of every attention and cross-attention module.

Anything else that does not fit the model (an unknown key, a missing key, a wrong shape) is refused
with a :class:`CheckpointError` naming the key (and the shapes). The result carries the config and
the family name in its metadata and is written atomically; nothing is written on a refusal.
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
from ecar_export import vae as vae_io
from ecar_export.families.flowar.config import PRESETS, FlowARConfig
from ecar_export.families.flowar.layers import RoPE2D
from ecar_export.families.flowar.model import FlowAR
from runtime.errors import CheckpointError, ConfigError, shown
from runtime.fileio import atomic_path
from runtime.formats import Format

FORMAT = Format("flowar-checkpoint", "1", "checkpoint", "a FlowAR checkpoint", CheckpointError, "convert it again")
FAMILY = "flowar"  # the metadata's model family
ENTRIES = ("model_ema", "model")  # where a wrapped state dict may sit, in order of preference
MASK_KEY = "mask"
ROPE_SUFFIX = ".rope.freqs"


def is_buffer_key(key: str) -> bool:
    """Whether ``key`` names one of the authors' persistent buffers (recomputed here, never loaded)."""
    return key == MASK_KEY or key.endswith(ROPE_SUFFIX)


def buffer_shapes(config: FlowARConfig) -> dict[str, tuple[int, ...]]:
    """The authors' persistent buffers for ``config`` and their shapes."""
    with torch.device("meta"):
        model = FlowAR(config, tokenizer=False)
    shapes: dict[str, tuple[int, ...]] = {MASK_KEY: (1, 1, config.total_tokens, config.total_tokens)}
    for name, module in model.named_modules():
        if isinstance(module, RoPE2D):
            shapes[name + ".freqs"] = tuple(module.get_buffer("freqs").shape)
    return shapes


def model_shapes(config: FlowARConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of the generator this package loads, with its shape (the authors' keys less their buffers)."""
    with torch.device("meta"):
        model = FlowAR(config, tokenizer=False)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def is_tokenizer_key(key: str) -> bool:
    """Whether ``key`` names a tensor of the decoder (``tokenizer.vae.*``), not of the authors' generator."""
    return key.startswith("tokenizer.")


def tokenizer_skeleton(config: FlowARConfig) -> vae_io.Skeleton:
    """The decoder's tensors (``tokenizer.vae.*``): names, shapes and dtypes."""
    return {k: v for k, v in vae_io.skeleton(FlowAR, config).items() if is_tokenizer_key(k)}


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
    """The preset (FlowAR-S, -L, -H, or a reduced test preset) the generator tensors of ``state`` were made for.

    The preset with the most tensors of the right name and shape wins if that is more than half of its tensors,
    so that a checkpoint with one wrong tensor is still recognised and then refused naming that tensor.
    """
    found = {key: tuple(t.shape) for key, t in state.items() if not is_buffer_key(key)}
    best, best_share = None, 0.0
    for config in PRESETS.values():
        expected = model_shapes(config)
        share = sum(found.get(key) == shape for key, shape in expected.items()) / len(expected)
        if share > best_share:
            best, best_share = config, share
    if best is None or best_share <= 0.5:
        raise CheckpointError(
            "the checkpoint's tensors fit none of the FlowAR presets "
            f"({', '.join(PRESETS)}); give the one it was trained as (ecar-export convert --config NAME)"
        )
    return best


def save(tensors: Mapping[str, torch.Tensor], config: FlowARConfig, path: str | os.PathLike[str]) -> Path:
    """Write ``tensors`` (this package's layout) and ``config`` to a safetensors file, atomically."""
    metadata = {
        "format": FORMAT.name,
        "format_version": str(FORMAT.version),
        "family": FAMILY,
        "config": config.to_json(),
    }
    target = Path(path)
    with atomic_path(target) as temp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(temp), metadata=metadata)
    return target


def convert(
    source: str | os.PathLike[str],
    vae: str | os.PathLike[str],
    target: str | os.PathLike[str],
    config: FlowARConfig | None = None,
    entry: str | None = None,
) -> Path:
    """Read an authors' ``.pth`` and a VAE (MAR's ``kl16.ckpt``, or any form :func:`ecar_export.vae.read_vae`
    reads), check both against ``config`` (default: the preset the ``.pth``'s shapes match) and write the
    safetensors checkpoint ``target`` holding both. Nothing is written unless every tensor fits."""
    state = read_official(source, entry)
    inferred = config is None
    config = config or guess_config(state)
    try:
        generator = to_model_state(state, config, f"'{source}'")
    except CheckpointError as exc:
        if not inferred:
            raise
        raise CheckpointError(f"{exc} ({config.name} inferred from the other tensors' shapes)") from None
    vae_where = f"VAE '{vae}'"
    origin: dict[str, str] = {}
    vae_state, vae_config = vae_io.read_vae(vae, origin)
    vae_io.check_layout(vae_state, vae_config, config, vae_where)
    expected = vae_io.skeleton(FlowAR, config)
    tensors = vae_io.merge(generator, vae_state, expected, f"'{source}'", vae_where, origin)
    return save(tensors, config, target)


def load(path: str | os.PathLike[str], tokenizer: bool = True) -> FlowAR:
    """A :class:`FlowAR` (eval mode) from a file :func:`convert` or :func:`save` wrote.

    With ``tokenizer=False`` the decoder is left out (and not read): the generator alone, which is all a file
    :func:`save` wrote from the authors' ``.pth`` alone holds (the golden fixtures).
    """
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
            decoder = {k: shape for k, (shape, _) in tokenizer_skeleton(config).items()} if tokenizer else {}
            for name, shape in stored.items():  # shapes before any allocation the file asks for
                want = expected.get(name, decoder.get(name))
                if want is not None and shape != want:
                    raise CheckpointError(f"'{path}': key '{name}' has shape {shape}, {config.name} needs {want}")
            if tokenizer:
                _check_decoder_keys(path, stored, decoder)
            names = [name for name in stored if tokenizer or not is_tokenizer_key(name)]
            tensors = {name: handle.get_tensor(name) for name in names}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"'{path}' is not a readable safetensors checkpoint: {shown(exc, 200)}") from None
    generator = to_model_state({k: v for k, v in tensors.items() if not is_tokenizer_key(k)}, config, f"'{path}'")
    model = FlowAR(config, tokenizer=tokenizer)
    decoder_tensors = {k: v for k, v in tensors.items() if is_tokenizer_key(k)}
    for name, tensor in decoder_tensors.items():
        if not tensor.is_floating_point() or not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"'{path}': key '{name}' is not a finite floating-point tensor")
    model.load_state_dict({**generator, **{k: v.float() for k, v in decoder_tensors.items()}}, strict=True)
    return model.eval()


def _check_decoder_keys(
    path: Path, stored: Mapping[str, tuple[int, ...]], decoder: Mapping[str, tuple[int, ...]]
) -> None:
    """A full checkpoint holds every decoder tensor and no other ``tokenizer.*`` tensor."""
    found = {name for name in stored if is_tokenizer_key(name)}
    if not found:
        raise CheckpointError(
            f"'{path}' holds FlowAR's generator but no decoder (tokenizer.vae.* tensors); convert it with its VAE: "
            "ecar-export convert --flowar FLOWAR.pth --vae kl16.ckpt --out PATH"
        )
    missing, unknown = sorted(set(decoder) - found), sorted(found - set(decoder))
    if missing:
        raise CheckpointError(
            f"'{path}': missing key '{missing[0]}' (shape {decoder[missing[0]]}; {len(missing)} missing in all)"
        )
    if unknown:
        raise CheckpointError(f"'{path}': unexpected key '{unknown[0]}' (shape {stored[unknown[0]]})")
