"""Detectors over logging-step statistics, and the human-readable report."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._guard import Detector, GradGuard

__all__ = ["build_report", "build_summary", "default_detectors"]


def default_detectors() -> list[Detector]:
    return []


def build_summary(guard: GradGuard) -> dict[str, Any]:
    kinds = Counter(event.kind for event in guard.events)
    return {
        "step": guard.step,
        "skipped_steps": guard.skipped_steps,
        "events": dict(kinds),
        "healthy": not kinds,
        "last_scalars": guard.last_scalars,
    }


def build_report(guard: GradGuard) -> str:
    summary = build_summary(guard)
    lines = [f"gradguard report after {summary['step']} optimizer steps"]
    if summary["healthy"]:
        lines.append("Verdict: healthy - no problem found.")
    else:
        lines.append("Verdict: problems found:")
        for event in guard.events:
            lines.append(f"  - {event}")
    return "\n".join(lines)
