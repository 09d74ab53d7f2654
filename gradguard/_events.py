"""Events: what gradguard found, where, how bad, and what to try."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

__all__ = ["EVENT_KINDS", "Event", "EventKind", "EventThrottle", "Severity"]

EventKind = Literal["nonfinite", "spike", "vanishing", "exploding", "dead_units", "saturation"]
Severity = Literal["warning", "error"]
EVENT_KINDS: tuple[str, ...] = (
    "nonfinite",
    "spike",
    "vanishing",
    "exploding",
    "dead_units",
    "saturation",
)


@dataclass(frozen=True)
class Event:
    """One finding.

    ``layers`` are qualified module names, worst first; ``value`` is the number that tripped
    the detector (a z-score, a fraction, a ratio...); ``message`` states the evidence and
    ``advice`` the one or two remedies that fit it.
    """

    kind: EventKind
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
        data = asdict(self)
        data["layers"] = list(self.layers)
        return data


class EventThrottle:
    """Debounces a persisting condition: the first occurrence, then one reminder per
    ``repeat_every`` steps while it keeps recurring within ``gap`` steps of the last one.

    ``admit(kind, step)`` returns ``None`` when the occurrence should stay silent, else the
    number of occurrences folded into this one (1 for a fresh episode).
    """

    def __init__(self, repeat_every: int = 100, gap: int = 1) -> None:
        self.repeat_every = repeat_every
        self.gap = gap
        self._last_seen: dict[str, int] = {}
        self._last_emitted: dict[str, int] = {}
        self._folded: dict[str, int] = {}

    def admit(self, kind: str, step: int) -> int | None:
        last_seen = self._last_seen.get(kind)
        self._last_seen[kind] = step
        continuing = last_seen is not None and step - last_seen <= self.gap
        if continuing and step - self._last_emitted.get(kind, step) < self.repeat_every:
            self._folded[kind] = self._folded.get(kind, 0) + 1
            return None
        self._last_emitted[kind] = step
        folded = self._folded.pop(kind, 0)
        return folded + 1

    def state_dict(self) -> dict[str, Any]:
        return {
            "last_seen": dict(self._last_seen),
            "last_emitted": dict(self._last_emitted),
            "folded": dict(self._folded),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._last_seen = {str(k): int(v) for k, v in state.get("last_seen", {}).items()}
        self._last_emitted = {str(k): int(v) for k, v in state.get("last_emitted", {}).items()}
        self._folded = {str(k): int(v) for k, v in state.get("folded", {}).items()}
