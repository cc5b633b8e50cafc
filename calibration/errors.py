"""Errors of the calibration package (part of the toolchain's one ``ECARError`` hierarchy)."""

from __future__ import annotations

from runtime.errors import ECARError


class CalibrationError(ECARError):
    """A calibration directory is missing, corrupt, or does not belong to the model at hand."""
