"""Build keys: everything a graph file depends on, hashed, so that a rebuild reuses the graphs that cannot differ.

A graph's key covers its contract, the weights, the model config, the precision and its
recipe version, the opset and export version, the versions of the export tools
(:func:`toolchain_versions`) and the builder options. A rebuild into the same directory
reuses every graph of the previous build whose key is unchanged and whose files are intact
(:func:`reusable_graphs`); ``--force`` rebuilds them all.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from pathlib import Path

from torch import nn

from ecar_export import export, families
from ecar_export.precision import Precision
from runtime import manifest as manifest_io
from runtime.errors import ECARError
from runtime.graphs import GraphSpec

EXPORT_TOOLS = ("ecar-export", "torch", "onnx", "onnxruntime", "onnxscript", "onnx-graphsurgeon", "polygraphy")


def toolchain_versions() -> dict[str, str | None]:
    """The versions of the tools a graph file depends on (part of every graph's build key)."""
    versions: dict[str, str | None] = {}
    for package in EXPORT_TOOLS:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    from runtime.backends.tensorrt.loader import tensorrt_version

    versions["tensorrt"] = tensorrt_version()
    return versions


def graph_key(
    spec: GraphSpec,
    weights: str,
    model: nn.Module,
    recipe: Precision,
    tools: dict[str, str | None],
    options: dict[str, object],
) -> str:
    """Everything a graph file depends on, hashed: equal keys mean an identical graph."""
    payload = {
        "graph": spec.name,
        "contract": spec.to_dict(),
        "weights": weights,
        "config": families.config_of(model).to_dict(),
        "precision": recipe.name,
        "opset": export.OPSET,
        "export_version": export.EXPORT_VERSION,
        "tools": tools,
        "recipe_version": recipe.recipe_version,
        "options": options,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def reusable_graphs(out: Path, keys: dict[str, str]) -> dict[str, manifest_io.GraphEntry]:
    """Graphs of the previous build whose key is unchanged and whose files are intact."""
    try:
        old = manifest_io.load(out)
    except ECARError:
        return {}
    return {name: entry for name, entry in old.graphs.items() if name in keys and entry.build_key == keys[name]}
