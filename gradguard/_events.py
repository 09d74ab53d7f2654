"""Events: what gradguard found, where, how bad, and what to try."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

__all__ = ["EVENT_KINDS", "Event", "Severity"]

Severity = Literal["warning", "error"]
# The built-in kinds, most urgent first (the report and the dashboards use this order).
# An fp16 overflow about to happen comes right after one that happened; causes (symmetric
# units, the learning rate, the inputs' scale) come before the symptoms they produce
# (vanishing, exploding, dead, saturated units), so the report's remedies lead with them.
# Detectors you write may use kinds of their own.
EVENT_KINDS: tuple[str, ...] = (
    "recovery",
    "nonfinite",
    "nonfinite_source",
    "overflow_risk",
    "loss_spike",
    "divergence",
    "spike",
    "update_spike",
    "symmetric_units",
    "lr_too_high",
    "input_scale",
    "clipped_elsewhere",
    "vanishing",
    "exploding",
    "dead_units",
    "saturation",
)
"""The built-in Event kinds, most urgent first (the order of the report and the dashboards):
what the guard did (``recovery``), then NaN/Inf, instability, causes, and the symptoms they
produce. A detector of your own may report kinds of its own; they sort after these."""


@dataclass(frozen=True)
class Event:
    """One finding, as the user sees it.

    ``layers`` are qualified module names, worst first; ``value`` is the number that tripped
    the detector (a z-score, a fraction, a ratio...); ``message`` states the evidence and
    ``advice`` the one or two remedies that fit it. ``details`` holds the numbers behind
    them, plus ``occurrences`` (how many times the condition was seen since the last Event
    of its kind) and ``reminder`` (True when the condition was already reported and is
    still present).
    """

    kind: str
    step: int
    layers: tuple[str, ...]
    value: float
    severity: Severity
    message: str
    advice: str
    details: dict[str, Any] = field(default_factory=dict, compare=False)

    def __str__(self) -> str:
        return f"[gradguard step {self.step}] {self.message} Try: {self.advice}"

    @property
    def title(self) -> str:
        """A short headline (under 64 characters, fit for an alert title)."""
        where = f" in {self.layers[0]}" if self.layers else ""
        text = f"{self.kind.replace('_', ' ')}{where} at step {self.step}"
        return text if len(text) <= 63 else text[:60] + "..."

    def to_dict(self) -> dict[str, Any]:
        """The Event as a plain dict (``layers`` as a list), ready for JSON."""
        data = asdict(self)
        data["layers"] = list(self.layers)
        return data
