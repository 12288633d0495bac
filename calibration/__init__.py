"""Calibration sets (real-image LR crops + a held-out split) and calibration ranges with a cache."""

from .set import DEFAULT_EVAL_SIZE, DEFAULT_LR_SIZE, CalibrationSet, HeldOut, build_calibration_set
from .sources import Skipped

__all__ = ["CalibrationSet", "HeldOut", "Skipped", "build_calibration_set", "DEFAULT_LR_SIZE", "DEFAULT_EVAL_SIZE"]
