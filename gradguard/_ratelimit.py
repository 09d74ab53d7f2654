"""One rate limiter for everything that must not repeat itself too often.

Warnings (in optimizer steps), ``LoggingSink`` records and W&B alerts (in seconds) all ask
the same question: has enough time passed since the last one of this key, and how many
were held back meanwhile?
"""

from __future__ import annotations

from typing import Any

__all__ = ["RateLimiter"]


class RateLimiter:
    """Lets one occurrence per key through every ``interval`` units of ``now``.

    ``admit(key, now)`` returns ``None`` when the occurrence is held back, else the number
    held back since the last one that went through (0 for none). A clock that goes back
    (a resumed run restarting its step count) lets the next occurrence through.
    """

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def admit(self, key: str, now: float) -> int | None:
        last = self._last.get(key)
        if last is not None and 0 <= now - last < self.interval:
            self._held[key] = self._held.get(key, 0) + 1
            return None
        self._last[key] = now
        return self._held.pop(key, 0)

    def last(self, key: str) -> float | None:
        return self._last.get(key)

    def state_dict(self) -> dict[str, Any]:
        return {"last": dict(self._last), "held": dict(self._held)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._last = {str(k): float(v) for k, v in state.get("last", {}).items()}
        self._held = {str(k): int(v) for k, v in state.get("held", {}).items()}
