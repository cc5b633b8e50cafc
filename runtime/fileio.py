"""Atomic file writes: write to a temporary path beside the target, then rename."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import tempfile
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

from runtime.errors import OutputError


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; on success it replaces ``target`` atomically.

    On any error the temporary file is removed and ``target`` is left as it was.
    """
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as exc:
        raise OutputError(f"cannot write '{target}': {exc.strerror or exc}; choose a writable location") from None
    os.close(handle)
    temp = Path(name)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(temp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the permissions open() would
    try:
        yield temp
        _fsync(temp)
        os.replace(temp, target)
    except OSError as exc:
        raise OutputError(f"cannot write '{target}': {exc.strerror or exc}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()


def output_dir(path: str | os.PathLike[str], option: str) -> Path:
    """``path`` as a directory to write into (created), or :class:`OutputError` naming ``option``."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise OutputError(f"{option} '{out}' exists and is not a directory; pass {option} DIR")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(
            f"cannot create output directory '{out}': {exc.strerror or exc}; pass a writable {option} DIR"
        ) from None
    if not os.access(out, os.W_OK):
        raise OutputError(f"output directory '{out}' is not writable; pass a writable {option} DIR")
    return out


def write_bytes_atomic(target: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(target) as temp:
        temp.write_bytes(data)


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def sha256_file(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    """An uncompressed ``.npz`` (what ``numpy.savez`` writes) with fixed timestamps, so equal arrays give equal
    bytes and a file named by its content is the same every time."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        for key, value in arrays.items():
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            with archive.open(info, "w", force_zip64=True) as handle:
                np.lib.format.write_array(handle, np.ascontiguousarray(value), allow_pickle=False)
    return buffer.getvalue()
