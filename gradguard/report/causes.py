"""The words for root causes: symmetric units, a learning rate too high, badly scaled inputs,
and activations close to the float16 limit.

Our own wording of the project's ADVICE notes, as in ``advice.py``: the message states what
was measured, with the numbers; the advice names the one or two remedies that fit.
"""

from __future__ import annotations

from collections.abc import Sequence

from .words import fmt, names, times

__all__ = [
    "GROWTH_FROM_LR",
    "INPUT_RMS_LIMIT",
    "INPUT_SPREAD_LIMIT",
    "TYPICAL_UPDATE_RATIO",
    "grew_from_lr",
    "input_scale_text",
    "inputs_remedy",
    "lr_too_high_text",
    "overflow_risk_text",
    "saturation_slope",
    "symmetric_units_text",
]

# The rule of thumb practitioners use for ||update|| / ||weights|| per step.
TYPICAL_UPDATE_RATIO = 1e-3
# Inputs count as badly scaled from these on (``ActivationMonitor``'s defaults): an RMS of 10
# (standardised inputs: ~1; digits as 0-255 bytes: ~100), or per-feature scales whose 90th
# and 10th percentiles differ 100x (standardised digits, one window: 1.3-4.4, see the monitor).
INPUT_RMS_LIMIT = 10.0
INPUT_SPREAD_LIMIT = 100.0

# Weights that doubled since the first check point at the learning rate, not the init (the
# healthy zoo grows at most 1.7x in 200 steps; Adam at lr 0.05 on tanh MLPs 2.5-8x).
GROWTH_FROM_LR = 2.0


def saturation_slope(kinds: Sequence[str]) -> str:
    """The slope fact that fits the saturating activations named in ``kinds``."""
    text = " ".join(kinds).lower()
    sigmoid = "sigmoid" in text
    tanh = "tanh" in text or "softsign" in text
    if sigmoid and not tanh:
        return "sigmoid's slope is at most 1/4"
    if tanh and not sigmoid:
        return "tanh's slope is at most 1, and near 0 once its units saturate"
    return "sigmoid's slope is at most 1/4, tanh's at most 1 and near 0 when saturated"


def grew_from_lr(
    growth: float | None, growth_steps: int | None, *, layer: str | None = None, note: str = ""
) -> str | None:
    """The learning-rate explanation when the weights (of ``layer``, or of the reported
    layers) grew ``GROWTH_FROM_LR`` times or more; ``note``: a remark after the growth."""
    if growth is None or growth < GROWTH_FROM_LR:
        return None
    steps = f" in {growth_steps} steps" if growth_steps else ""
    whose = f"the weights of '{layer}'" if layer else "the weights"
    return (
        f"{whose} grew {growth:.1f}x{steps}{note}, so the learning rate is too high "
        "(see the lr_too_high Event): lower it (aim for update/weight ratios near 1e-3) and "
        "add warm-up"
    )


def symmetric_units_text(
    layers: Sequence[tuple[str, float, int]],
    checks: int,
    last_step: int,
    *,
    relu_family: bool,
    saturating: bool,
) -> tuple[str, str]:
    """``layers``: (name, spread, units), worst first; ``spread`` is how much the layer's
    weight rows differ from their mean, relative to the weight norm (0: identical rows)."""
    parts = []
    for name, spread, units in layers[:3]:
        how = "all zero" if spread == 0.0 else f"rows differ by {spread:.1e} of the weight norm"
        parts.append(f"'{name}' ({units} units, {how})")
    more = len(layers) - 3
    message = (
        "Symmetric units: every unit has the same incoming weights in "
        + "; ".join(parts)
        + (f" and {more} more layers" if more > 0 else "")
        + f", on {checks} checks up to step {last_step}. "
        "Identical units compute the same function and receive the same gradient, so they "
        "stay identical: each such layer acts as a single unit."
    )
    if saturating and not relu_family:
        init = "Xavier (nn.init.xavier_uniform_) for tanh/sigmoid layers"
    elif relu_family and not saturating:
        init = "He (nn.init.kaiming_normal_) for ReLU-family layers"
    else:
        init = "He (nn.init.kaiming_normal_) for ReLU-family layers, Xavier for tanh/sigmoid"
    advice = (
        f"the weights start at a constant: initialise them randomly to break the symmetry, {init}"
        " (PyTorch's default init also does); biases may start at 0, weights never at a constant."
    )
    return message, advice


def lr_too_high_text(
    evidence: Sequence[str],
    *,
    growth: float | None,
    growth_steps: int | None,
    ratio: float | None,
    ratio_steps: int | None,
    peak_ratio: tuple[float, int] | None,
    loss: tuple[float, float, int] | None,
    clipping: bool,
) -> tuple[str, str]:
    """``evidence``: the pieces that held ("growth", "loss", "ratio"); ``growth``: median
    growth of the weight layers' norms over ``growth_steps``; ``ratio``: the median update
    ratio now, held over ``ratio_steps`` when "ratio" is evidence; ``peak_ratio``: (the
    largest median update ratio seen, its step); ``loss``: (early level, recent level,
    steps)."""
    facts = []
    if growth is not None and growth >= 1.05:
        facts.append(f"the weights grew {growth:.1f}x in {growth_steps} steps (median over layers)")
    if loss is not None and "loss" in evidence:
        early, recent, steps = loss
        verb = "rose" if recent > early else "barely fell"
        facts.append(f"the loss {verb} from {fmt(early)} to {fmt(recent)} over {steps} steps")
    if ratio is not None and "ratio" in evidence:
        facts.append(
            f"each step moves the weights by {fmt(ratio)} of their norm, for {ratio_steps} "
            f"steps now ({times(ratio / TYPICAL_UPDATE_RATIO)} the usual ~1e-3)"
        )
    elif peak_ratio is not None and peak_ratio[0] >= 10 * TYPICAL_UPDATE_RATIO:
        peak, step = peak_ratio
        facts.append(
            f"steps moved the weights by up to {fmt(peak)} of their norm (step {step}; "
            f"{times(peak / TYPICAL_UPDATE_RATIO)} the usual ~1e-3)"
        )
    message = "Learning rate too high: " + "; ".join(facts) + "."
    advice = (
        "lower the learning rate (try 10x lower; aim for update/weight ratios near 1e-3) and "
        "warm it up over the first few hundred steps"
    )
    advice += (
        "; clipping is on, but it bounds single steps, not a rate that is too high everywhere."
        if clipping
        else "; clipping only bounds single steps and does not fix a rate that is too high."
    )
    return message, advice


def inputs_remedy(rms: float | None, spread: float | None, layer: str | None) -> str | None:
    """A short remedy naming the inputs' scale, or None when ``rms``/``spread`` are within
    the default limits."""
    where = f"'{layer}' reads" if layer else "the model reads"
    if rms is not None and rms >= INPUT_RMS_LIMIT:
        return (
            f"{where} inputs of RMS {fmt(rms)}, far from unit scale: standardise them (zero mean, "
            "unit variance per feature)"
        )
    if spread is not None and spread >= INPUT_SPREAD_LIMIT:
        return (
            f"{where} features whose scales differ {times(spread)}: standardise each feature "
            "(zero mean, unit variance)"
        )
    return None


def input_scale_text(
    layer: str,
    *,
    mean: float,
    std: float,
    rms: float,
    spread: float | None,
    features: int,
    passes: int,
    window_start: int,
    large: bool,
    uneven: bool,
) -> tuple[str, str]:
    """Inputs far from zero mean / unit variance (``large``), or features whose scales differ
    by orders of magnitude (``uneven``: ``spread`` = 90th / 10th percentile of the per-feature
    RMS)."""
    facts = []
    if large:
        facts.append(
            f"inputs with mean {fmt(mean)} and std {fmt(std)} (RMS {fmt(rms)}; standardised "
            "inputs: ~1)"
        )
    if uneven and spread is not None:
        facts.append(
            f"{features} features whose scales differ {times(spread)} "
            "(90th vs 10th percentile of their RMS)"
        )
    message = (
        f"Badly scaled inputs: '{layer}' reads "
        + "; ".join(facts)
        + f", over {passes} training forward passes sampled from step {window_start}."
    )
    advice = (
        "standardise the inputs (zero mean, unit variance per feature, with statistics from the "
        "training set) or add a normalisation layer first (e.g. BatchNorm/LayerNorm on the "
        "inputs); then revisit the initialisation and learning rate."
    )
    return message, advice


def overflow_risk_text(
    layers: Sequence[tuple[str, float, str, float]],
    passes: int,
    window_start: int,
) -> tuple[str, str]:
    """``layers``: (name, abs-max, dtype name, the dtype's largest finite value), worst first."""
    parts = []
    for name, absmax, dtype, limit in layers[:3]:
        if absmax == float("inf"):
            parts.append(f"'{name}' overflowed {dtype} (Inf)")
        else:
            parts.append(
                f"'{name}' reached {absmax:,.0f}, {100 * absmax / limit:.0f}% of {dtype}'s max "
                f"({limit:,.0f})"
            )
    more = len(layers) - 3
    message = (
        "Activations near the float limit: "
        + "; ".join(parts)
        + (f" and {more} more layers" if more > 0 else "")
        + f", over {passes} training forward passes sampled from step {window_start}."
    )
    fp16 = any(dtype == "float16" for _, _, dtype, _ in layers)
    advice = (
        "an overflow to Inf (then NaN) is close: train in bf16 (float32's range) instead of fp16, "
        f"or run {names([n for n, *_ in layers], 1)} in float32 (torch.autocast(enabled=False) "
        "around it); keep activations small with LayerNorm or a lower learning rate."
        if fp16
        else "an overflow to Inf is close: run this layer in float32, and keep activations "
        "small with LayerNorm or a lower learning rate."
    )
    return message, advice
