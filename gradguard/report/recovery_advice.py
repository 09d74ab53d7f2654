"""The words of the recovery ladder: what it did, on what evidence, and what to look at
(drawn from ADVICE.md's rows on spikes, non-finite gradients and a learning rate too high).
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["recovery_text"]

_REASONS = {
    "skip": "steps skipped for NaN/Inf or spiking gradients",
    "loss_spike": "loss spikes",
    "divergence": "a steadily rising loss",
}


def _evidence(count: int, window: int, reasons: Sequence[str]) -> str:
    kinds = ", ".join(_REASONS.get(r, r) for r in sorted(set(reasons))) or "incidents"
    return f"{count} incidents within {window} steps, {kinds}"


def recovery_text(
    action: str,
    *,
    step: int,
    count: int,
    window: int,
    reasons: Sequence[str],
    lr_factor: float,
    lr_recovery_steps: int,
    snapshot_step: int | None = None,
    rollbacks: int = 0,
    max_rollbacks: int = 0,
    skip_after_rollback: int = 0,
    why: str = "",
) -> tuple[str, str]:
    """Message and advice for one action of the ladder (``lr_backoff``, ``rollback``,
    ``exhausted``, ``recovered``)."""
    evidence = _evidence(count, window, reasons)
    percent = f"{lr_factor:.0%}"
    if action == "lr_backoff":
        message = (
            f"Recovery: {evidence}; the learning rate of every param group is lowered to "
            f"{percent} of its scheduled value and returns to 100% over {lr_recovery_steps} steps."
        )
        advice = (
            "if this recurs, lower the learning rate or lengthen its warm-up; a spike that "
            "follows particular batches points at the data: inspect them"
        )
        return message, advice
    if action == "rollback":
        dropped = 1 + skip_after_rollback
        message = (
            f"Recovery: {evidence} despite a lower learning rate; rolled back model and "
            f"optimizer to the snapshot of step {snapshot_step} (rollback {rollbacks} of "
            f"{max_rollbacks} in this incident), dropped {dropped} update(s), learning rate at "
            f"{percent} and returning to 100% over {lr_recovery_steps} steps."
        )
        advice = (
            "the run was unstable at this learning rate: lower it (or add warm-up) before "
            "the next run; check the batches since that step, and clip with an adaptive "
            "threshold (gg.ZClip / gg.AutoClip) if you do not already"
        )
        return message, advice
    if action == "exhausted":
        message = f"Recovery exhausted: {evidence}, and {why}."
        advice = (
            "training cannot be stabilised at this learning rate: restart from a checkpoint "
            "with a lower learning rate or longer warm-up; look for NaN sources (log(0), "
            "division by zero, fp16 overflow) and bad batches"
        )
        return message, advice
    message = (
        f"Recovery: the learning rate is back at 100% of its schedule and no incident in "
        f"the last {window} steps; the ladder starts again from its first rung."
    )
    return message, "nothing to do; the report keeps the history of what was done"
