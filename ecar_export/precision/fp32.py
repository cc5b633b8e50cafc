"""The fp32 recipe: the exported graphs as they are (their weights file is moved, not copied)."""

from __future__ import annotations

import os
from pathlib import Path

from ecar_export import weights_io
from ecar_export.precision import RecipeInputs


def apply(source: Path, target: Path, graph: str, inputs: RecipeInputs) -> dict[str, object]:
    """Move the fp32 graph ``source`` and its external weights to ``target``; the record."""
    source_data, target_data = weights_io.data_path(source), weights_io.data_path(target)
    model = weights_io.load_graph(source)
    if source_data.is_file():
        os.replace(source_data, target_data)
        weights_io.relocate(model, target_data.name)
    weights_io.save_graph(model, target)
    return {"recipe": "fp32"}
