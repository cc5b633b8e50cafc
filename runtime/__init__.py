"""Torch-free ECAR runtime: config and schedule math, engine manifests, backends, Pipeline.

``from runtime import Pipeline`` is the entry point; it is imported on first use so that
``import runtime`` stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from runtime.config import ECARConfig
from runtime.errors import ECARError
from runtime.version import __version__

if TYPE_CHECKING:
    from runtime.pipeline import GenerateResult, Pipeline

__all__ = ["ECARConfig", "ECARError", "GenerateResult", "Pipeline", "__version__"]


def __getattr__(name: str) -> Any:
    if name in ("Pipeline", "GenerateResult"):
        from runtime import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'runtime' has no attribute {name!r}")
