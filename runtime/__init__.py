"""Torch-free runtime: engine manifests, the request walk, backends, Pipeline; no model family's code.

``from runtime import Pipeline`` is the entry point; it is imported on first use so that
``import runtime`` stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from runtime.errors import ECARError
from runtime.version import __version__

if TYPE_CHECKING:
    from runtime.pipeline import GenerateResult, Pipeline

__all__ = ["ECARError", "GenerateResult", "Pipeline", "__version__"]


def __getattr__(name: str) -> Any:
    if name in ("Pipeline", "GenerateResult"):
        from runtime import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'runtime' has no attribute {name!r}")
