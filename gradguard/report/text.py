"""``guard.report()``: the run so far, as text a person can act on."""

from __future__ import annotations

import math
import textwrap
from typing import TYPE_CHECKING, Any

from .advice import fmt
from .summary import build_summary, kind_label

if TYPE_CHECKING:
    from .._readout import GuardReadout

__all__ = ["build_report"]

WIDTH = 100
BAR_WIDTH = 24
MAX_ROWS = 40


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def _headline(summary: dict[str, Any]) -> str:
    steps = summary["step"]
    groups = summary["event_groups"]
    if not groups:
        return f"Verdict: HEALTHY - no problem found in {steps} optimizer steps."
    parts = []
    for group in groups:
        when = "still present" if group["active"] else f"last seen at step {group['last_seen']}"
        parts.append(f"{group['label']} ({group['occurrences']}x, {when})")
    word = "UNHEALTHY" if summary["verdict"] == "error" else "NEEDS ATTENTION"
    return f"Verdict: {word} - " + "; ".join(parts) + "."


def _bar(value: float | None, low: float, high: float) -> str:
    if not _finite(value) or value is None or value <= 0:
        return ""
    if high <= low:
        return "#" * BAR_WIDTH
    fraction = (math.log10(value) - low) / (high - low)
    return "#" * max(1, round(fraction * BAR_WIDTH))


def _flow_table(summary: dict[str, Any]) -> list[str]:
    rows = summary["layers"]
    norms = [r["grad_norm"] for r in rows if _finite(r["grad_norm"]) and r["grad_norm"] > 0]
    if not rows or (summary["logged_step"] is None and not norms):
        return ["Gradient flow: no logging step yet."]
    high = math.log10(max(norms)) if norms else 0.0
    low = math.log10(min(norms)) if norms else 0.0
    low = min(low, high - 1.0)
    order = {
        "forward": "the first forward pass",
        "saved": "the saved run",
    }.get(summary["depth_order"], "module order")
    at = f" at step {summary['logged_step']}" if summary["logged_step"] is not None else ""
    lines = [f"Gradient flow{at} (input first; depth from {order}):"]
    name_width = min(40, max(5, *(len(r["name"]) for r in rows)))
    lines.append(
        f"  {'layer':<{name_width}}  {'grad norm':>9}  {'update ratio':>12}  "
        f"log10 grad norm {fmt(10**low)} .. {fmt(10**high)}"
    )
    shown = rows
    hidden = 0
    if len(rows) > MAX_ROWS:
        half = MAX_ROWS // 2
        shown = rows[:half] + rows[-half:]
        hidden = len(rows) - MAX_ROWS
    zero = set(summary["zero_grad_layers"])
    for index, row in enumerate(shown):
        if hidden and index == MAX_ROWS // 2:
            lines.append(f"  ... {hidden} layers not shown ...")
        name = row["name"]
        if len(name) > name_width:
            name = "..." + name[-(name_width - 3) :]
        grad = row["grad_norm"]
        grad_text = "-" if grad is None else fmt(grad)
        update = row["update_ratio"]
        update_text = "-" if update is None else ("0" if update == 0 else f"{update:.1e}")
        notes = []
        if not row["in_profile"]:
            notes.append("not in profile")
        if row["name"] in zero or grad == 0.0:
            notes.append("zero gradient")
        if row["dead_fraction"] is not None and row["dead_fraction"] >= 0.01:
            notes.append(f"dead {row['dead_fraction']:.0%}")
        if row["saturation"] is not None and row["saturation"] >= 0.01:
            notes.append(f"saturated {row['saturation']:.0%}")
        bar = _bar(grad, low, high)
        note = f"  ({', '.join(notes)})" if notes else ""
        cells = f"  {name:<{name_width}}  {grad_text:>9}  {update_text:>12}  {bar:<{BAR_WIDTH}}"
        lines.append((cells + note).rstrip())
    orders = summary["profile_orders"]
    if orders is not None:
        threshold = summary["profile_threshold"]
        alarm = (
            f" (vanishing at >= {fmt(10**threshold)}, exploding at <= {fmt(10**-threshold)})"
            if threshold is not None
            else ""
        )
        ratio = fmt(10**orders)
        text = f"Depth profile: output-side / input-side median grad norm = {ratio}{alarm}."
        lines.extend(_wrap(text, "  "))
    return lines


def _wrap(text: str, indent: str) -> list[str]:
    return textwrap.wrap(text, WIDTH, initial_indent=indent, subsequent_indent=indent + "  ")


def build_report(guard: GuardReadout) -> str:
    """A diagnosis a person can act on: verdict, gradient flow per layer, Events, remedies."""
    summary = build_summary(guard)
    lines = [
        f"gradguard report: {summary['step']} optimizer steps, "
        f"{summary['skipped_steps']} skipped by gradguard",
        *_wrap(_headline(summary), ""),
        "",
    ]
    lines.extend(_flow_table(summary))
    zero = summary["zero_grad_layers"]
    if zero:
        names = ", ".join(f"'{n}'" for n in zero[:4]) + (
            f" and {len(zero) - 4} more" if len(zero) > 4 else ""
        )
        lines.extend(
            _wrap(
                f"Note: {len(zero)} weight layer(s) got an exactly zero gradient ({names}): "
                "nothing reaches them (dead units upstream, or a branch the loss does not use).",
                "",
            )
        )
    if summary["not_observed"]:
        lines += ["", "Not observed (so this report cannot speak for it):"]
        for spot in summary["not_observed"]:
            lines.extend(_wrap(f"- {spot}.", "  "))
    groups = summary["event_groups"]
    if not groups:
        lines += ["", "Events: none."]
    else:
        total = sum(g["count"] for g in groups)
        lines += ["", f"Events ({total}), by kind:"]
        for group in groups:
            span = (
                f"step {group['first_step']}"
                if group["first_step"] == group["last_step"]
                else f"steps {group['first_step']}-{group['last_step']}"
            )
            plural = "s" if group["count"] > 1 else ""
            seen = group["occurrences"]
            lines.append(
                f"  {group['kind']}: {group['count']} {group['severity']}{plural}, {span}"
                + (f", seen {seen} times" if seen > group["count"] else "")
                + (" (still present)" if group["active"] else "")
            )
            lines.extend(_wrap(group["message"], "    "))
        lines += ["", "What to try first:"]
        for number, remedy in enumerate(summary["remedies"], start=1):
            lines.extend(
                _wrap(f"{number}. [{kind_label(remedy['kind'])}] {remedy['advice']}", "  ")
            )
    return "\n".join(lines)
