"""Detectors: each watches typed statistics and reports findings (see ``base.py``)."""

from __future__ import annotations

from .base import Detector, GuardContext
from .flow import GradientFlowDetector
from .lr import LearningRateDetector
from .nonfinite import NonfiniteDetector
from .spike import SpikeDetector
from .symmetry import SymmetryDetector

__all__ = [
    "Detector",
    "GradientFlowDetector",
    "GuardContext",
    "LearningRateDetector",
    "NonfiniteDetector",
    "SpikeDetector",
    "SymmetryDetector",
    "default_detectors",
]


def default_detectors() -> list[Detector]:
    """The detectors a guard runs unless given ``detectors=`` (besides the always-on
    NaN/Inf and spike detectors and the activation monitor, which have knobs of their own).

    All three are on because they are cheap and silent on the healthy zoo: the gradient-flow
    and learning-rate detectors read only the host numbers of logging steps; the symmetry
    detector adds a few small kernels per layer on the first three logging steps, then
    nothing.
    """
    return [GradientFlowDetector(), SymmetryDetector(), LearningRateDetector()]
