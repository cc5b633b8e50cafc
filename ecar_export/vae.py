"""Published VAE weights into ECAR checkpoints: ``ecar-export convert``.

A ``kl`` tokenizer (:class:`ecar_export.tokenizer.KLTokenizer`) is a diffusers ``AutoencoderKL``.
Its weights are read from

* the LDM / MAR checkpoint layout: ``{'model': state_dict}``, ``{'state_dict': ...}`` or a bare state
  dict with ``encoder.*``, ``decoder.*``, ``quant_conv.*``, ``post_quant_conv.*`` (optionally under
  ``first_stage_model.`` or ``vae.``), as MAR's ``kl16.ckpt``; the names are mapped to diffusers' here
  (:func:`ldm_to_diffusers`);
* a diffusers model directory (``config.json`` and ``diffusion_pytorch_model.safetensors``) or a
  safetensors file in either naming.

Pickle-based files (``.ckpt``, ``.pth``, ``.pt``, ``.bin``) are read with ``torch.load(weights_only=True)``
(tensors and plain containers only, never arbitrary objects), and only here: ``ecar-export build`` takes
safetensors checkpoints alone. :func:`convert` joins the VAE with a backbone checkpoint and writes one
safetensors checkpoint (atomically) in the format ``ecar-export build --checkpoint`` reads, after checking
every tensor's name, shape and dtype against the model the backbone's config describes. FlowAR's
converter (:mod:`ecar_export.families.flowar.convert`) reads, checks and merges its VAE with the same
functions (:func:`read_vae`, :func:`check_layout`, :func:`merge`).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ecar_export import checkpoint, torch_files
from ecar_export.families.ecar.config import ECARConfig
from ecar_export.families.ecar.model import ECAR
from ecar_export.tokenizer import KLLayoutConfig, autoencoder_kl_config
from runtime.errors import CheckpointError
from runtime.fileio import atomic_path

PICKLE_SUFFIXES = (".ckpt", ".pth", ".pt", ".bin")
VAE_PREFIXES = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
WRAPPER_PREFIXES = ("first_stage_model.", "vae.")
TOKENIZER_PREFIX = "tokenizer.vae."
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
# config.json keys of a diffusers VAE that must agree with the model's config
_LAYOUT_KEYS = ("latent_channels", "block_out_channels", "layers_per_block", "norm_num_groups", "down_block_types")


# ------------------------------------------------------------------ reading a VAE
def read_vae(
    path: str | os.PathLike[str], origin: dict[str, str] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """The VAE's tensors under diffusers' names, and its diffusers ``config.json`` where it has one.

    ``origin``, where given, receives each diffusers name's name in the file (for messages)."""
    path = Path(path)
    if path.is_dir():
        config_file = path / "config.json"
        weights = next((path / name for name in DIFFUSERS_WEIGHTS if (path / name).is_file()), None)
        if not config_file.is_file() or weights is None:
            raise CheckpointError(
                f"'{path}' is not a diffusers VAE directory: it needs config.json and one of "
                f"{', '.join(DIFFUSERS_WEIGHTS)}"
            )
        try:
            config = json.loads(config_file.read_text())
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"'{config_file}' is not valid JSON ({exc})") from None
        if not isinstance(config, dict):
            raise CheckpointError(f"'{config_file}': a diffusers config must be a JSON object")
        return to_diffusers_names(_read_tensors(weights), weights, origin), config
    if not path.is_file():
        raise CheckpointError(
            f"VAE '{path}' does not exist; pass --vae PATH to an LDM/MAR checkpoint (.ckpt, .pth), a safetensors "
            "file or a diffusers VAE directory"
        )
    return to_diffusers_names(_read_tensors(path), path, origin), None


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as handle:
                return {name: handle.get_tensor(name) for name in handle.keys()}
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"'{path}' is not a readable safetensors file: {exc}") from None
    if path.suffix not in PICKLE_SUFFIXES:
        raise CheckpointError(
            f"'{path}': unknown VAE file type '{path.suffix}'; give a .safetensors file, a torch checkpoint "
            f"({', '.join(PICKLE_SUFFIXES)}) or a diffusers VAE directory"
        )
    loaded = torch_files.load_tensors_only(path)
    return _state_dict_of(loaded, path)


def _state_dict_of(loaded: Any, path: Path) -> dict[str, torch.Tensor]:
    """The state dict inside a loaded checkpoint: the dict itself, or its 'model' / 'state_dict' entry."""
    if isinstance(loaded, dict):
        for key in ("model", "state_dict"):
            if isinstance(loaded.get(key), dict):
                loaded = loaded[key]
                break
    if not isinstance(loaded, dict) or not loaded:
        raise CheckpointError(f"'{path}' holds no state dict (a dict of tensors, or one under 'model' or 'state_dict')")
    state = {str(name): value for name, value in loaded.items() if isinstance(value, torch.Tensor)}
    if not state:
        raise CheckpointError(f"'{path}' holds no tensors")
    return state


def to_diffusers_names(
    state: dict[str, torch.Tensor], path: Path, origin: dict[str, str] | None = None
) -> dict[str, torch.Tensor]:
    """The VAE tensors of ``state`` (wrapper prefixes stripped, other tensors such as a loss dropped) under
    diffusers' names; ``origin``, where given, receives each new name's name in ``state``."""
    vae: dict[str, torch.Tensor] = {}
    stripped: dict[str, str] = {}
    for original, tensor in state.items():
        name = original
        for prefix in WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix) :]
                break
        if name.startswith(VAE_PREFIXES):
            vae[name] = tensor
            stripped[name] = original
    if not vae:
        raise CheckpointError(
            f"'{path}' holds no VAE tensors (names starting with {', '.join(VAE_PREFIXES)}); is it a VAE checkpoint?"
        )
    renamed: dict[str, str] = {}
    if any(re.match(r"(encoder\.down|decoder\.up|(en|de)coder\.mid)\.", name) for name in vae):
        vae = ldm_to_diffusers(vae, renamed)
    if origin is not None:
        origin.update({name: stripped[renamed.get(name, name)] for name in vae})
    return vae


# LDM names -> diffusers names, inside one resnet or attention block
_RESNET = {"nin_shortcut": "conv_shortcut"}
_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def ldm_to_diffusers(state: dict[str, torch.Tensor], renamed: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """LDM / MAR autoencoder names (``decoder.up.0.block.1.conv1.weight``) as diffusers names
    (``decoder.up_blocks.N.resnets.1.conv1.weight``: diffusers counts the decoder's levels from the
    lowest resolution). Attention projections, 1x1 convolutions in LDM, become the matrices of
    diffusers' linear layers. Names that fit no rule stay as they are (and are refused later). ``renamed``, where
    given, receives each new name's LDM name."""
    levels = 1 + max((int(m.group(1)) for n in state if (m := re.match(r"decoder\.up\.(\d+)\.", n))), default=-1)
    converted: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        new, attention = _ldm_name(name, levels)
        if attention and tensor.dim() == 4 and name.endswith(".weight") and not new.endswith("group_norm.weight"):
            tensor = tensor[:, :, 0, 0]
        converted[new] = tensor
        if renamed is not None:
            renamed[new] = name
    return converted


def _ldm_name(name: str, levels: int) -> tuple[str, bool]:
    """One LDM name in diffusers' spelling, and whether it belongs to an attention block."""
    part, _, rest = name.partition(".")
    if part not in ("encoder", "decoder"):
        return name, False
    if m := re.fullmatch(r"mid\.block_(\d)\.(\w+)\.(\w+)", rest):
        layer = _RESNET.get(m.group(2), m.group(2))
        return f"{part}.mid_block.resnets.{int(m.group(1)) - 1}.{layer}.{m.group(3)}", False
    if m := re.fullmatch(r"mid\.attn_1\.(\w+)\.(\w+)", rest):
        return f"{part}.mid_block.attentions.0.{_ATTENTION.get(m.group(1), m.group(1))}.{m.group(2)}", True
    if m := re.fullmatch(r"(down|up)\.(\d+)\.(block|attn)\.(\d+)\.(\w+)\.(\w+)", rest):
        kind, level, block, index, layer, param = m.groups()
        level_index = int(level) if kind == "down" else levels - 1 - int(level)
        if block == "block":
            return f"{part}.{kind}_blocks.{level_index}.resnets.{index}.{_RESNET.get(layer, layer)}.{param}", False
        new_layer = _ATTENTION.get(layer, layer)
        return f"{part}.{kind}_blocks.{level_index}.attentions.{index}.{new_layer}.{param}", True
    if m := re.fullmatch(r"(down|up)\.(\d+)\.(downsample|upsample)\.conv\.(\w+)", rest):
        kind, level, sampler, param = m.groups()
        level_index = int(level) if kind == "down" else levels - 1 - int(level)
        return f"{part}.{kind}_blocks.{level_index}.{sampler}rs.0.conv.{param}", False
    if rest.startswith("norm_out."):
        return f"{part}.conv_norm_out.{rest[len('norm_out.') :]}", False
    return name, False


# ------------------------------------------------------------------ checking against the model
def vae_layout(state: dict[str, torch.Tensor]) -> tuple[int | None, int]:
    """(latent channels, decoder levels) of a VAE under diffusers' names."""
    conv_in = state.get("decoder.conv_in.weight")
    channels = int(conv_in.shape[1]) if conv_in is not None and conv_in.dim() == 4 else None
    levels = len({m.group(1) for n in state if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", n))})
    return channels, levels


def check_vae(
    state: dict[str, torch.Tensor], vae_config: dict[str, Any] | None, config: ECARConfig, where: str
) -> None:
    """Refuse a VAE that does not fit the ECAR model ``config`` describes, naming the first misfit."""
    if config.tokenizer != "kl":
        raise CheckpointError(
            f"the backbone's config uses the '{config.tokenizer}' tokenizer; a published VAE replaces a 'kl' "
            "tokenizer only (set tokenizer='kl' and its layout in the model config)"
        )
    check_layout(state, vae_config, config, where)


def check_layout(
    state: dict[str, torch.Tensor], vae_config: dict[str, Any] | None, config: KLLayoutConfig, where: str
) -> None:
    """Refuse a VAE whose latent grid (or diffusers ``config.json``) does not fit the layout of ``config``'s KL
    tokenizer, whatever the model family."""
    channels, levels = vae_layout(state)
    want_levels = len(config.tokenizer_channels)
    if channels != config.latent_channels or levels != want_levels:
        makes = f"{channels}-channel latents at factor {2 ** (levels - 1) if levels else '?'} ({levels} levels)"
        raise CheckpointError(
            f"{where}: the VAE's layout does not match the model's latent grid: it makes {makes}, the model needs "
            f"{config.latent_channels}-channel latents at factor {config.tokenizer_factor} ({want_levels} levels: "
            f"{config.latent_size}×{config.latent_size}×{config.latent_channels} latents from {config.image_size}² "
            "images); choose the VAE the backbone was trained with"
        )
    if vae_config is not None:
        expected = autoencoder_kl_config(config)
        for key in _LAYOUT_KEYS:
            if key not in vae_config:
                continue
            found: Any = list(vae_config[key]) if isinstance(vae_config[key], (list, tuple)) else vae_config[key]
            if found != expected[key]:
                raise CheckpointError(
                    f"{where}: config.json has {key} = {vae_config[key]!r}, the model's config needs {expected[key]!r}"
                )
        scale = vae_config.get("scaling_factor")
        if isinstance(scale, (int, float)) and abs(scale - config.latent_scale) > 1e-6 * max(1.0, abs(scale)):
            raise CheckpointError(
                f"{where}: config.json has scaling_factor {scale}, the model's config latent_scale "
                f"{config.latent_scale}; the backbone must have been trained on latents of this VAE at this scale"
            )


Skeleton = dict[str, tuple[tuple[int, ...], torch.dtype]]  # a model's state dict: names, shapes, dtypes


def skeleton(model_class: Callable[[Any], torch.nn.Module], config: Any) -> Skeleton:
    """Every tensor of ``model_class(config)``, built on the meta device (no memory)."""
    with torch.device("meta"):
        model = model_class(config)
    return {name: (tuple(t.shape), t.dtype) for name, t in model.state_dict().items()}


def merge(
    backbone: dict[str, torch.Tensor],
    vae: dict[str, torch.Tensor],
    expected: Skeleton,
    backbone_where: str,
    vae_where: str,
    origin: dict[str, str] | None = None,
) -> dict[str, torch.Tensor]:
    """The model's full state dict: the backbone's tensors and the VAE's under ``tokenizer.vae.``, checked
    against ``expected`` (the model's :func:`skeleton`). ``origin`` (from :func:`read_vae`) lets messages
    name a VAE tensor as the file does too."""

    def in_file(vae_name: str) -> str:
        found = (origin or {}).get(vae_name, vae_name)
        return f" (in the file: '{found}')" if found != vae_name else ""

    tensors = {name: t for name, t in backbone.items() if not name.startswith("tokenizer.")}
    tensors.update({TOKENIZER_PREFIX + name: t for name, t in vae.items()})
    for name in sorted(set(expected) - set(tensors)):
        if name.startswith(TOKENIZER_PREFIX):
            missing = sorted(n for n in expected if n not in tensors and n.startswith(TOKENIZER_PREFIX))
            raise CheckpointError(
                f"{vae_where} lacks VAE tensor '{name[len(TOKENIZER_PREFIX) :]}' of shape {expected[name][0]} "
                f"({len(missing)} missing in all; diffusers names)"
            )
        raise CheckpointError(f"{backbone_where} lacks tensor '{name}' of shape {expected[name][0]}")
    for name in sorted(set(tensors) - set(expected)):
        if name.startswith(TOKENIZER_PREFIX):
            extra = [n for n in tensors if n not in expected and n.startswith(TOKENIZER_PREFIX)]
            vae_name = name[len(TOKENIZER_PREFIX) :]
            raise CheckpointError(
                f"{vae_where} holds VAE tensor '{vae_name}' (shape {tuple(tensors[name].shape)}) that the model's "
                f"layout lacks ({len(extra)} in all; diffusers names){in_file(vae_name)}"
            )
        raise CheckpointError(f"{backbone_where} holds unexpected tensor '{name}' (shape {tuple(tensors[name].shape)})")
    for name, (shape, dtype) in expected.items():
        tensor = tensors[name]
        where, shown = (
            (vae_where, f"VAE tensor '{name[len(TOKENIZER_PREFIX) :]}'")
            if name.startswith(TOKENIZER_PREFIX)
            else (backbone_where, f"tensor '{name}'")
        )
        note = in_file(name[len(TOKENIZER_PREFIX) :]) if name.startswith(TOKENIZER_PREFIX) else ""
        if tuple(tensor.shape) != shape:
            raise CheckpointError(
                f"{where}: {shown} has shape {tuple(tensor.shape)}, the model's config needs {shape}{note}"
            )
        if not tensor.is_floating_point():
            raise CheckpointError(f"{where}: {shown} is {tensor.dtype}, a weight must be a floating-point tensor{note}")
        if not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{where}: {shown} holds NaN or infinite values{note}")
        tensors[name] = tensor.to(dtype).contiguous()
    return tensors


def convert(
    backbone_path: str | os.PathLike[str], vae_path: str | os.PathLike[str], out: str | os.PathLike[str]
) -> Path:
    """Write ``out``: the backbone checkpoint's config and weights with the VAE at ``vae_path`` as its tokenizer.

    Nothing is written unless every tensor fits; the file appears atomically.
    """
    backbone_file = Path(backbone_path)
    config = checkpoint.read_config(backbone_file)  # safetensors only; refuses pickles and foreign files
    with safe_open(str(backbone_file), framework="pt") as handle:
        backbone = {name: handle.get_tensor(name) for name in handle.keys()}
    vae_where = f"VAE '{vae_path}'"
    origin: dict[str, str] = {}
    vae, vae_config = read_vae(vae_path, origin)
    check_vae(vae, vae_config, config, vae_where)
    tensors = merge(backbone, vae, skeleton(ECAR, config), f"'{backbone_file}'", vae_where, origin)
    target = Path(out)
    metadata = {
        "format": checkpoint.FORMAT,
        "format_version": checkpoint.FORMAT_VERSION,
        "config": config.to_json(),
    }
    with atomic_path(target) as temp:  # OutputError (no partial file) where it cannot be written
        save_file(tensors, str(temp), metadata=metadata)
    return target
