"""One optimizer step, top to bottom: measure -> detect -> clip -> decide -> pack.

``StepPipeline.run`` is the whole per-step flow on the device. Everything it computes
stays there, except in the two cases the guard's policies ask for (``on_nonfinite=
"skip"|"raise"`` or ``on_spike="skip"`` on a non-fused optimizer: ONE flag read per step);
the host learns the rest from the step's packet, at most one step later.

1. **measure**: per-layer and total gradient norms, one foreach pass (``_norms.py``);
   under AMP with a fused optimizer they are divided by the loss scale.
2. **detect**: what must be known before the optimizer updates anything: the NaN/Inf flag
   (unless the step is a ``GradScaler`` overflow, which the scaler skips itself), and the
   spike flag when ``on_spike="skip"``. Everything else is detected on the host later.
3. **clip**: the clip strategy computes a scale on the device and multiplies the
   gradients by it.
4. **decide**: skip or raise (``_policy.py``).
5. **pack**: the norms' head plus the named extras, one vector for the host mirror.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ._config import GuardConfig
from ._errors import GradientAlarmError
from ._layers import LayerLayout
from ._norms import GradNormComputer, GradNorms
from ._packet import PacketSpec
from ._policy import FoundInfPatch, StepDecision, fused, fused_skip_is_safe
from ._stats import CLIP_COEF, CLIP_THRESHOLD
from .clip import base as clip_base
from .clip.base import ClipContext, ClipResult, HostNorms
from .detect.spike import FLAG, RUNNING, ZSCORE
from .report.advice import nonfinite_text

__all__ = ["LOSS", "SCALER_OVERFLOW", "SKIP", "StepOutput", "StepPipeline"]

# Names of packet extras (besides the clip's and the spike twin's).
SKIP = "skip"
SCALER_OVERFLOW = "scaler_overflow"
LOSS = "loss"


@dataclass
class StepOutput:
    """What one run of the pipeline produced."""

    packet: torch.Tensor
    spec: PacketSpec
    decision: StepDecision
    norms: GradNorms
    clip: ClipResult | None
    host_values: dict[str, float]  # what the host already knows (host bookkeeping on CPU)


class StepPipeline:
    """The per-step flow for one layout (rebuilt when the watched layers change)."""

    def __init__(
        self,
        config: GuardConfig,
        layout: LayerLayout,
        computer: GradNormComputer,
        optimizer: torch.optim.Optimizer,
    ) -> None:
        self.config = config
        self.layout = layout
        self.computer = computer
        self.optimizer = optimizer
        self.device = computer.device
        self.found_inf = FoundInfPatch()
        self._skip_on = config.on_nonfinite == "skip" or config.on_spike == "skip"
        self._decide_now = config.on_nonfinite == "raise"
        self._spike_on_device = config.on_spike == "skip"
        # A CPU device has no host-device boundary: strategies with host bookkeeping read
        # the norms directly (see clip.base.HOST_BOOKKEEPING_ON_CPU).
        self._host_clip = (
            config.clip is not None
            and config.clip.host_bookkeeping
            and self.device.type == "cpu"
            and clip_base.HOST_BOOKKEEPING_ON_CPU
        )
        self._specs: dict[tuple[bool, bool, bool], PacketSpec] = {}
        self._nan = torch.full((), math.nan, device=self.device)
        self._one = torch.ones((), device=self.device)

    def spec(self, scaler: bool, host_decides: bool, loss: bool = False) -> PacketSpec:
        """The packet layout of a step (cached: at most eight per layout)."""
        key = (scaler, host_decides, loss)
        if key not in self._specs:
            extras: list[str] = []
            if self.config.clip is not None and not self._host_clip:
                extras += [CLIP_THRESHOLD, CLIP_COEF]
            if self._spike_on_device:
                extras += [ZSCORE, FLAG, RUNNING]
            if self._skip_on and not host_decides:
                extras.append(SKIP)
            if scaler:
                extras.append(SCALER_OVERFLOW)
            if loss:
                extras.append(LOSS)
            self._specs[key] = PacketSpec(self.layout.num_layers, extras)
        return self._specs[key]

    def run(
        self,
        step: int,
        *,
        found_inf: torch.Tensor | None = None,
        apply_skip: bool = True,
        loss: torch.Tensor | None = None,
    ) -> StepOutput:
        """One step's device work (no autograd: nothing here is ever differentiated)."""
        grad_enabled = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)  # the cheap form of torch.no_grad() (every step)
        try:
            return self._run(step, found_inf, apply_skip, loss)
        finally:
            torch._C._set_grad_enabled(grad_enabled)

    def _run(
        self,
        step: int,
        found_inf: torch.Tensor | None,
        apply_skip: bool,
        loss: torch.Tensor | None,
    ) -> StepOutput:
        optimizer, config = self.optimizer, self.config
        is_fused = fused(optimizer)
        grad_scale = getattr(optimizer, "grad_scale", None) if is_fused else None
        if found_inf is None and is_fused:
            found_inf = getattr(optimizer, "found_inf", None)
        if not isinstance(grad_scale, torch.Tensor):
            grad_scale = None
        if not isinstance(found_inf, torch.Tensor):
            found_inf = None

        # 1. measure
        norms = self.computer.compute([p.grad for p in self.layout.params], grad_scale)
        extras: dict[str, torch.Tensor] = {}

        # 2. detect (only what must be decided before the step)
        nonfinite: torch.Tensor | None = None
        spike: torch.Tensor | None = None
        if self._skip_on or self._decide_now:
            nonfinite = ~(norms.total < math.inf)  # True for NaN and Inf
            if found_inf is not None:
                # A GradScaler already handles its own overflow steps: not gradguard's business.
                nonfinite = nonfinite & (found_inf.to(self.device) == 0)
        if found_inf is not None:
            extras[SCALER_OVERFLOW] = found_inf.to(self.device).float().sum()
        if self._spike_on_device:
            warm = step >= config.spike.warmup_steps
            extras.update(config.spike.decide(norms.total, warm))
            spike = extras[FLAG]
        skip_flag: torch.Tensor | None = None
        if self._skip_on:
            assert nonfinite is not None
            skip_flag = torch.zeros_like(nonfinite)
            if config.on_nonfinite == "skip":
                skip_flag = skip_flag | nonfinite
            if spike is not None:
                skip_flag = skip_flag | spike
        host_decides = self._decide_now or (
            self._skip_on and apply_skip and not (is_fused and fused_skip_is_safe(optimizer))
        )
        skip: bool | None = None
        if host_decides:
            # Deliberate host sync: ONE combined flag per step decides skip/raise now.
            raise_flag = nonfinite if self._decide_now else None
            code = 0
            if raise_flag is not None and skip_flag is not None:
                code = int((raise_flag.int() * 2 + skip_flag.int()).item())
            elif raise_flag is not None:
                code = int(raise_flag.int().item()) * 2
            elif skip_flag is not None:
                code = int(skip_flag.int().item())
            if code & 2:
                self._raise_nonfinite(step, norms)
            skip = bool(code & 1)

        # 3. clip
        clip_result = None
        host_values: dict[str, float] = {}
        if config.clip is not None and not any(norms.present_host) and not self.computer.sharded:
            # Nothing has a gradient (a batch that touched no trainable branch): nothing to
            # clip, and no 0 norm may enter a strategy's history.
            clip_result = ClipResult(self._nan, self._one)
            extras[CLIP_THRESHOLD], extras[CLIP_COEF] = self._nan, self._one
            if self._host_clip:
                host_values = {CLIP_THRESHOLD: math.nan, CLIP_COEF: 1.0}
        elif config.clip is not None:
            host = None
            if self._host_clip:
                values = norms.head.tolist()  # a CPU tensor: a read, not a device sync
                host = HostNorms(values[0], values[1:], norms.present_host)
            context = ClipContext(norms, self.layout, self.device, grad_scale, host)
            clip_result = config.clip.clip_(context)
            for name, value in (
                (CLIP_THRESHOLD, clip_result.threshold),
                (CLIP_COEF, clip_result.coef),
            ):
                if isinstance(value, torch.Tensor):
                    extras[name] = value
                else:
                    host_values[name] = value

        # 4. decide
        if skip:
            optimizer.zero_grad(set_to_none=True)
        elif skip is None and skip_flag is not None:
            extras[SKIP] = skip_flag
            if apply_skip:
                self.found_inf.apply(optimizer, skip_flag)

        # 5. pack (with the step's loss, when the user or the adapter handed it over)
        if loss is not None:
            extras[LOSS] = loss.to(self.device)
        spec = self.spec(found_inf is not None, host_decides, loss is not None)
        packet = spec.pack(norms.head, extras)
        decision = StepDecision(step, skip, skip_flag.float() if skip_flag is not None else None)
        return StepOutput(packet, spec, decision, norms, clip_result, host_values)

    def _raise_nonfinite(self, step: int, norms: GradNorms) -> None:
        layout = self.layout
        # Deliberate host sync: we are about to raise, so name the layers.
        layer_norms = norms.layer.tolist()
        bad = [
            layout.names[i]
            for i in reversed(range(layout.num_layers))
            if norms.present_host[i] and not math.isfinite(layer_norms[i])
        ]
        message, advice = nonfinite_text(bad, layout.num_layers, "raise", skipped=False)
        message = message.replace(
            "the optimizer step went ahead with it.", "the step was not taken."
        )
        raise GradientAlarmError(
            f"step {step}: {message} Try: {advice}", step=step, layers=tuple(bad)
        )
