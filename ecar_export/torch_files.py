"""What kind of weights file a path holds, and the one way a published torch file is read.

Builds read safetensors only. Published ``.pth`` / ``.ckpt`` / ``.bin`` files are pickles (or
``torch.save`` zip archives of pickles), and a pickle can run code when it is loaded, so they are
read only by the explicit conversion commands, through :func:`load_tensors_only`
(``torch.load(weights_only=True)``: tensors and plain containers, nothing else).

The file kind is sniffed from the first bytes, never from the suffix. A safetensors file starts
with its header's length (8 bytes, little-endian) followed by the JSON header's ``{``; that is
checked first, because the length's low byte can be anything, including the ``0x80`` that
opens a pickle.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any, Literal

from runtime.errors import CheckpointError, shown

Kind = Literal["safetensors", "torch", "unknown"]
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's archive (the default since torch 1.6)
_PICKLE_PROTOCOLS = range(2, 6)  # a pickle of protocol >= 2 opens with 0x80 and its protocol number


def sniff(path: str | os.PathLike[str]) -> Kind:
    """``"safetensors"``, ``"torch"`` (a pickle or a ``torch.save`` archive) or ``"unknown"``."""
    path = Path(path)
    with open(path, "rb") as handle:
        head = handle.read(9)
    if len(head) == 9 and head[8:9] == b"{":
        header_bytes = int.from_bytes(head[:8], "little")
        if 2 <= header_bytes <= path.stat().st_size - 8:
            return "safetensors"
    if head.startswith(_ZIP_MAGIC) or (len(head) >= 2 and head[0] == 0x80 and head[1] in _PICKLE_PROTOCOLS):
        return "torch"
    return "unknown"


def load_tensors_only(path: str | os.PathLike[str]) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, every failure a :class:`CheckpointError`."""
    import torch  # the export side has torch; imported here so sniffing stays cheap

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist or is not a file")
    if sniff(path) != "torch":
        raise CheckpointError(f"'{path}' is not a torch checkpoint (neither a torch.save archive nor a pickle)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        lines = [line.strip() for line in str(exc).splitlines()]
        why = next((line for line in lines if line.startswith("WeightsUnpickler error")), lines[0] if lines else "")
        raise CheckpointError(
            f"'{path}' holds objects other than tensors and plain containers, which are never unpickled "
            f"(torch.load weights_only=True refused it: {why.split('. ')[0][:160]})"
        ) from None
    except Exception as exc:  # noqa: BLE001 - any other failure to read is the file's fault
        raise CheckpointError(f"'{path}' is not a readable torch checkpoint: {shown(exc, 200)}") from None
