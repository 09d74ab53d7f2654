"""Findings, and the one debouncer that turns them into Events.

A detector reports a ``Finding`` every time it sees its condition; it does not decide
whether the user has already been told. The guard's ``Debouncer`` does, for every
detector alike: the first finding of a kind opens an *episode* and is announced; later
findings continue the episode while they come within ``max_gap`` steps of the previous one
(so a NaN every second step for 600 steps is one episode, not 300 Events), are folded
into a count, and are announced again as a reminder every ``remind_every`` steps (or at
once when ``track_layers`` and new layers join). A finding after a longer quiet spell
opens a new episode.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ._events import Event, Severity

__all__ = ["Debouncer", "Finding"]


@dataclass(frozen=True)
class Finding:
    """What a detector saw at one check.

    ``message`` states the evidence with its numbers, ``advice`` the one or two remedies
    that fit it. ``max_gap``, ``remind_every`` and ``track_layers`` tell the debouncer how
    this condition recurs (see the module docstring); ``counted`` names what is folded
    ("steps with NaN/Inf", "spikes") in a reminder's count.
    """

    kind: str
    layers: tuple[str, ...]
    value: float
    message: str
    advice: str
    severity: Severity = "warning"
    details: Mapping[str, Any] = field(default_factory=dict)
    max_gap: int = 100
    remind_every: int = 100
    track_layers: bool = False
    counted: str = "occurrences"


@dataclass
class _Episode:
    start: int  # the step shown to the user (the sinks' step) when it was first announced
    last_seen: int
    last_announced: int
    folded: int = 0
    layers: set[str] = field(default_factory=set)
    last_shown: int = -1  # the shown step of the last sighting (-1: that of ``start``)

    def to_dict(self) -> dict[str, Any]:
        return {
            "start": self.start,
            "last_seen": self.last_seen,
            "last_announced": self.last_announced,
            "folded": self.folded,
            "layers": sorted(self.layers),
            "last_shown": self.last_shown,
        }


class Debouncer:
    """Turns a stream of findings into Events: one per episode, plus reminders."""

    def __init__(self) -> None:
        self._episodes: dict[str, _Episode] = {}
        self._max_gap: dict[str, int] = {}
        self._seen: dict[str, int] = {}

    def admit(self, finding: Finding, step: int, shown_step: int | None = None) -> Event | None:
        """The Event to emit for ``finding`` seen at guard step ``step``, or ``None``.

        ``shown_step`` is the step the user sees (the sinks' step; the guard step by default).
        """
        shown = step if shown_step is None else shown_step
        kind = finding.kind
        self._max_gap[kind] = finding.max_gap
        self._seen[kind] = self._seen.get(kind, 0) + 1
        episode = self._episodes.get(kind)
        fresh = (
            episode is None
            or step - episode.last_seen > finding.max_gap
            or step < episode.last_seen  # the step count went back: a new run
        )
        if fresh or episode is None:
            self._episodes[kind] = _Episode(shown, step, step, 0, set(finding.layers), shown)
            return self._event(finding, shown, occurrences=1, reminder=False, start=shown)
        episode.last_seen = step
        episode.last_shown = shown
        joined = finding.track_layers and not set(finding.layers) <= episode.layers
        episode.layers.update(finding.layers)
        if not joined and step - episode.last_announced < finding.remind_every:
            episode.folded += 1
            return None
        occurrences, episode.folded = episode.folded + 1, 0
        episode.last_announced = step
        return self._event(
            finding, shown, occurrences=occurrences, reminder=not joined, start=episode.start
        )

    @staticmethod
    def _event(
        finding: Finding, shown: int, *, occurrences: int, reminder: bool, start: int
    ) -> Event:
        message = finding.message
        if reminder:
            message = f"Still present since step {start}: {message}"
        if occurrences > 1:
            message += f" ({occurrences} {finding.counted} since the last report.)"
        details = dict(finding.details)
        details.update(occurrences=occurrences, reminder=reminder, episode_start=start)
        return Event(
            kind=finding.kind,
            step=shown,
            layers=finding.layers,
            value=finding.value,
            severity=finding.severity,
            message=message,
            advice=finding.advice,
            details=details,
        )

    def active(self, step: int, within: Mapping[str, int] | None = None) -> dict[str, int]:
        """Episodes still open at guard step ``step``: kind -> the step first announced.

        ``within``: kind -> how recently it must have been seen too (an episode stays open
        for ``max_gap`` steps so that an intermittent condition folds into it, but a NaN 30
        steps ago is not "still present"); kinds not in it: ``max_gap`` alone."""
        limits = within or {}
        return {
            kind: episode.start
            for kind, episode in self._episodes.items()
            if step - episode.last_seen
            <= min(self._max_gap.get(kind, 0), limits.get(kind, 1 << 62))
        }

    def last_shown(self) -> dict[str, int]:
        """The step (as shown to the user) each kind was last seen at, folded sightings too."""
        return {kind: episode.last_shown for kind, episode in self._episodes.items()}

    def seen(self) -> dict[str, int]:
        """How many findings of each kind were seen (announced or folded)."""
        return dict(self._seen)

    def state_dict(self) -> dict[str, Any]:
        return {
            "episodes": {kind: episode.to_dict() for kind, episode in self._episodes.items()},
            "max_gap": dict(self._max_gap),
            "seen": dict(self._seen),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        episodes = {}
        for kind, data in state.get("episodes", {}).items():
            episodes[str(kind)] = _Episode(
                start=int(data["start"]),
                last_seen=int(data["last_seen"]),
                last_announced=int(data["last_announced"]),
                folded=int(data.get("folded", 0)),
                layers={str(name) for name in data.get("layers", [])},
                last_shown=int(data.get("last_shown", data["start"])),
            )
        max_gap = {str(k): int(v) for k, v in state.get("max_gap", {}).items()}
        seen = {str(k): int(v) for k, v in state.get("seen", {}).items()}
        self._episodes, self._max_gap, self._seen = episodes, max_gap, seen
