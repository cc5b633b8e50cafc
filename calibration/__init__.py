"""INT8 calibration: capture real stage inputs from the fp32 pipeline, store them, feed quantizers.

Dependency direction: ``ecar_export -> calibration -> runtime``; this package never
imports torch or ecar_export.
"""

from calibration.capture import RecordingBackend, capture
from calibration.dataset import CalibrationSet, load_calibration
from calibration.errors import CalibrationError
from calibration.plan import CalibrationPlan

__all__ = ["CalibrationError", "CalibrationPlan", "CalibrationSet", "RecordingBackend", "capture", "load_calibration"]
