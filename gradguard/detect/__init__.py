"""Detectors: each watches typed statistics and reports findings (see ``base.py``)."""

from __future__ import annotations

from .base import Detector, GuardContext
from .flow import GradientFlowDetector
from .nonfinite import NonfiniteDetector
from .preclipped import ClippedElsewhereDetector
from .spike import SpikeDetector

__all__ = [
    "ClippedElsewhereDetector",
    "Detector",
    "GradientFlowDetector",
    "GuardContext",
    "NonfiniteDetector",
    "SpikeDetector",
    "default_detectors",
]


def default_detectors() -> list[Detector]:
    """The detectors a guard runs unless given ``detectors=`` (besides the always-on
    NaN/Inf and spike detectors and the activation monitor, which have knobs of their own)."""
    return [GradientFlowDetector(), ClippedElsewhereDetector()]
