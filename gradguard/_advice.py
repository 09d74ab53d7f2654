"""The words gradguard uses: messages that state the evidence and advice that fits it.

Our own wording of the catalogue in the project's ADVICE notes (symptom -> causes -> remedies).
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["nonfinite_text", "spike_text"]


def _names(layers: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(f"'{name}'" for name in layers[:limit])
    more = len(layers) - limit
    return shown + (f" and {more} more" if more > 0 else "")


def nonfinite_text(
    layers: Sequence[str], total_layers: int, policy: str, skipped: bool
) -> tuple[str, str]:
    """Message and advice for a NaN/Inf gradient. ``layers`` closest to the loss first."""
    if layers and len(layers) < total_layers:
        where = (
            f"in {len(layers)} of {total_layers} layers, first (closest to the loss) "
            f"{_names(layers)}"
        )
    else:
        where = f"in every layer ({total_layers}), so it likely started in the loss itself"
    outcome = (
        "gradguard skipped the optimizer step, so the weights are unchanged."
        if skipped
        else "the optimizer step went ahead with it."
    )
    message = f"Gradient is NaN/Inf {where}; {outcome}"
    if not layers or len(layers) == total_layers:
        advice = (
            "check the loss for log(0), division by zero or sqrt of a negative; "
            "lower the learning rate"
        )
    else:
        advice = (
            f"look at the forward pass of {_names(layers, 1)} for overflow (exp, large "
            "activations); lower the learning rate and clip gradients (clip=gg.AutoClip())"
        )
    if policy == "warn":
        advice += "; pass on_nonfinite='skip' to keep the weights intact when this happens"
    advice += "; under fp16 AMP use bf16 or a GradScaler."
    return message, advice


def spike_text(norm: float, running: float, zscore: float, skipped: bool) -> tuple[str, str]:
    ratio = norm / running if running > 0 else float("inf")
    message = (
        f"Gradient norm spiked to {norm:.3g}, {ratio:.1f}x its running mean {running:.3g} "
        f"(z-score {zscore:.1f})"
        + ("; gradguard skipped the step." if skipped else ".")
    )
    advice = (
        "a bad batch or too high a learning rate for this phase: lower the learning rate or "
        "add warm-up, and clip spikes with clip=gg.ZClip() (or on_spike='skip')."
    )
    return message, advice
