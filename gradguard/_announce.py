"""From findings to what the user sees: Events, warnings and the sinks' Event stream.

Every finding passes the ``Debouncer`` (one Event per episode, plus reminders); an Event
is kept in ``events``, sent to the sinks and, rate-limited per kind, raised as a
``GradGuardWarning`` on rank zero. Steps shown to the user are the sinks' steps (under
Lightning, ``trainer.global_step``), remembered here for the packets that arrive late.
"""

from __future__ import annotations

import warnings
from collections import deque
from typing import Any

from ._config import GuardConfig
from ._debounce import Debouncer, Finding
from ._errors import GradGuardWarning, user_stacklevel
from ._events import Event
from ._ratelimit import RateLimiter
from ._sinks import SinkSet

__all__ = ["Announcer"]

# How many guard-step -> sink-step entries are remembered (packets arrive a step or two late).
_STEP_MAP_SIZE = 64
# Kinds whose every Event is also a warning: what the guard DID to the run (an LR back-off,
# then a rollback a few steps later) must each be said where the user looks.
_ALWAYS_WARN = frozenset({"recovery"})


class Announcer:
    """Debounces findings into Events and hands them on (see the module docstring)."""

    def __init__(self, config: GuardConfig, sinks: SinkSet) -> None:
        self.config = config
        self.sinks = sinks
        self.events: deque[Event] = deque(maxlen=10_000)
        self.debouncer = Debouncer()
        self._warnings = RateLimiter(config.repeat_every)
        self._shown: dict[int, int] = {}
        self._offset = 0

    def map_step(self, step: int, shown: int | None) -> int:
        """Remember which step the user sees for guard step ``step``; return it."""
        value = step if shown is None else int(shown)
        self._shown[step] = value
        self._shown.pop(step - _STEP_MAP_SIZE, None)
        self._offset = value - step
        return value

    def shown(self, step: int) -> int:
        """The step the user sees for guard step ``step`` (for one older than the steps
        remembered, the latest offset between the two: adapters keep it constant)."""
        return self._shown.get(step, step + self._offset)

    def announce(
        self, finding: Finding, step: int, *, rank_zero: bool, warn: bool = True
    ) -> Event | None:
        event = self.debouncer.admit(finding, step, self.shown(step))
        if event is None:
            return None
        self.events.append(event)
        if not rank_zero:
            return event
        self.sinks.log_event(event)
        if (
            warn
            and self.config.warn
            and (
                event.kind in _ALWAYS_WARN
                or self._warnings.admit(event.kind, event.step) is not None
            )
        ):
            warnings.warn(str(event), GradGuardWarning, stacklevel=user_stacklevel())
        return event

    def state_dict(self) -> dict[str, Any]:
        return {"debouncer": self.debouncer.state_dict(), "warnings": self._warnings.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.debouncer.load_state_dict(state.get("debouncer", {}))
        self._warnings.load_state_dict(state.get("warnings", {}))
