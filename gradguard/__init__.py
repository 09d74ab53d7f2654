"""gradguard: keeps deep-learning training healthy.

It watches gradients and activations while a PyTorch model trains, clips gradients
adaptively, and says in plain words what is going wrong and what to try. It attaches hooks
to your model and optimizer and detaches cleanly; it never replaces them.

    import gradguard as gg
    guard = gg.attach(model, optimizer)
    ...train as usual...
    print(guard.report())
"""

from ._activations import ActivationMonitor
from ._clip_adaptive import AGC, AutoClip, ZClip
from ._clipping import ClipStrategy, NormClip, ValueClip
from ._diagnosis import GradientFlowDetector
from ._errors import (
    ConfigurationError,
    GradGuardError,
    GradGuardWarning,
    GradientAlarmError,
    MissingDependencyError,
)
from ._events import Event
from ._guard import GradGuard, attach
from ._protocols import HostView
from ._sinks import LoggingSink, MemorySink, Sink
from ._spike import SpikeDetector

__version__ = "0.1.0.dev0"

__all__ = [
    "AGC",
    "ActivationMonitor",
    "AutoClip",
    "ClipStrategy",
    "ConfigurationError",
    "Event",
    "GradGuard",
    "GradGuardError",
    "GradGuardWarning",
    "GradientAlarmError",
    "GradientFlowDetector",
    "HostView",
    "LoggingSink",
    "MemorySink",
    "MissingDependencyError",
    "NormClip",
    "Sink",
    "SpikeDetector",
    "ValueClip",
    "ZClip",
    "__version__",
    "attach",
]
