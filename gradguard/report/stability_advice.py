"""The words of the stability detectors: loss spikes, steady rises, update spikes, and what
forward forensics found after a NaN/Inf (``advice.py``'s conventions: a message with the
evidence and its numbers, advice with the one or two remedies that fit it, never one that
is already on).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .words import fmt, times
from .words import names as _names

__all__ = [
    "DTYPE_MAX",
    "InputRange",
    "loss_spike_text",
    "nonfinite_source_text",
    "op_display_name",
    "rising_text",
    "update_spike_text",
]


def loss_spike_text(
    loss: float,
    reference: float,
    zscore: float,
    window: int,
    *,
    early: bool = False,
    grad_norm: float,
    skipped: bool,
    clipping: str | None = None,
    clip_coef: float | None = None,
    on_spike: str = "warn",
) -> tuple[str, str]:
    """Message and advice for a training loss far above ``reference``: its median over the
    last ``window`` steps, or (``early``, in the first steps) its starting value.

    The loss of step t was computed before step t's update, so what the guard did with
    step t's gradient (skipped it, clipped it) is said too; the advice never recommends a
    clip or a skip that is already on.
    """
    if early:
        message = (
            f"Training loss reached {fmt(loss)} in the first steps, {loss / reference:.1f}x its "
            f"starting value ({fmt(reference)}): the first updates made the model worse"
        )
    else:
        message = (
            f"Training loss jumped to {fmt(loss)}, {loss / reference:.1f}x its median over "
            f"the last {window} steps ({fmt(reference)}; robust z-score {zscore:.0f})"
        )
    if skipped:
        message += "; gradguard skipped this step's update."
    elif clipping and clip_coef is not None and clip_coef < 1.0:
        message += (
            f"; the gradient norm was {fmt(grad_norm)} and {clipping} clipped it to "
            f"{fmt(grad_norm * clip_coef)}."
        )
    else:
        message += f"; the gradient norm was {fmt(grad_norm)}."
    advice = (
        "the learning rate is too high for the start of training: lower it or lengthen the warm-up"
        if early
        else "if the loss does not come back within a few dozen steps, lower the learning "
        "rate or lengthen the warm-up; if it came from one batch, inspect that batch"
    )
    if clipping:
        advice += f" ({clipping} is on: clipping bounds a step, not a rate that is too high)."
    elif on_spike == "skip":
        advice += "."
    else:
        advice += (
            "; clip=gg.ZClip() or on_spike='skip' keeps an outlier gradient from moving the "
            "weights."
        )
    return message, advice


@dataclass(frozen=True)
class InputRange:
    """The finite range of one input of the call that first made a NaN/Inf."""

    low: float
    high: float
    dtype: str
    numel: int

    @property
    def abs_max(self) -> float:
        return max(abs(self.low), abs(self.high))

    def describe(self) -> str:
        if self.low != self.low:
            return f"{self.dtype}[{self.numel}] with no finite value"
        return (
            f"{self.dtype}[{self.numel}] in [{fmt(self.low)}, {fmt(self.high)}] "
            f"(|max| {fmt(self.abs_max)})"
        )


# Dtype -> the largest finite value: where an overflow starts.
DTYPE_MAX = {"float16": 65504.0, "bfloat16": 3.39e38, "float32": 3.4e38, "float64": 1.8e308}
# Operators reach __torch_function__ as Tensor.__truediv__ or as Tensor.div (and so on).
_SYMBOLS = {
    **dict.fromkeys(("__truediv__", "__rtruediv__", "__div__", "div", "div_", "true_divide"),
                    "division (/)"),
    **dict.fromkeys(("__floordiv__", "floor_divide"), "division (//)"),
    **dict.fromkeys(("__mul__", "__rmul__", "mul", "mul_"), "multiplication (*)"),
    **dict.fromkeys(("__add__", "__radd__", "add", "add_"), "addition (+)"),
    **dict.fromkeys(("__sub__", "__rsub__", "sub", "sub_"), "subtraction (-)"),
    **dict.fromkeys(("__pow__", "__rpow__", "pow", "pow_"), "power (**)"),
    **dict.fromkeys(("__matmul__", "matmul"), "matmul (@)"),
}  # fmt: skip


def op_display_name(func: Any) -> str:
    """``log()``, ``division (/)``, ``linear()``: a torch call as a user wrote it."""
    name = str(getattr(func, "__name__", func))
    if name in _SYMBOLS:
        return _SYMBOLS[name]
    return name.strip("_") + "()"


def _op_cause(op: str, inputs: Sequence[InputRange], output_dtype: str, nan: bool) -> str:
    """The likely cause and its remedy, from the call's name and its inputs."""
    base = op.split("(")[0].strip().strip("_")
    low = min((r.low for r in inputs if r.low == r.low), default=math.nan)
    high = max((r.abs_max for r in inputs if r.low == r.low), default=math.nan)
    if base in ("log", "log2", "log10", "log1p", "xlogy", "lgamma", "digamma"):
        return (
            f"the log of a number <= 0 (the input reached {fmt(low)}): clamp it "
            "(x.clamp_min(1e-8)), or use log_softmax/logsumexp instead of log(softmax(...))"
        )
    if base in ("exp", "exp2", "expm1", "cosh", "sinh"):
        limit = "11.1 in fp16" if output_dtype == "float16" else "88.7 in float32"
        return (
            f"exp overflowed (its input reached {fmt(high)}; exp overflows above {limit}): "
            "subtract the maximum first, as softmax/logsumexp do, or clamp the input"
        )
    if base in ("sqrt", "rsqrt"):
        return (
            f"the square root of a negative number (the input reached {fmt(low)}): clamp it "
            "to >= 0 and add an epsilon (sqrt's gradient at 0 is infinite)"
        )
    if base in ("division", "div", "reciprocal", "true_divide", "floor_divide", "remainder"):
        return (
            "a division by zero (0/0 gives NaN, x/0 Inf): add an epsilon to the denominator "
            "or clamp it away from 0"
        )
    if base in ("power", "float_power"):
        return "a power of a negative base or an overflow: clamp the base or the exponent"
    if not nan:
        largest = DTYPE_MAX.get(output_dtype)
        where = f" ({output_dtype}'s largest value is {fmt(largest)})" if largest else ""
        remedy = (
            "use bf16 autocast instead of fp16, or keep these values small (normalise the "
            "inputs, LayerNorm before this layer, smaller weights)"
            if output_dtype == "float16"
            else "lower the learning rate and look at what grows (weights, activations)"
        )
        return f"an overflow to Inf from finite inputs{where}: {remedy}"
    return (
        "0/0, Inf - Inf or 0 x Inf inside this call (its inputs were finite but large or "
        "tiny): look for an unguarded division, or values that overflowed just before"
    )


def nonfinite_source_text(
    kind: str,
    trigger: int,
    traced: int,
    *,
    module: str | None = None,
    op: str | None = None,
    inputs: Sequence[InputRange] = (),
    output_dtype: str | None = None,
    nan: bool = False,
    inf_inputs: bool = False,
    layers: Sequence[str] = (),
    policy: str = "warn",
) -> tuple[str, str]:
    """Message and advice for what forward forensics found in the forward pass of step
    ``traced``, after the NaN/Inf gradient of step ``trigger`` (``kind``: see
    ``TraceResult``)."""
    intro = (
        f"After the NaN/Inf gradient of step {trigger}, gradguard traced the forward pass of "
        f"step {traced}"
    )
    what = "NaN" if nan else "Inf"
    ranges = "; ".join(f"input {i + 1}: {r.describe()}" for i, r in enumerate(inputs))
    inside = f" in '{module}'" if module else " in the model's own forward"
    if kind == "weights":
        message = (
            f"{intro}: the weights of {len(layers)} layer(s) ({_names(layers)}) were already "
            "NaN/Inf, because the optimizer step went ahead with the NaN/Inf gradient."
        )
        advice = (
            "this run cannot recover: restart from the last good checkpoint with "
            "on_nonfinite='skip', so that the weights stay finite and gradguard can trace "
            "the next NaN/Inf to the call that makes it"
            if policy != "skip"
            else "restart from the last good checkpoint"
        )
        return message, advice + "."
    if kind == "buffers":
        message = (
            f"{intro}: buffers of {len(layers)} module(s) ({_names(layers)}) hold NaN "
            "(running statistics, caches): the NaN/Inf entered the model's state."
        )
        return message, (
            "restart from the last good checkpoint; a BatchNorm running statistic goes NaN "
            "when one batch is NaN: keep on_nonfinite='skip' on and check the data."
        )
    if kind == "batch":
        message = f"{intro}: the batch itself holds NaN ({ranges})."
        return message, (
            "check the data pipeline for missing values, a division by a zero standard "
            "deviation in normalisation, or a corrupt sample; filter non-finite samples."
        )
    if kind == "finite":
        message = (
            f"{intro}: every output was finite, yet its gradient was NaN/Inf again, so the "
            "NaN/Inf is made after the forward pass."
        )
        return message, (
            "look at the loss (log(0), a division by a count that can be 0) and at the "
            "backward pass: the gradient of sqrt or norm at 0, pow(x, p<1) at 0, or a "
            "torch.where whose unused branch is NaN/Inf (mask the input, not the output)."
        )
    if kind == "propagated":
        call = f"{op}" if op else "a module's output"
        message = (
            f"{intro}: the model's output held NaN, and the first NaN showed up in {call}"
            f"{inside} from an input that already held it ({ranges}), which no traced call "
            "made."
        )
        return message, (
            "a tensor made outside the forward pass and reused in it (a cache, a "
            "precomputed table, a tensor kept from an earlier step) holds NaN: check those."
        )
    call = op if op else "the output of the module"
    message = f"{intro}: the first {what} came out of {call}{inside}"
    if inf_inputs:
        message += f", from inputs that held +-Inf but no NaN ({ranges})."
        return message, (
            "Inf - Inf or 0 x Inf: with a -inf attention mask, a fully masked row makes NaN "
            "in softmax; mask with a large negative number (torch.finfo(dtype).min) or keep "
            "one position unmasked in every row."
        )
    message += f", from finite inputs ({ranges})." if ranges else ", from finite inputs."
    cause = _op_cause(op or "", inputs, output_dtype or "", nan)
    return message, cause + "."


def rising_text(
    loss_rise: float | None,
    norm_rise: float | None,
    window: int,
    *,
    loss: float | None,
    grad_norm: float,
    zscore: float,
    clipping: str | None = None,
) -> tuple[str, str]:
    """Message and advice for a steady rise of the loss (``loss_rise``, a factor over
    ``window`` steps) and/or of the gradient norm (``norm_rise``)."""
    parts = []
    if loss_rise is not None:
        now = f", now {fmt(loss)}" if loss is not None else ""
        parts.append(f"the training loss rose {loss_rise:.2f}x{now}")
    if norm_rise is not None:
        parts.append(f"the gradient norm rose {times(norm_rise)}, now {fmt(grad_norm)}")
    what = " and ".join(parts)
    message = (
        f"Steady rise over the last {window} steps: {what} (Mann-Kendall trend z-score "
        f"{zscore:.1f}: not noise, a climb)."
    )
    if loss_rise is None:
        message += " The loss did not fall meanwhile."
    advice = (
        "the learning rate is too high for this phase: lower it (or add warm-up, or decay "
        "it) before the loss blows up"
    )
    advice += (
        f"; {clipping} is on and cannot fix a rate that is too high everywhere."
        if clipping
        else "; clipping would only hide it: it cannot fix a rate that is too high everywhere."
    )
    return message, advice


def update_spike_text(
    layers: Sequence[tuple[str, float, float]],
    zscore: float,
    *,
    clipping: str | None = None,
    every_step: bool = False,
) -> tuple[str, str]:
    """Message and advice for layers whose update/parameter ratio jumped. ``layers``:
    (name, this step's ratio, its running mean), worst first."""
    name, ratio, running = layers[0]
    message = (
        f"Update spike: the step moved the weights of '{name}' by {fmt(ratio)} of their norm, "
        f"{ratio / running:.1f}x its running mean {fmt(running)} (z-score {zscore:.1f})"
    )
    if len(layers) > 1:
        message += f"; also {_names([n for n, _, _ in layers[1:]])}"
    message += "." if every_step else " (measured on a logging step)."
    advice = (
        "large-scale runs see such jumps before loss spikes: lower the learning rate (or "
        "this layer's); with Adam, raise eps (1e-8 -> 1e-6) if this layer's gradient was "
        "tiny for a while, since a collapsed second-moment estimate blows the step up"
    )
    advice += (
        f" ({clipping} bounds the gradient, not Adam's normalised update)."
        if clipping
        else " (clipping the gradient does not bound Adam's normalised update)."
    )
    return message, advice
