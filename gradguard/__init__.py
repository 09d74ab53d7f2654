"""gradguard: keeps deep-learning training healthy.

It watches gradients and activations while a PyTorch model trains, clips gradients
adaptively, and says in plain words what is going wrong and what to try. It attaches hooks
to your model and optimizer and detaches cleanly; it never replaces them.

    import gradguard as gg
    guard = gg.attach(model, optimizer)
    ...train as usual...
    print(guard.report())

To extend it: subclass ``gg.ClipStrategy`` (a clip rule), ``gg.Detector`` (a pathology:
return ``gg.Finding`` objects) or write a ``gg.Sink`` (anywhere the metrics should go).
"""

from ._config import GuardOptions
from ._debounce import Finding
from ._errors import (
    ConfigurationError,
    GradGuardError,
    GradGuardWarning,
    GradientAlarmError,
    MissingDependencyError,
)
from ._events import EVENT_KINDS, Event
from ._guard import GradGuard, attach
from ._histograms import Histograms
from ._keys import MetricKeys, StepMetrics
from ._policy import StepDecision
from ._sinks import LoggingSink, MemorySink, Sink
from ._stats import Histogram, LoggedStats, StepStats
from .activations import ActivationMonitor
from .clip import AGC, AutoClip, ClipContext, ClipResult, ClipStrategy, NormClip, ValueClip, ZClip
from .detect import (
    ClippedElsewhereDetector,
    Detector,
    GradientFlowDetector,
    GuardContext,
    LearningRateDetector,
    LossSpikeDetector,
    NonfiniteForensics,
    SpikeDetector,
    StabilityScore,
    SymmetryDetector,
    TrendDetector,
    UpdateSpikeDetector,
    default_detectors,
)
from .recover import Recover

__version__ = "0.1.0.dev0"

__all__ = [
    "AGC",
    "ActivationMonitor",
    "AutoClip",
    "ClipContext",
    "ClipResult",
    "ClipStrategy",
    "ClippedElsewhereDetector",
    "ConfigurationError",
    "Detector",
    "EVENT_KINDS",
    "Event",
    "Finding",
    "GradGuard",
    "GradGuardError",
    "GradGuardWarning",
    "GradientAlarmError",
    "GradientFlowDetector",
    "GuardContext",
    "GuardOptions",
    "Histogram",
    "Histograms",
    "LearningRateDetector",
    "LoggedStats",
    "LoggingSink",
    "LossSpikeDetector",
    "MemorySink",
    "MetricKeys",
    "MissingDependencyError",
    "NonfiniteForensics",
    "NormClip",
    "Recover",
    "Sink",
    "SpikeDetector",
    "StabilityScore",
    "StepDecision",
    "StepMetrics",
    "StepStats",
    "SymmetryDetector",
    "TrendDetector",
    "UpdateSpikeDetector",
    "ValueClip",
    "ZClip",
    "__version__",
    "attach",
    "default_detectors",
]
