"""OpenVINO builds: the same ONNX graphs, each read and compiled by OpenVINO once before the commit.

Nothing is kept: compiling at load takes about as long as loading OpenVINO's cached blobs
(0.5 s for ecar-b) and the blobs are as large as the weights.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from runtime.backends.openvino_backend import compile_graph


def compile_all(engine_dir: Path, graphs: Iterable[tuple[str, str, str, bool]]) -> None:
    """Compile every (name, file, precision, bf16_safe) of a build in ``engine_dir``; an ``EngineError`` names a
    failure."""
    for name, file, precision, bf16_safe in graphs:
        compile_graph(engine_dir / file, precision, name, bf16_safe=bf16_safe)
