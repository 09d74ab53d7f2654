"""Where statistics and Events go: the Sink protocol and the two sinks the core ships."""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Protocol, runtime_checkable

from ._errors import GradGuardWarning, check_number, user_stacklevel
from ._events import Event
from ._ratelimit import RateLimiter

__all__ = ["LoggingSink", "MemorySink", "Sink"]


@runtime_checkable
class Sink(Protocol):
    """Anything that receives gradguard's output.

    ``log_scalars`` gets one mapping per logging step (metric key -> float; from the guard
    it is a ``StepMetrics``, which also carries the typed ``LoggedStats`` as ``.stats``),
    ``log_event`` one call per Event. ``flush`` is called on ``detach()``, ``close`` on
    ``close()``. A sink that raises is disabled with one warning; training goes on.

    A sink of your own::

        class PrintSink:
            def log_scalars(self, scalars, step):
                print(step, scalars["gradguard/grad_norm_total"])
            def log_event(self, event):
                print(event)
            def flush(self): ...
            def close(self): ...
    """

    def log_scalars(self, scalars: Mapping[str, float], step: int) -> None:
        """One logging step's metrics, by key, at ``step`` (the sink step: under Lightning
        or the Hugging Face Trainer, the trainer's global step)."""
        ...

    def log_event(self, event: Event) -> None:
        """One Event, as it is announced."""
        ...

    def flush(self) -> None:
        """Write out anything buffered (called by ``guard.detach()``)."""
        ...

    def close(self) -> None:
        """Release files and connections (called by ``guard.close()``)."""
        ...


class MemorySink:
    """Keeps every scalar and Event in memory: for tests, notebooks and ``report()``.

    ``scalars`` maps a metric key to ``[(step, value), ...]``; ``events`` lists Events oldest first.
    """

    def __init__(self) -> None:
        self.scalars: dict[str, list[tuple[int, float]]] = {}
        self.events: list[Event] = []

    def log_scalars(self, scalars: Mapping[str, float], step: int) -> None:
        """Append each value to ``scalars[key]`` as ``(step, value)``."""
        for key, value in scalars.items():
            self.scalars.setdefault(key, []).append((step, value))

    def log_event(self, event: Event) -> None:
        """Append the Event to ``events``."""
        self.events.append(event)

    def latest(self, key: str) -> float:
        """The last value logged under ``key`` (KeyError if never logged)."""
        return self.scalars[key][-1][1]

    def flush(self) -> None:
        """Nothing to write: everything is in memory already."""

    def close(self) -> None:
        """Nothing to release; the recorded values stay readable."""


class LoggingSink:
    """Writes to Python ``logging``: scalars at DEBUG, Events at INFO.

    Events of one kind are rate-limited to one record per ``min_interval_s`` seconds; the
    next record says how many were suppressed in between.
    """

    def __init__(
        self,
        logger: logging.Logger | str = "gradguard",
        *,
        min_interval_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logging.getLogger(logger) if isinstance(logger, str) else logger
        self.min_interval_s = check_number("min_interval_s", min_interval_s, low=0.0)
        self._clock = clock
        self._limit = RateLimiter(self.min_interval_s)

    def log_scalars(self, scalars: Mapping[str, float], step: int) -> None:
        """One DEBUG record with every metric of the step (skipped unless DEBUG is on)."""
        if self.logger.isEnabledFor(logging.DEBUG):
            body = " ".join(f"{k}={v:.4g}" for k, v in scalars.items())
            self.logger.debug("step %d: %s", step, body)

    def log_event(self, event: Event) -> None:
        """One INFO record per Event, rate-limited per kind (see the class docstring)."""
        suppressed = self._limit.admit(event.kind, self._clock())
        if suppressed is None:
            return
        extra = f" ({suppressed} similar suppressed)" if suppressed else ""
        # INFO, as the design settles: the GradGuardWarning already raises the alarm.
        self.logger.info("%s [%s]%s", event, event.severity, extra)

    def flush(self) -> None:
        """Flush the logger's own handlers."""
        for handler in self.logger.handlers:
            handler.flush()

    def close(self) -> None:
        """Flush; the logger and its handlers stay open (they are not the sink's)."""
        self.flush()


class SinkSet:
    """Fans output out to several sinks; a sink that raises is disabled with one warning."""

    def __init__(self, sinks: Iterable[Sink]) -> None:
        self.sinks: list[Sink] = list(sinks)
        self.disabled: list[Sink] = []

    def add(self, sink: Sink) -> None:
        self.sinks.append(sink)

    def remove(self, sink: Sink) -> None:
        if sink in self.sinks:
            self.sinks.remove(sink)

    def _call(self, method: str, *args: object) -> None:
        for sink in list(self.sinks):
            try:
                getattr(sink, method)(*args)
            except Exception as exc:  # a failing backend never stops training
                self.sinks.remove(sink)
                self.disabled.append(sink)
                warnings.warn(
                    f"gradguard disabled the sink {type(sink).__name__} after it raised "
                    f"{type(exc).__name__}: {exc}. Training goes on; other sinks still "
                    "receive data.",
                    GradGuardWarning,
                    stacklevel=user_stacklevel(),
                )

    def log_scalars(self, scalars: Mapping[str, float], step: int) -> None:
        if scalars:
            self._call("log_scalars", scalars, step)

    def log_event(self, event: Event) -> None:
        self._call("log_event", event)

    def flush(self) -> None:
        self._call("flush")

    def close(self) -> None:
        self._call("close")
