"""Torch-free ECAR runtime: config and schedule math, engine manifests, backends, Pipeline."""

from runtime.config import ECARConfig
from runtime.errors import ECARError

__all__ = ["ECARConfig", "ECARError"]
