"""From a closed window's statistics to findings, with the evidence that picks the advice."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn

from .._debounce import Finding
from .._dist import is_dtensor
from .._layers import LayerLayout
from .._stats import (
    ACT_ABSMAX,
    DEAD_FRACTION,
    INPUT_MEAN,
    INPUT_RMS,
    INPUT_SPREAD,
    INPUT_STD,
    SATURATION,
    LoggedStats,
)
from ..detect.symmetry import row_spread, unit_weight
from ..report.advice import dead_units_text, saturation_text
from ..report.causes import input_scale_text, inputs_remedy, overflow_risk_text
from .window import Window

__all__ = ["MIN_DEAD_SAMPLES", "Limits", "window_findings"]

# Below this many samples per unit in a window, "never fired" is not evidence of death
# (a unit firing on 10% of inputs stays silent on 16 samples 18% of the time).
MIN_DEAD_SAMPLES = 32
# A dead layer whose weight rows differ less than this (relative to the weight norm) is a
# layer of identical units (the SymmetryDetector's default threshold).
SYMMETRIC_SPREAD = 0.1


@dataclass(frozen=True)
class Limits:
    """The monitor's thresholds (see ``ActivationMonitor``)."""

    dead: float
    saturation: float
    input_rms: float
    input_spread: float
    headroom: float


@dataclass(frozen=True)
class _Repeat:
    max_gap: int
    remind_every: int


@dataclass(frozen=True)
class _Context:
    window: Window
    stats: LoggedStats
    layout: LayerLayout | None
    first_weights: tuple[int, dict[str, float]] | None
    inputs: str | None  # a remedy naming badly scaled inputs, if they are


def window_findings(
    window: Window,
    stats: LoggedStats,
    layout: LayerLayout | None,
    limits: Limits,
    *,
    healthy: dict[str, list[float]],
    first_weights: tuple[int, dict[str, float]] | None,
    max_gap: int,
    remind_every: int,
) -> list[Finding]:
    """The findings of ``window`` (read in ``stats``).

    ``healthy`` (layer -> [window start, dead fraction]) remembers layers seen mostly alive
    earlier; it is updated here and is what tells "training killed them" from "born dead".
    ``first_weights`` (step, layer -> weight norm) tells weights that grew from weights that
    started large.
    """
    repeat = _Repeat(max_gap, remind_every)
    found: list[Finding] = []
    inputs = _input_finding(window, stats, limits, repeat)
    remedy = None
    if inputs is not None:
        found.append(inputs)
        remedy = inputs_remedy(
            stats.scalars.get(INPUT_RMS), stats.scalars.get(INPUT_SPREAD), inputs.layers[0]
        )
    overflow = _overflow_finding(window, stats, limits, repeat)
    if overflow is not None:
        found.append(overflow)
    context = _Context(window, stats, layout, first_weights, remedy)
    for kind, metric, threshold in (
        ("dead_units", DEAD_FRACTION, limits.dead),
        ("saturation", SATURATION, limits.saturation),
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
            message, advice = _dead_units_text(context, flagged, fractions, healthy)
        else:
            message, advice = _saturation_text(context, flagged, fractions)
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
                track_layers=True,
                counted="windows",
                max_gap=repeat.max_gap,
                remind_every=repeat.remind_every,
            )
        )
    return found


def _input_finding(
    window: Window, stats: LoggedStats, limits: Limits, repeat: _Repeat
) -> Finding | None:
    if window.inputs is None:
        return None
    rms, spread = stats.scalars.get(INPUT_RMS), stats.scalars.get(INPUT_SPREAD)
    if rms is None or not math.isfinite(rms):
        return None
    large = rms >= limits.input_rms
    uneven = spread is not None and math.isfinite(spread) and spread >= limits.input_spread
    if not (large or uneven):
        return None
    layer = window.inputs.layer
    message, advice = input_scale_text(
        layer,
        mean=stats.scalars.get(INPUT_MEAN, math.nan),
        std=stats.scalars.get(INPUT_STD, math.nan),
        rms=rms,
        spread=spread,
        features=window.inputs.features,
        passes=window.passes,
        window_start=window.start,
        large=large,
        uneven=uneven,
    )
    return Finding(
        kind="input_scale",
        layers=(layer,),
        value=rms if large else float(spread or 0.0),
        message=message,
        advice=advice,
        details={"rms": rms, "feature_spread": spread, "features": window.inputs.features},
        counted="windows",
        max_gap=repeat.max_gap,
        remind_every=repeat.remind_every,
    )


def _overflow_finding(
    window: Window, stats: LoggedStats, limits: Limits, repeat: _Repeat
) -> Finding | None:
    rows: list[tuple[str, float, str, float]] = []
    for name, layer in window.stats.items():
        # For a layer with float16/bfloat16 outputs, act_absmax is their peak (window.py).
        peak = stats.layer_value(ACT_ABSMAX, name)
        if layer.low_dtype is None or peak is None:
            continue
        limit = torch.finfo(layer.low_dtype).max
        if peak >= limits.headroom * limit:
            rows.append((name, peak, str(layer.low_dtype).removeprefix("torch."), limit))
    if not rows:
        return None
    rows.sort(key=lambda row: -row[1] / row[3])
    message, advice = overflow_risk_text(rows, window.passes, window.start)
    return Finding(
        kind="overflow_risk",
        layers=tuple(name for name, *_ in rows),
        value=rows[0][1] / rows[0][3],
        message=message,
        advice=advice,
        details={"absmax": {name: peak for name, peak, _, _ in rows}},
        track_layers=True,
        counted="windows",
        max_gap=repeat.max_gap,
        remind_every=repeat.remind_every,
    )


def _host_numbers(values: list[torch.Tensor]) -> list[float]:
    # Deliberate host sync, rare: only on a logging step that emits an activation Event,
    # to read the evidence (biases, weight scale, the spread of weight rows) of its advice.
    return [float(v) for v in torch.stack([v.float().cpu() for v in values]).tolist()]


def _growth(context: _Context, name: str) -> tuple[float | None, int | None]:
    """How many times ``name``'s weight norm grew since the first logging step seen."""
    if context.first_weights is None:
        return None, None
    step, norms = context.first_weights
    first, now = norms.get(name), context.stats.layer_value("param_norm", name)
    if not first or now is None or not math.isfinite(now):
        return None, None
    return now / first, context.stats.step - step


def _symmetric_layer(context: _Context, flagged: list[str]) -> tuple[str, float] | None:
    """A flagged layer whose units are identical copies (constant init), if any."""
    if context.layout is None:
        return None
    weights = []
    for name in flagged:
        module = context.layout.modules.get(name)
        weight = unit_weight(module) if module is not None else None
        if weight is not None and not is_dtensor(weight) and weight.shape[0] >= 2:
            weights.append((name, weight))
    if not weights:
        return None
    spreads = _host_numbers([row_spread(w, 256) for _, w in weights])
    for (name, _), spread in zip(weights, spreads):
        if spread < SYMMETRIC_SPREAD:
            return name, spread
    return None


def _dead_units_text(
    context: _Context,
    flagged: list[str],
    fractions: dict[str, float],
    healthy: dict[str, list[float]],
) -> tuple[str, str]:
    window, layout = context.window, context.layout
    kinds = sorted(set().union(*(window.stats[n].dead_kinds for n in flagged)))
    rows = []
    for name in flagged:
        units = window.stats[name].units or 0
        rows.append((name, round(fractions[name] * units), units))
    text = partial(dead_units_text, rows, kinds, window.passes, window.start)
    symmetric = _symmetric_layer(context, flagged)
    if symmetric is not None:
        return text(symmetric=symmetric)
    first_layer = layout.names[0] if layout is not None and layout.names else None
    if context.inputs is not None and first_layer in flagged:
        return text(inputs=context.inputs)
    died_layers = [n for n in flagged if n in healthy]
    if died_layers:
        name = died_layers[0]
        ratio = context.stats.layer_value("update_ratio", name)
        died = (name, healthy[name][1], int(healthy[name][0]))
        return text(died=died, update_ratio=ratio)
    worst = flagged[0]
    mean_bias = None
    bias = getattr(layout.modules.get(worst) if layout is not None else None, "bias", None)
    alive = window.stats[worst].alive
    if isinstance(bias, torch.Tensor) and alive is not None and bias.shape == alive.shape:
        dead = (~alive).to(bias.device)
        (mean_bias,) = _host_numbers([(bias.detach() * dead).sum() / dead.sum().clamp_min(1)])
    return text(mean_bias=mean_bias)


def _saturation_text(
    context: _Context, flagged: list[str], fractions: dict[str, float]
) -> tuple[str, str]:
    window, layout = context.window, context.layout
    kinds = sorted(set().union(*(window.stats[n].saturation_kinds for n in flagged)))
    rows = [(n, fractions[n], window.stats[n].units) for n in flagged]
    worst = flagged[0]
    scale = None
    weight = getattr(layout.modules.get(worst) if layout is not None else None, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.ndim >= 2 and not is_dtensor(weight):
        fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(weight)
        xavier_std = math.sqrt(2.0 / (fan_in + fan_out))
        (scale,) = _host_numbers([weight.detach().float().std() / xavier_std])
    first = layout.names[0] if layout is not None and layout.names else None
    reads_inputs = worst == first
    growth, since = _growth(context, worst)
    return saturation_text(
        rows,
        kinds,
        window.passes,
        window.start,
        xavier_scale=scale,
        reads_inputs=reads_inputs,
        inputs=context.inputs if reads_inputs or (first in flagged) else None,
        growth=growth,
        growth_steps=since,
    )
