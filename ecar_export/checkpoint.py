"""ECAR checkpoints: safetensors files with the model config in their metadata.

Loading never unpickles anything: pickle and ``torch.save`` archives are refused.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ecar_export import torch_files
from ecar_export.families.ecar.config import ECARConfig
from ecar_export.families.ecar.model import ECAR
from runtime.errors import CheckpointError
from runtime.fileio import atomic_path
from runtime.formats import Format

FORMAT = "ecar-checkpoint"
FORMAT_VERSION = "1"
CHECKPOINT_FORMAT = Format(
    FORMAT, FORMAT_VERSION, "checkpoint", "an ECAR checkpoint", CheckpointError, "convert or save it again"
)


def save(model: ECAR, path: str | os.PathLike[str]) -> Path:
    """Write the model's weights and config to ``path`` atomically."""
    state = {name: tensor.detach().contiguous().cpu() for name, tensor in model.state_dict().items()}
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": model.config.to_json()}
    target = Path(path)
    with atomic_path(target) as temp:
        save_file(state, str(temp), metadata=metadata)
    return target


def _metadata(path: Path) -> dict[str, str]:
    """A safetensors file's metadata, without loading a tensor."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"'{path}' is not a readable safetensors checkpoint: {exc}") from None


def read_config(path: str | os.PathLike[str]) -> ECARConfig:
    """The config stored in a checkpoint, without loading its tensors."""
    path = _existing(path)
    return _config_from(path, _metadata(path))


def family_of(path: str | os.PathLike[str]) -> str:
    """The model family a safetensors checkpoint names in its metadata (``ecar`` where it names none), read
    without loading a tensor; pickles and missing or unreadable files are refused as :func:`load` refuses them."""
    return str(_metadata(_existing(path)).get("family", "ecar"))


def load(path: str | os.PathLike[str]) -> ECAR:
    """Build an :class:`ECAR` from a checkpoint, refusing anything that does not fit it exactly."""
    path = _existing(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            config = _config_from(path, handle.metadata() or {})
            _check_header(path, handle, config)  # before anything the config sizes is allocated
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"'{path}' is not a readable safetensors checkpoint: {exc}") from None
    model = ECAR(config)
    expected = model.state_dict()
    for name, reference in expected.items():
        tensor = tensors[name]
        if tuple(tensor.shape) != tuple(reference.shape):
            raise CheckpointError(
                f"'{path}': tensor '{name}' has shape {tuple(tensor.shape)}, the config needs {tuple(reference.shape)}"
            )
        if tensor.dtype != reference.dtype:
            raise CheckpointError(f"'{path}': tensor '{name}' is {tensor.dtype}, expected {reference.dtype}")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"'{path}': tensor '{name}' holds NaN or infinite values")
    model.load_state_dict(tensors, strict=True)
    return model.eval()


def _check_header(path: Path, handle: Any, config: ECARConfig) -> None:
    """The file's tensor names and shapes (its header) against the model ``config`` describes, built on the
    meta device (no memory): a config that does not fit its tensors is refused before any allocation."""
    with torch.device("meta"):
        skeleton = ECAR(config)
    expected = {name: tuple(t.shape) for name, t in skeleton.state_dict().items()}
    stored = set(handle.keys())
    missing = sorted(set(expected) - stored)
    if missing:
        raise CheckpointError(f"'{path}' lacks tensor '{missing[0]}' ({len(missing)} missing in all)")
    unexpected = sorted(stored - set(expected))
    if unexpected:
        raise CheckpointError(f"'{path}' holds unexpected tensor '{unexpected[0]}' ({len(unexpected)} in all)")
    for name, shape in expected.items():
        found = tuple(handle.get_slice(name).get_shape())
        if found != shape:
            raise CheckpointError(
                f"'{path}': tensor '{name}' has shape {found}, the config needs {shape} (is the config in the "
                "checkpoint's metadata the one its tensors were trained with?)"
            )


def _existing(path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint '{path}' does not exist or is not a file; pass --checkpoint PATH to a .safetensors file"
        )
    if torch_files.sniff(path) == "torch":
        raise CheckpointError(
            f"'{path}' looks like a pickle / torch.save file; only safetensors checkpoints are accepted "
            "(pickles can run arbitrary code, so they are never loaded)"
        )
    return path


def _config_from(path: Path, metadata: dict[str, str]) -> ECARConfig:
    if metadata.get("family", "ecar") != "ecar":
        raise CheckpointError(
            f"'{path}' is a {metadata['family']} checkpoint, not an ECAR one (`ecar-export build` reads either; "
            "this step takes an ECAR backbone)"
        )
    CHECKPOINT_FORMAT.check(metadata, f"'{path}'")
    try:
        return CHECKPOINT_FORMAT.parse(f"'{path}'", lambda: ECARConfig.from_json(metadata.get("config", "")))
    except CheckpointError as exc:
        raise CheckpointError(f"{exc} (an invalid model config in its metadata)") from None
