"""The words gradguard uses: messages that state the evidence and advice that fits it.

Our own wording of the catalogue in the project's ADVICE notes (symptom -> causes ->
remedies). A message states what was measured, with the numbers; the advice names the one
or two remedies that fit that evidence, never the whole list.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .causes import grew_from_lr, saturation_slope
from .words import fmt, times
from .words import names as _names

__all__ = [
    "ModelTraits",
    "dead_units_text",
    "exploding_text",
    "fmt",
    "nonfinite_text",
    "saturation_text",
    "spike_text",
    "times",
    "vanishing_text",
]

# Initialisation scale, written as std(W) * sqrt(fan_in): PyTorch's default for Linear and
# Conv is 1/sqrt(3) ~ 0.58, LeCun/Xavier (square) 1, He (Kaiming, for ReLU) sqrt(2) ~ 1.41.
HE_GAIN = math.sqrt(2.0)
LARGE_INIT_GAIN = 2.0
SMALL_INIT_GAIN = 0.8


@dataclass(frozen=True)
class ModelTraits:
    """What the model is made of, as far as the advice needs to know.

    ``saturating``: names of the sigmoid/tanh-like activations found (module classes, or
    "sigmoid/tanh" when only their saturation metrics were seen). ``recurrent``: the class
    name of a recurrent module (``"RNN"``, ``"LSTM"``, ``"GRU"``) or ``None``.
    ``init_gain``: the median ``std(W) * sqrt(fan_in)`` of the weight layers when first
    measured. ``clipping``: a clip strategy is active. ``growth``: how many times the
    reported layers' weight norm grew since the first check, over ``growth_steps`` steps
    (a learning rate too high grows them fast). ``inputs``: a remedy naming badly scaled
    inputs, when the activation monitor measured them so.
    """

    saturating: tuple[str, ...] = ()
    relu_family: bool = False
    recurrent: str | None = None
    normalised: bool = False
    init_gain: float | None = None
    clipping: bool = False
    growth: float | None = None
    growth_steps: int | None = None
    inputs: str | None = None


def nonfinite_text(
    layers: Sequence[str],
    total_layers: int,
    policy: str,
    skipped: bool,
    *,
    clipping: str | None = None,
    inf_only: bool = False,
) -> tuple[str, str]:
    """Message and advice for a NaN/Inf gradient. ``layers`` closest to the loss first.

    ``clipping``: the clip strategy in use (its name), so the advice never recommends it;
    ``inf_only``: no NaN was seen, only Inf (which a float32 norm also reads when a finite
    gradient is so large that its sum of squares overflows float32, from about 1.8e19).
    """
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
    what = (
        "Inf (or so large that its float32 sum of squares overflows: norms from about 1.8e19)"
        if inf_only
        else "NaN/Inf"
    )
    message = f"Gradient is {what} {where}; {outcome}"
    if not layers or len(layers) == total_layers:
        advice = (
            "check the loss for log(0), division by zero or sqrt of a negative number, "
            "and lower the learning rate"
        )
    else:
        advice = (
            f"look at the forward pass of {_names(layers, 1)} for an overflow (exp, very large "
            "activations); lower the learning rate"
        )
        advice += (
            f" ({clipping} is on, but clipping cannot repair a NaN)"
            if clipping
            else " and clip gradients (clip=gg.AutoClip())"
        )
    if policy == "warn":
        advice += "; pass on_nonfinite='skip' to keep the weights intact when this happens"
    advice += "; under fp16 AMP use bf16 or a GradScaler."
    return message, advice


def spike_text(
    norm: float,
    running: float,
    zscore: float,
    skipped: bool,
    *,
    clipping: str | None = None,
    clip_coef: float | None = None,
) -> tuple[str, str]:
    """Message and advice for a total gradient norm far above its running mean.

    ``clipping``/``clip_coef``: the clip strategy in use and the scale it applied this
    step, so the message says what was done and the advice never recommends it again.
    """
    ratio = norm / running if running > 0 else float("inf")
    message = (
        f"Gradient norm spiked to {fmt(norm)}, {ratio:.1f}x its running mean {fmt(running)} "
        f"(z-score {zscore:.1f})"
    )
    if skipped:
        message += "; gradguard skipped the step."
    elif clipping and clip_coef is not None and clip_coef < 1.0:
        message += f"; {clipping} clipped it to {fmt(norm * clip_coef)}."
    elif clipping:
        message += f"; {clipping} did not clip it."
    else:
        message += "."
    if skipped:
        advice = "if spikes keep coming, lower the learning rate or lengthen the warm-up" + (
            "." if clipping else "; clip=gg.ZClip() tames them without skipping."
        )
    elif clipping:
        advice = (
            "a bad batch or too high a learning rate for this phase: lower the learning rate "
            "or add warm-up; on_spike='skip' drops such steps instead."
        )
    else:
        advice = (
            "a bad batch or too high a learning rate for this phase: lower the learning rate or "
            "add warm-up, and clip spikes with clip=gg.ZClip() (or on_spike='skip')."
        )
    return message, advice


def vanishing_text(
    layers: Sequence[str],
    worst_norm: float,
    reference_layers: Sequence[str],
    reference_norm: float,
    orders: float,
    checks: int,
    traits: ModelTraits,
    *,
    update_ratio: float | None = None,
) -> tuple[str, str]:
    """Gradient norms collapse from the output side toward the input side."""
    message = (
        f"Vanishing gradients: the gradient norm falls {times(10**orders)} "
        f"from the output side ({_names(reference_layers, 2)}: median {fmt(reference_norm)}) "
        f"to the input side ({_names(layers)}: {fmt(worst_norm)} at worst), "
        f"over {checks} consecutive checks"
    )
    if update_ratio is not None:
        message += (
            f"; '{layers[0]}' moves its weights by {fmt(update_ratio)} of their norm per step"
        )
    message += "."
    kinds = "/".join(traits.saturating)
    note = f" (pushing the {kinds} units into their flat tails)" if kinds else ""
    from_lr = grew_from_lr(traits.growth, traits.growth_steps, note=note)
    if from_lr is not None:
        advice = from_lr + "."
    elif traits.saturating:
        advice = (
            f"the {kinds} activations shrink the gradient at every layer "
            f"({saturation_slope(traits.saturating)}): use ReLU or GELU hidden units with He "
            "(Kaiming) init, and add BatchNorm/LayerNorm between the layers."
        )
    elif traits.recurrent == "RNN":
        advice = (
            "a plain RNN forgets long-range gradients: use an LSTM or GRU (forget-gate bias "
            "near 1), or shorten the sequences (truncated backprop)."
        )
    elif traits.init_gain is not None and traits.init_gain < SMALL_INIT_GAIN:
        advice = (
            f"the weights start small (std x sqrt(fan_in) = {traits.init_gain:.2g}; He init "
            f"uses {HE_GAIN:.2g}): initialise with nn.init.kaiming_normal_ (ReLU) or "
            "xavier_normal_ (tanh), or add BatchNorm/LayerNorm or residual connections."
        )
    else:
        advice = (
            "add BatchNorm/LayerNorm or residual (skip) connections so the gradient reaches "
            "the early layers, and check the initialisation (He for ReLU, Xavier for tanh)."
        )
    return message, advice


def _exploding_detail(
    evidence: str, layers: Sequence[str], value: float, info: Mapping[str, Any]
) -> str:
    shown = _names(layers)
    if evidence == "profile":
        return (
            f"the gradient norm grows {times(value)} from the output side "
            f"({_names(info['reference'], 2)}: median {fmt(info['reference_norm'])}) to the "
            f"input side ({shown}: {fmt(info['worst_norm'])} at worst)"
        )
    if evidence == "scale":
        return (
            f"the gradients are {times(value)} the size of the weights (median over "
            f"{info['layers_counted']} weight layers; worst {shown}: gradient norm "
            f"{fmt(info['grad'])} vs weight norm {fmt(info['weight'])})"
        )
    return (
        f"the total gradient norm rose to {fmt(info['total'])}, {times(value)} its early "
        f"level of {fmt(info['baseline'])}, most in {shown}"
    )


def exploding_text(
    evidence: str,
    layers: Sequence[str],
    value: float,
    info: Mapping[str, Any],
    checks: int,
    traits: ModelTraits,
) -> tuple[str, str]:
    """Gradients too large, on one of three pieces of ``evidence``.

    ``"profile"`` (``info``: reference, reference_norm, worst_norm), ``"scale"`` (grad,
    weight, layers_counted) or ``"rise"`` (total, baseline); ``value`` is the ratio.
    """
    detail = _exploding_detail(evidence, layers, value, info)
    message = f"Exploding gradients: {detail}, over {checks} consecutive checks."
    clip = (
        "clipping is already on, which bounds the step but not the cause: "
        if traits.clipping
        else ""
    )
    if traits.inputs is not None and traits.recurrent is None:
        advice = f"{clip}{traits.inputs}; then " + (
            "lower the learning rate." if traits.clipping else "clip with clip=gg.AutoClip()."
        )
    elif traits.recurrent is not None:
        advice = (
            f"{clip}the recurrent weights amplify the gradient at every time step: "
            "initialise them orthogonally or smaller (spectral radius below 1)"
            + ("" if traits.clipping else " and clip the gradient norm (clip=gg.AutoClip())")
            + ("; an LSTM or GRU is steadier." if traits.recurrent == "RNN" else ".")
        )
    elif evidence == "rise":
        advice = f"{clip}the learning rate is too high for this phase: lower it or add warm-up" + (
            "." if traits.clipping else ", and clip with clip=gg.AutoClip() (or gg.ZClip())."
        )
    elif traits.init_gain is not None and traits.init_gain >= LARGE_INIT_GAIN:
        advice = (
            f"{clip}the weights start too large (std x sqrt(fan_in) = {traits.init_gain:.2g}; "
            f"He init uses {HE_GAIN:.2g}): re-initialise with Xavier/He (nn.init.kaiming_normal_)"
            + (
                ", and lower the learning rate."
                if traits.clipping
                else ", and clip with clip=gg.AutoClip() meanwhile."
            )
        )
    else:
        advice = (
            f"{clip}lower the learning rate"
            + ("" if traits.clipping else " and clip with clip=gg.AutoClip()")
            + "; check the initialisation scale (Xavier/He) and add normalisation layers."
        )
    return message, advice


def _percent(fraction: float) -> str:
    return f"{100 * fraction:.0f}%"


def _sampled(passes: int, window_start: int) -> str:
    return f"{passes} training forward passes sampled from step {window_start}"


def dead_units_text(
    layers: Sequence[tuple[str, int, int]],
    activations: Sequence[str],
    passes: int,
    window_start: int,
    *,
    died: tuple[str, float, int] | None = None,
    update_ratio: float | None = None,
    mean_bias: float | None = None,
    symmetric: tuple[str, float] | None = None,
    inputs: str | None = None,
) -> tuple[str, str]:
    """Message and advice for dead units. ``layers``: (name, dead units, units), worst first.

    Evidence, most specific first: ``symmetric`` = (layer, spread of its weight rows) when
    the layer's units are identical copies (constant init: they live and die together);
    ``inputs``, a remedy for badly scaled inputs when the first layer is among the dead;
    ``died`` = (layer, its dead fraction, window step) when an earlier window saw that layer
    mostly alive (training killed the units: learning rate); else ``mean_bias`` of the worst
    layer's dead units (negative: initialisation).
    """
    parts = [
        f"'{name}' {dead} of {units} ({_percent(dead / max(units, 1))})"
        for name, dead, units in layers[:3]
    ]
    more = len(layers) - 3
    message = (
        f"Dead {'/'.join(activations)} units: {', '.join(parts)}"
        + (f" and {more} more layers" if more > 0 else "")
        + f" never fired on any sample of {_sampled(passes, window_start)}."
    )
    if symmetric is not None:
        name, spread = symmetric
        how = "all zero" if spread == 0.0 else f"differ by {spread:.1e} of their norm"
        return message, (
            f"the units of '{name}' are identical copies (its weight rows {how}), so they fire "
            "or die together: the weights started at a constant; initialise them randomly "
            "(He, nn.init.kaiming_normal_, for ReLU) to break the symmetry."
        )
    if inputs is not None:
        return message, f"{inputs}; large inputs give large updates that knock ReLU units out."
    if died is not None:
        name, fraction, step = died
        advice = (
            f"only {_percent(fraction)} of '{name}' was dead in the window at step {step}, so "
            "training knocked these units out: lower the learning rate and clip gradients "
            "(clip=gg.ZClip())"
        )
        if update_ratio is not None and update_ratio > 1e-2:
            advice += (
                f" (its update/parameter ratio is {update_ratio:.2g} per step; ~1e-3 is typical)"
            )
        return message, advice + "; LeakyReLU keeps a gradient for negative inputs."
    if mean_bias is not None and mean_bias < 0:
        return message, (
            f"the dead units of '{layers[0][0]}' have a mean bias of {mean_bias:.3g}, so their "
            "pre-activations start negative: re-initialise with He init "
            "(nn.init.kaiming_normal_) and zero biases, or use LeakyReLU."
        )
    return message, (
        "dead since the first sampled window: use He (Kaiming) initialisation, or put "
        "BatchNorm before the activation; LeakyReLU/GELU never die completely."
    )


def saturation_text(
    layers: Sequence[tuple[str, float, int | None]],
    activations: Sequence[str],
    passes: int,
    window_start: int,
    *,
    xavier_scale: float | None = None,
    reads_inputs: bool = False,
    inputs: str | None = None,
    growth: float | None = None,
    growth_steps: int | None = None,
) -> tuple[str, str]:
    """Message and advice for saturated sigmoid/tanh outputs. ``layers``: (name, fraction of
    outputs in the flat tails, units or None), worst first. ``xavier_scale``: std of the worst
    layer's weights over the Xavier std; ``reads_inputs``: the worst layer is the first one;
    ``inputs``: a remedy naming badly scaled inputs (measured); ``growth``: how many times the
    worst layer's weight norm grew since the first check, over ``growth_steps`` steps."""
    parts = [
        f"'{name}'" + (f" ({units} units)" if units else "") + f" {_percent(fraction)} of outputs"
        for name, fraction, units in layers[:3]
    ]
    more = len(layers) - 3
    message = (
        f"Saturated {'/'.join(activations)}: {'; '.join(parts)}"
        + (f" and {more} more layers" if more > 0 else "")
        + " in the flat tails, where the derivative is near 0, over "
        + f"{_sampled(passes, window_start)}."
    )
    worst = layers[0][0]
    remedies: list[str] = []
    note = f" (now {xavier_scale:.1f}x the Xavier scale)" if xavier_scale else ""
    from_lr = grew_from_lr(growth, growth_steps, layer=worst, note=note)
    if inputs is not None:
        remedies.append(inputs)
    elif from_lr is not None:
        remedies.append(from_lr)
    elif xavier_scale is not None and xavier_scale > 2.0:
        remedies.append(
            f"the weights of '{worst}' are {xavier_scale:.1f}x the Xavier scale: re-initialise "
            "with Xavier init (nn.init.xavier_uniform_)"
        )
    elif reads_inputs:
        remedies.append(f"'{worst}' reads the inputs: normalise them to zero mean, unit variance")
    remedies.append("add LayerNorm/BatchNorm before the activation")
    return message, "; ".join(remedies) + "."
