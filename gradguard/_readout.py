"""What a guard tells you: its configuration, its counters, its Events and its report.

The read-only half of ``GradGuard`` (the other half attaches and drives the steps).
Reading a counter or the report first reads every step packet still in flight, so the
numbers include the latest step (a host sync, which is why it happens here and not on the
step path).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ._announce import Announcer
from ._config import GuardConfig
from ._errors import GradGuardError, check_positive_int
from ._events import Event
from ._keys import MetricKeys
from ._packet import HostMirror
from ._stats import LoggedStats
from .report.summary import build_summary
from .report.text import build_report

if TYPE_CHECKING:
    from ._binding import Binding
    from .detect.base import Detector

__all__ = ["GuardReadout"]


class GuardReadout:
    """Mixin: the read-only views of a ``GradGuard``."""

    config: GuardConfig
    _announcer: Announcer
    _binding: Binding | None
    _mirror: HostMirror
    _keys: MetricKeys
    _step: int
    _skipped_steps: int
    _nonfinite_steps: int
    _clipped_steps: int
    _depth_source: str
    _last_layers: list[str]
    _last_blind_spots: list[str]
    _last_scalars: dict[str, float]
    _last_stats: LoggedStats | None
    _flush_batched: Callable[[], list[str]]

    # ------------------------------------------------------------------ configuration
    @property
    def clip(self) -> Any:
        return self.config.clip

    @property
    def on_nonfinite(self) -> str:
        return self.config.on_nonfinite

    @property
    def on_spike(self) -> str:
        return self.config.on_spike

    @property
    def spike(self) -> Any:
        return self.config.spike

    @property
    def activations(self) -> Any:
        return self.config.activations

    @property
    def detectors(self) -> list[Detector]:
        return self.config.detectors

    @property
    def prefix(self) -> str:
        return self.config.prefix

    @prefix.setter
    def prefix(self, value: str) -> None:
        if self._binding is not None:
            raise GradGuardError("set the prefix before attach()")
        self.config.prefix = value
        self._keys = MetricKeys(value)

    @property
    def log_every_n_steps(self) -> int:
        return self.config.log_every_n_steps

    @log_every_n_steps.setter
    def log_every_n_steps(self, value: int) -> None:
        self.config.log_every_n_steps = check_positive_int("log_every_n_steps", value)

    # ------------------------------------------------------------------ what it watches
    @property
    def events(self) -> deque[Event]:
        """Every Event so far, oldest first (the last 10,000). Steps waiting for the
        ``batched`` detectors are handed over first (host work only, no sync)."""
        self._flush_batched()
        return self._announcer.events

    @property
    def attached(self) -> bool:
        """True between ``attach``/``bind`` and ``detach``."""
        return self._binding is not None

    @property
    def layers(self) -> list[str]:
        """Watched layer names in depth order, input first (kept after ``detach``)."""
        if self._binding is not None:
            return list(self._binding.layout.names)
        return list(self._last_layers)

    @property
    def depth_source(self) -> str:
        """Where the depth order comes from: ``"forward"`` (the first training forward
        pass), ``"saved"`` (a loaded state) or ``"registration"`` (module order)."""
        return self._depth_source

    @property
    def step(self) -> int:
        """Optimizer steps seen so far (skipped ones included); the first step is step 0."""
        return self._step

    @property
    def skipped_steps(self) -> int:
        """Optimizer steps gradguard skipped so far (not those a GradScaler skipped)."""
        self._mirror.drain(block=True)
        return self._skipped_steps

    @property
    def nonfinite_steps(self) -> int:
        self._mirror.drain(block=True)
        return self._nonfinite_steps

    @property
    def clipped_steps(self) -> int:
        """Optimizer steps whose gradients the clip strategy scaled down."""
        self._mirror.drain(block=True)
        return self._clipped_steps

    def blind_spots(self) -> list[str]:
        """What this guard cannot observe on its model, in plain words."""
        if self._binding is None:  # detached: what it could not observe while attached
            return list(self._last_blind_spots)
        return self._binding.blind_spots(self.config)

    # ------------------------------------------------------------------ reporting
    @property
    def last_scalars(self) -> dict[str, float]:
        """The metrics of the latest logging step, by key (host values)."""
        return dict(self._last_scalars)

    @property
    def last_stats(self) -> LoggedStats | None:
        """The latest logging step's statistics, typed (per layer in depth order)."""
        return self._last_stats

    def active_conditions(self) -> dict[str, int]:
        """Conditions still present (seen at the detector's latest check: within
        ``log_every_n_steps`` steps, or the activation monitor's ``every_n_steps`` for what
        it reports): Event kind -> the step it was first reported."""
        self._mirror.drain(block=True)
        every = self.config.log_every_n_steps
        within = {kind: every for kind in self._announcer.debouncer.seen()}
        monitor = self.config.activations
        if monitor is not None:
            # A window of passes starts every every_n_steps and reports when it ends.
            cadence = int(getattr(monitor, "every_n_steps", every)) + int(
                getattr(monitor, "window", 0)
            )
            interval = max(every, cadence)
            within.update({kind: interval for kind in monitor.kinds})
        return self._announcer.debouncer.active(self._step - 1, within=within)

    def last_seen(self) -> dict[str, int]:
        """The step each Event kind's condition was last seen at (reported or folded)."""
        self._mirror.drain(block=True)
        return self._announcer.debouncer.last_shown()

    def occurrences(self) -> dict[str, int]:
        """How often each Event kind's condition was seen (reported or folded)."""
        self._mirror.drain(block=True)
        return self._announcer.debouncer.seen()

    def report(self) -> str:
        """A diagnosis a person can act on: verdict, gradient flow per layer, Events, remedies."""
        self._mirror.drain(block=True)
        return build_report(self)

    def summary(self) -> dict[str, Any]:
        """The data behind ``report()``."""
        self._mirror.drain(block=True)
        return build_summary(self)
