"""Stage constants: the graph inputs that are the same for every request at a stage, one file per build.

Every input of a graph that is not one of the contract's request slots (:data:`runtime.graphs.SLOTS`)
is a stage constant: the build computes its value for every stage the graph is called at and
writes them all into one ``.npz`` beside the manifest (named by content,
``stages-<sha12>.npz``; the manifest names it with its sha256 under ``stage_constants``). Its
keys are ``<graph>/<stage>/<input>`` (1-based stage), e.g. ``backbone/2/up``. The runtime
reads it with ``numpy.load(..., allow_pickle=False)`` and feeds each call its stage's arrays;
it knows nothing of what they mean, so a model family adds a constant (a rotary table, a
mask) by writing it here, without touching the runtime.
"""

from __future__ import annotations

import zipfile
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

import numpy as np

from runtime.errors import ManifestError
from runtime.fileio import npz_bytes

DTYPES = ("float32", "int64")


def key(graph: str, stage: int, name: str) -> str:
    """The file's key of one input of ``graph`` at a 1-based ``stage``."""
    return f"{graph}/{stage}/{name}"


class StageConstants:
    """Read-only stage constants by (graph, stage): ``get(graph, stage)`` maps input names to arrays."""

    def __init__(self, arrays: Mapping[str, np.ndarray]) -> None:
        by_call: dict[tuple[str, int], dict[str, np.ndarray]] = {}
        for name, value in arrays.items():
            parts = name.split("/")
            if len(parts) != 3 or not parts[0] or not parts[2] or not parts[1].isdigit() or int(parts[1]) < 1:
                raise ManifestError(f"stage constant '{name}': keys must be '<graph>/<stage>/<input>'")
            array = np.array(value)
            if array.dtype.name not in DTYPES:
                raise ManifestError(f"stage constant '{name}': dtype {array.dtype.name}, expected one of {DTYPES}")
            array.setflags(write=False)
            by_call.setdefault((parts[0], int(parts[1])), {})[parts[2]] = array
        self._by_call = {k: MappingProxyType(v) for k, v in by_call.items()}

    def get(self, graph: str, stage: int) -> Mapping[str, np.ndarray]:
        """The constants of ``graph`` at a 1-based ``stage`` (empty where it has none)."""
        return self._by_call.get((graph, stage), MappingProxyType({}))

    def arrays(self) -> dict[str, np.ndarray]:
        """Every constant by its file key."""
        return {key(g, s, n): a for (g, s), values in self._by_call.items() for n, a in values.items()}

    def __len__(self) -> int:
        return sum(len(values) for values in self._by_call.values())

    @classmethod
    def read(cls, path: Path) -> StageConstants:
        """Load the file (no pickles); :class:`ManifestError` naming the file where it cannot be read."""
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {name: data[name] for name in data.files}
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
            raise ManifestError(f"cannot read the stage constants '{path}' ({exc}); rebuild the engines") from None
        return cls(arrays)


def encode(arrays: Mapping[str, np.ndarray]) -> bytes:
    """The file's bytes, keys in sorted order: equal constants give equal bytes (and the same file name)."""
    return npz_bytes({name: arrays[name] for name in sorted(arrays)})
