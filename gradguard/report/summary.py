"""``guard.summary()``: the run so far as plain data (numbers, strings, lists, dicts)."""

from __future__ import annotations

import math
from collections import Counter
from typing import TYPE_CHECKING, Any

from .._events import EVENT_KINDS
from .._stats import DEAD_FRACTION, SATURATION
from ..detect.flow import GradientFlowDetector

if TYPE_CHECKING:
    from .._readout import GuardReadout

__all__ = ["KIND_LABELS", "build_summary", "kind_label", "kind_rank"]

TOP_REMEDIES = 3

KIND_LABELS = {
    "recovery": "recovery actions (LR back-off, rollback)",
    "nonfinite": "NaN/Inf gradients",
    "nonfinite_source": "where the NaN/Inf starts",
    "overflow_risk": "activations near the fp16 limit",
    "loss_spike": "loss spikes",
    "divergence": "steady rise (diverging)",
    "spike": "gradient spikes",
    "update_spike": "update spikes",
    "symmetric_units": "symmetric units (constant init)",
    "lr_too_high": "learning rate too high",
    "input_scale": "badly scaled inputs",
    "clipped_elsewhere": "clipped before gradguard measured",
    "vanishing": "vanishing gradients",
    "exploding": "exploding gradients",
    "dead_units": "dead units",
    "saturation": "saturated units",
}


def kind_label(kind: str) -> str:
    return KIND_LABELS.get(kind, kind.replace("_", " "))


def kind_rank(kind: str) -> int:
    return EVENT_KINDS.index(kind) if kind in EVENT_KINDS else len(EVENT_KINDS)


def _flow_detector(guard: GuardReadout) -> GradientFlowDetector | None:
    return next((d for d in guard.detectors if isinstance(d, GradientFlowDetector)), None)


def build_summary(guard: GuardReadout) -> dict[str, Any]:
    """The report as plain data (numbers, strings, lists, dicts): fit for any sink."""
    events = list(guard.events)
    counts = Counter(event.kind for event in events)
    detector = _flow_detector(guard)
    active = guard.active_conditions()
    occurrences = guard.occurrences()
    sightings = guard.last_seen()

    groups: list[dict[str, Any]] = []
    for kind in sorted(counts, key=kind_rank):
        of_kind = [e for e in events if e.kind == kind]
        latest = of_kind[-1]
        layers: list[str] = []
        for event in of_kind:
            layers.extend(name for name in event.layers if name not in layers)
        groups.append(
            {
                "kind": kind,
                "label": kind_label(kind),
                "count": len(of_kind),
                "occurrences": max(occurrences.get(kind, 0), len(of_kind)),
                "severity": "error" if any(e.severity == "error" for e in of_kind) else "warning",
                "first_step": of_kind[0].step,
                "last_step": latest.step,
                "last_seen": max(sightings.get(kind, latest.step), latest.step),
                "layers": layers,
                "message": latest.message,
                "advice": latest.advice,
                "first_advice": of_kind[0].advice,
                "active": kind in active,
            }
        )
    if any(g["severity"] == "error" for g in groups):
        verdict = "error"
    elif groups:
        verdict = "warning"
    else:
        verdict = "healthy"

    stats = guard.last_stats
    activity = {k: dict(v) for k, v in detector.latest_activity.items()} if detector else {}
    layers_data: list[dict[str, Any]] = []
    for name in guard.layers:

        def value(metric: str, layer: str = name) -> float | None:
            return stats.layer_value(metric, layer) if stats is not None else None

        def seen(metric: str, layer: str = name) -> float | None:
            latest = value(metric, layer)
            if latest is not None and not math.isnan(latest):
                return latest
            return activity.get(metric, {}).get(layer)

        layers_data.append(
            {
                "name": name,
                "grad_norm": value("grad_norm"),
                "update_ratio": value("update_ratio"),
                "param_norm": value("param_norm"),
                "in_profile": detector.is_weight_layer(name) if detector is not None else True,
                "dead_fraction": seen(DEAD_FRACTION),
                "saturation": seen(SATURATION),
            }
        )
    profile = detector.last_profile if detector is not None else {}
    remedies: list[dict[str, str]] = []
    ranked = sorted(groups, key=lambda g: (g["severity"] != "error", kind_rank(g["kind"])))
    for group in ranked[:TOP_REMEDIES]:
        remedies.append({"kind": group["kind"], "advice": group["first_advice"]})
    return {
        "step": guard.step,
        "logged_step": profile.get("step"),
        "skipped_steps": guard.skipped_steps,
        "nonfinite_steps": guard.nonfinite_steps,
        "verdict": verdict,
        "healthy": verdict == "healthy",
        "events": dict(counts),
        "event_groups": groups,
        "layers": layers_data,
        "depth_order": guard.depth_source,
        "profile_orders": profile.get("orders"),
        "profile_threshold": detector.orders if detector is not None else None,
        "zero_grad_layers": list(profile.get("zero_layers", [])),
        "remedies": remedies,
        "last_scalars": guard.last_scalars,
        "not_observed": _not_observed(guard),
    }


def _not_observed(guard: GuardReadout) -> list[str]:
    """What the guard could not see (the report says nothing about it), in plain words."""
    spots = list(guard.blind_spots())
    if guard.config.activations is None:
        spots.append("activations (dead and saturated units): not sampled, as activations=False")
    return spots
