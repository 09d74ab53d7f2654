"""Detectors: each watches typed statistics and reports findings (see ``base.py``)."""

from __future__ import annotations

from .base import Detector, GuardContext
from .flow import GradientFlowDetector
from .forensics import NonfiniteForensics
from .loss import LossSpikeDetector
from .nonfinite import NonfiniteDetector
from .score import StabilityScore
from .spike import SpikeDetector
from .trend import TrendDetector
from .updates import UpdateSpikeDetector

__all__ = [
    "Detector",
    "GradientFlowDetector",
    "GuardContext",
    "LossSpikeDetector",
    "NonfiniteDetector",
    "NonfiniteForensics",
    "SpikeDetector",
    "StabilityScore",
    "TrendDetector",
    "UpdateSpikeDetector",
    "default_detectors",
]


def default_detectors() -> list[Detector]:
    """The detectors a guard runs unless given ``detectors=`` (besides the always-on
    NaN/Inf and spike detectors and the activation monitor, which have knobs of their own)."""
    return [
        GradientFlowDetector(),
        LossSpikeDetector(),
        TrendDetector(),
        UpdateSpikeDetector(),
        StabilityScore(),
        NonfiniteForensics(),
    ]
