"""The host half of a guard: step packets in, findings out, logging steps.

Each step's packet reaches ``_on_packet`` (at most a step late, without a sync): the
counters move and every detector's ``on_step`` sees the typed ``StepStats`` (``batched``
detectors in batches of up to ``BATCH_STEPS`` steps, see ``detect/base.py``). A logging step
goes through ``_publish`` (one bulk copy, the sinks, ``on_log``). Findings become Events in
the ``Announcer``. The other parts: ``_guard.py`` (attach, the adapter API) and
``_readout.py`` (read-only views).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ._announce import Announcer
from ._config import GuardConfig
from ._debounce import Finding
from ._dist import is_rank_zero
from ._keys import MetricKeys
from ._packet import HostMirror, PacketSpec
from ._publish import PendingLog, collect
from ._sinks import SinkSet
from ._stats import (
    CLIP_COEF,
    CLIPPED_STEPS,
    NONFINITE_STEPS,
    SKIPPED_STEPS,
    LoggedStats,
    StepStats,
)
from ._step import SCALER_OVERFLOW, SKIP
from .detect.base import BATCH_STEPS

if TYPE_CHECKING:
    from ._binding import Binding
    from .detect.base import Detector
    from .recover.ladder import RecoveryLadder

__all__ = ["GuardHostSide"]


class GuardHostSide:
    """Mixin: what a ``GradGuard`` does with a step once its numbers are on the host."""

    config: GuardConfig
    sinks: SinkSet
    _announcer: Announcer
    _binding: Binding | None
    _mirror: HostMirror
    _keys: MetricKeys
    _ladder: RecoveryLadder | None
    _step_detectors: list[Detector]
    _batched_detectors: list[Detector]
    _batch: list[StepStats]
    _all_detectors: Callable[[], list[Detector]]
    _step: int
    _skipped_steps: int
    _nonfinite_steps: int
    _clipped_steps: int
    _last_scalars: dict[str, float]
    _last_stats: LoggedStats | None

    def _on_packet(self, step: int, values: list[float], note: Any) -> None:
        spec, host_skip, present, layers, host_values = note
        assert isinstance(spec, PacketSpec)
        total, layer_norms, extras = spec.unpack(values)
        if host_values:
            extras.update(host_values)
        overflow = extras.get(SCALER_OVERFLOW, 0.0) > 0
        nonfinite = not math.isfinite(total) and not overflow
        skipped = host_skip if host_skip is not None else extras.get(SKIP, 0.0) > 0.5
        self._skipped_steps += bool(skipped)
        self._nonfinite_steps += nonfinite
        coef = extras.get(CLIP_COEF)
        self._clipped_steps += coef is not None and coef < 1.0
        stats = StepStats(
            step, layers, total, tuple(layer_norms), present, nonfinite, skipped, extras
        )
        if self._batched_detectors:
            # Queued before anything else runs: a sink that reads the report from inside
            # an announcement (a blocking drain) must not hand a later step over first.
            self._batch.append(stats)
        triggers: list[str] = []
        for detector in self._step_detectors:
            for finding in detector.on_step(stats):
                triggers.append(finding.kind)
                self._announce(finding, step)
        if self._batch:
            # The recovery ladder acts on every step's findings: no batching under it.
            limit = 1 if self._ladder is not None else BATCH_STEPS
            if len(self._batch) >= limit or nonfinite or skipped:
                triggers += self._flush_batched()
        if self._ladder is not None:
            self._ladder.observe(step, skipped=bool(skipped), triggers=triggers)

    def _flush_batched(self) -> list[str]:
        """Hand the waiting steps to the ``batched`` detectors, in order; the kinds found.

        Also called after every blocking drain (a logging step, a state_dict, a report,
        detach), so what they say is never older than what the guard shows."""
        batch, self._batch = self._batch, []
        kinds: list[str] = []
        for stats in batch:
            for detector in self._batched_detectors:
                for finding in detector.on_step(stats):
                    kinds.append(finding.kind)
                    self._announce(finding, stats.step)
        return kinds

    def _publish(self, binding: Binding, pending: PendingLog) -> None:
        self._mirror.drain(block=True)
        host: dict[str, float] = {
            SKIPPED_STEPS: float(self._skipped_steps),
            NONFINITE_STEPS: float(self._nonfinite_steps),
        }
        if self.config.clip is not None:
            host[CLIPPED_STEPS] = float(self._clipped_steps)
        if self._ladder is not None:
            host.update(self._ladder.metrics())
        detectors = self._all_detectors()
        stats = collect(
            pending, binding.layout, binding.computer, [d.metrics() for d in detectors], host
        )
        self._last_stats = stats
        metrics = self._keys.flatten(stats)
        self._last_scalars = dict(metrics)
        if binding.rank_zero:
            self.sinks.log_scalars(metrics, stats.sink_step)
        for detector in detectors:
            for finding in detector.on_log(stats):
                self._announce(finding, pending.step)

    def _announce(self, finding: Finding, step: int, *, warn: bool = True) -> None:
        binding = self._binding
        rank_zero = binding.rank_zero if binding is not None else is_rank_zero()
        self._announcer.announce(finding, step, rank_zero=rank_zero, warn=warn)
