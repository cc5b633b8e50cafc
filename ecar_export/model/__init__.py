"""The ECAR reference model in PyTorch."""

from ecar_export.model.ecar import ECAR, SampleResult

__all__ = ["ECAR", "SampleResult"]
