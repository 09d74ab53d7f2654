"""Detectors: each watches typed statistics and reports findings (see ``base.py``)."""

from __future__ import annotations

from .base import Detector, GuardContext
from .flow import GradientFlowDetector
from .forensics import NonfiniteForensics
from .loss import LossSpikeDetector
from .lr import LearningRateDetector
from .nonfinite import NonfiniteDetector
from .preclipped import ClippedElsewhereDetector
from .score import StabilityScore
from .spike import SpikeDetector
from .symmetry import SymmetryDetector
from .trend import TrendDetector
from .updates import UpdateSpikeDetector

__all__ = [
    "ClippedElsewhereDetector",
    "Detector",
    "GradientFlowDetector",
    "GuardContext",
    "LearningRateDetector",
    "LossSpikeDetector",
    "NonfiniteDetector",
    "NonfiniteForensics",
    "SpikeDetector",
    "StabilityScore",
    "SymmetryDetector",
    "TrendDetector",
    "UpdateSpikeDetector",
    "default_detectors",
]


def default_detectors() -> list[Detector]:
    """The detectors a guard runs unless given ``detectors=`` (besides the always-on
    NaN/Inf and spike detectors and the activation monitor, which have knobs of their own).

    All are on because they are cheap and silent on the healthy zoo: the gradient-flow,
    learning-rate, loss-spike and trend detectors and the stability score read only host
    numbers; the symmetry detector adds a few small kernels per layer on the first three
    logging steps, then nothing; the update-spike detector reads the logging step's update
    ratios; the NaN forensics do nothing until a NaN/Inf gradient is seen; the
    clipped-elsewhere detector reads the total norm the step packet brings anyway.
    """
    return [
        GradientFlowDetector(),
        SymmetryDetector(),
        LearningRateDetector(),
        ClippedElsewhereDetector(),
        LossSpikeDetector(),
        TrendDetector(),
        UpdateSpikeDetector(),
        StabilityScore(),
        NonfiniteForensics(),
    ]
