"""From a closed window's fractions to findings, with the evidence that picks the advice."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .._debounce import Finding
from .._dist import is_dtensor
from .._layers import LayerLayout
from .._stats import DEAD_FRACTION, SATURATION, LoggedStats
from ..report.advice import dead_units_text, saturation_text
from .window import Window

__all__ = ["MIN_DEAD_SAMPLES", "window_findings"]

# Below this many samples per unit in a window, "never fired" is not evidence of death
# (a unit firing on 10% of inputs stays silent on 16 samples 18% of the time).
MIN_DEAD_SAMPLES = 32


def window_findings(
    window: Window,
    stats: LoggedStats,
    layout: LayerLayout | None,
    *,
    dead_threshold: float,
    saturation_threshold: float,
    healthy: dict[str, list[float]],
    max_gap: int,
    remind_every: int,
) -> list[Finding]:
    """The dead-unit and saturation findings of ``window`` (read in ``stats``).

    ``healthy`` (layer -> [window start, dead fraction]) remembers layers seen mostly alive
    earlier; it is updated here and is what tells "training killed them" from "born dead".
    """
    found = []
    for kind, metric, threshold in (
        ("dead_units", DEAD_FRACTION, dead_threshold),
        ("saturation", SATURATION, saturation_threshold),
    ):
        fractions: dict[str, float] = {}
        for name in window.stats:
            value = stats.layer_value(metric, name)
            if value is not None and not math.isnan(value):
                fractions[name] = value
        flagged = []
        for layer, fraction in fractions.items():
            units = window.stats[layer].units or 0
            if kind == "dead_units":
                enough = window.stats[layer].samples >= MIN_DEAD_SAMPLES
                bad = enough and fraction >= threshold and round(fraction * units) >= 1
            else:
                bad = fraction >= threshold and fraction > 0
            if bad:
                flagged.append(layer)
            elif kind == "dead_units" and fraction < threshold:
                healthy[layer] = [float(window.start), fraction]
        if not flagged:
            continue
        depth = {name: i for i, name in enumerate(stats.layers)}
        flagged.sort(key=lambda n: (-fractions[n], depth.get(n, len(depth))))
        if kind == "dead_units":
            ratios = {name: stats.layer_value("update_ratio", name) for name in flagged}
            message, advice = _dead_units_text(layout, window, ratios, flagged, fractions, healthy)
        else:
            message, advice = _saturation_text(layout, window, flagged, fractions)
        unit_counts = {n: window.stats[n].units or 0 for n in flagged}
        details: dict[str, Any] = {
            "fractions": {n: fractions[n] for n in flagged},
            "units": unit_counts,
            "window_start": window.start,
            "forward_passes": window.passes,
        }
        if kind == "dead_units":
            details["dead_units"] = {n: round(fractions[n] * unit_counts[n]) for n in flagged}
        found.append(
            Finding(
                kind=kind,
                layers=tuple(flagged),
                value=fractions[flagged[0]],
                message=message,
                advice=advice,
                details=details,
                max_gap=max_gap,
                remind_every=remind_every,
                track_layers=True,
                counted="windows",
            )
        )
    return found


def _host_numbers(values: list[torch.Tensor]) -> list[float]:
    # Deliberate host sync, rare: only on a logging step that emits an activation Event,
    # to read the evidence (biases, weight scale) the advice is chosen from.
    return [float(v) for v in torch.stack([v.float().cpu() for v in values]).tolist()]


def _dead_units_text(
    layout: LayerLayout | None,
    window: Window,
    update_ratios: dict[str, float | None],
    flagged: list[str],
    fractions: dict[str, float],
    healthy: dict[str, list[float]],
) -> tuple[str, str]:
    kinds = sorted(set().union(*(window.stats[n].dead_kinds for n in flagged)))
    rows = []
    for name in flagged:
        units = window.stats[name].units or 0
        rows.append((name, round(fractions[name] * units), units))
    died_layers = [n for n in flagged if n in healthy]
    if died_layers:
        name = died_layers[0]
        ratio = update_ratios.get(name)
        died = (name, healthy[name][1], int(healthy[name][0]))
        return dead_units_text(
            rows, kinds, window.passes, window.start, died=died, update_ratio=ratio
        )
    worst = flagged[0]
    mean_bias = None
    bias = getattr(layout.modules.get(worst) if layout is not None else None, "bias", None)
    alive = window.stats[worst].alive
    if isinstance(bias, torch.Tensor) and alive is not None and bias.shape == alive.shape:
        dead = (~alive).to(bias.device)
        (mean_bias,) = _host_numbers([(bias.detach() * dead).sum() / dead.sum().clamp_min(1)])
    return dead_units_text(rows, kinds, window.passes, window.start, mean_bias=mean_bias)


def _saturation_text(
    layout: LayerLayout | None, window: Window, flagged: list[str], fractions: dict[str, float]
) -> tuple[str, str]:
    kinds = sorted(set().union(*(window.stats[n].saturation_kinds for n in flagged)))
    rows = [(n, fractions[n], window.stats[n].units) for n in flagged]
    worst = flagged[0]
    scale = None
    weight = getattr(layout.modules.get(worst) if layout is not None else None, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.ndim >= 2 and not is_dtensor(weight):
        fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(weight)
        xavier_std = math.sqrt(2.0 / (fan_in + fan_out))
        (scale,) = _host_numbers([weight.detach().float().std() / xavier_std])
    reads_inputs = layout is not None and bool(layout.names) and worst == layout.names[0]
    return saturation_text(
        rows, kinds, window.passes, window.start, xavier_scale=scale, reads_inputs=reads_inputs
    )
