"""Metric keys: the only module that turns metric names into strings, and back.

Keys are ``<prefix>/<metric>`` for scalars and ``<prefix>/<metric>/<layer>`` for per-layer
metrics (``gradguard/grad_norm/encoder.layers.0.linear1``). Sinks receive a
``StepMetrics``: a plain mapping of key to float (what a tracker stores), which also
carries the typed ``LoggedStats`` it was made from, so a dashboard draws per-layer figures
in depth order without parsing a key.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping

from ._stats import LAYER_METRICS, LoggedStats

__all__ = ["TOTAL_NORM", "MetricKeys", "StepMetrics"]

TOTAL_NORM = "grad_norm_total"


class MetricKeys:
    """Formats (and reads back) the metric keys under one ``prefix``."""

    def __init__(self, prefix: str = "gradguard") -> None:
        self.prefix = prefix

    def scalar(self, metric: str) -> str:
        """The key of a scalar metric (``gradguard/clip/threshold``)."""
        return f"{self.prefix}/{metric}"

    def layer(self, metric: str, layer: str) -> str:
        """The key of one layer's value of a per-layer metric (``gradguard/grad_norm/fc1``)."""
        return f"{self.prefix}/{metric}/{layer}"

    def family(self, metric: str) -> str:
        """The common start of a per-layer metric's keys (``gradguard/grad_norm/``)."""
        return f"{self.prefix}/{metric}/"

    def event_tag(self, kind: str) -> str:
        """Where a dashboard files an Event's text (``gradguard/events/nonfinite``)."""
        return f"{self.prefix}/events/{kind}"

    def figure(self, name: str) -> str:
        """The tag of a figure or histogram (``gradguard/gradient_flow``)."""
        return f"{self.prefix}/{name}"

    def scalar_pattern(self, metric: str) -> str:
        """A regex matching exactly the key of a scalar metric (dashboard layouts)."""
        return rf"^{re.escape(self.prefix)}/{re.escape(metric)}$"

    def family_pattern(self, metric: str) -> str:
        """A regex matching every layer's key of a per-layer metric."""
        return rf"^{re.escape(self.prefix)}/{re.escape(metric)}/.+"

    def split(self, key: str) -> tuple[str, str | None] | None:
        """``(metric, layer)`` of a key under this prefix (layer None for scalars)."""
        head = self.prefix + "/"
        if not key.startswith(head):
            return None
        rest = key[len(head) :]
        for metric in LAYER_METRICS:
            if rest.startswith(metric + "/"):
                return metric, rest[len(metric) + 1 :]
        return rest, None

    def flatten(self, stats: LoggedStats) -> StepMetrics:
        """The key -> value mapping the sinks store, in a stable order."""
        values: dict[str, float] = {}
        for metric in LAYER_METRICS:
            per_layer = stats.per_layer.get(metric)
            if per_layer is None:
                continue
            for name, value in zip(stats.layers, per_layer):
                if value is not None:
                    values[self.layer(metric, name)] = value
        values[self.scalar(TOTAL_NORM)] = stats.total
        for metric, value in stats.scalars.items():
            values[self.scalar(metric)] = value
        return StepMetrics(values, stats, self)


class StepMetrics(Mapping[str, float]):
    """A logging step's metrics by key, plus the typed ``stats`` and the ``metric_keys``
    (formatter) behind them."""

    def __init__(self, values: dict[str, float], stats: LoggedStats, keys: MetricKeys) -> None:
        self._values = values
        self.stats = stats
        self.metric_keys = keys

    def __getitem__(self, key: str) -> float:
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"StepMetrics(step={self.stats.sink_step}, {len(self._values)} metrics)"
