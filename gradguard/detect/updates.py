"""Per-layer update spikes: a layer whose step moved its weights far more than usual.

The statistic is the update/parameter ratio ``r = ||delta W|| / ||W||`` of each layer, as a
z-score of ``log r`` against the layer's own bias-corrected EMA (as ``SpikeDetector`` does
for the total gradient norm). Adam-family optimizers normalise every step, so ``r`` is
steady in a healthy run; a layer whose ratio jumps has had its second-moment estimate
collapse, or its weights shrink, and large-scale runs see such jumps before loss spikes
(Wortsman et al., 2023, arXiv 2304.13013; marin#1368).

Where the ratios come from, and what they cost:

* ``every_n_steps=None`` (the default): the ratios the guard measures anyway on logging
  steps (``update_ratio="auto"``: a copy of the parameters on those steps only). No cost at
  all, but one sample per ``log_every_n_steps``, so it sees a spike only when it lands on
  a logging step, after a warm-up of ``warmup`` logging steps.
* ``every_n_steps=k``: the detector measures the ratios itself on every k-th step. It
  copies the parameters after the previous step (memory: one copy of the model, held for
  one step), then takes per-layer norms of the difference and of the weights on the device;
  the ratios reach the host like the step packet, with no sync. With ``k=1`` that is an
  extra read of the weights about three times per step: measured in the stability
  benchmark's notes, opt-in.

Under FSDP the per-step variant measures each rank's shard (the logging-step ratios are
all-reduced); the Event is announced on rank zero only, from rank zero's shard.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch

from .._debounce import Finding
from .._dist import local_tensor
from .._errors import ConfigurationError, check_number, check_positive_int
from .._packet import HostMirror
from .._stats import UPDATE_ZSCORE, LoggedStats, StepStats
from ..report.stability_advice import update_spike_text
from .base import Detector, GuardContext

__all__ = ["UpdateSpikeDetector"]


class UpdateSpikeDetector(Detector):
    """Flags a layer whose update/parameter ratio jumps far above its running mean (Event
    kind ``update_spike``); see the module docstring for where the ratios come from.

    ``threshold``: z-score of the log ratio (6, as the gradient-spike detector);
    ``alpha``: the EMA's decay (default 0.9 on logging steps, 0.98 when measured every
    step: about the last 10 logging steps, or 50 steps); ``min_std`` floors the std so a
    very steady ratio needs an ``exp(threshold * min_std)``-fold jump (3.3x: SGD with
    momentum doubles its step while the momentum builds up, and ``gradguard demo``'s healthy
    model jumps 1.9x at step 60); ``min_ratio`` ignores layers that barely move (a jump
    from 1e-7 to 1e-6 is not news); ``warmup``: the number of measurements before a layer
    is scored.
    """

    kinds: ClassVar[tuple[str, ...]] = ("update_spike",)

    def __init__(
        self,
        threshold: float = 6.0,
        *,
        every_n_steps: int | None = None,
        alpha: float | None = None,
        min_std: float = 0.2,
        min_ratio: float = 1e-4,
        warmup: int = 10,
    ) -> None:
        self.threshold = check_number("threshold", threshold, low=0.0, low_open=True)
        if every_n_steps is not None:
            check_positive_int("every_n_steps", every_n_steps)
        self.every_n_steps = every_n_steps
        if alpha is None:
            alpha = 0.9 if every_n_steps is None else 0.98
        self.alpha = check_number("alpha", alpha, low=0.0, high=1.0, low_open=True, high_open=True)
        self.min_std = check_number("min_std", min_std, low=0.0)
        self.min_ratio = check_number("min_ratio", min_ratio, low=0.0)
        self.warmup = check_positive_int("warmup", warmup, allow_zero=True)
        # Per layer name: [mean, var, weight, measurements], host floats.
        self._state: dict[str, list[float]] = {}
        self._snapshot: list[torch.Tensor] | None = None
        self._snapshot_step = -1
        self._index: torch.Tensor | None = None
        self._mirror = HostMirror(self._on_ratios)
        self._ready: list[tuple[int, list[float]]] = []
        self.last_zscore = 0.0
        self._top_since_log = 0.0

    def __repr__(self) -> str:
        return (
            f"UpdateSpikeDetector(threshold={self.threshold}, every_n_steps="
            f"{self.every_n_steps}, alpha={self.alpha}, min_std={self.min_std}, "
            f"min_ratio={self.min_ratio}, warmup={self.warmup})"
        )

    # ------------------------------------------------------------------ binding
    def bind(self, context: GuardContext) -> None:
        super().bind(context)
        self._snapshot = None
        self._mirror.clear()
        self._ready.clear()
        layout = context.layout
        self._index = torch.tensor(layout.param_layer, device=context.device)

    def unbind(self) -> None:
        self._snapshot = None
        self._mirror.clear()
        self._index = None
        super().unbind()

    # ------------------------------------------------------------------ per-step measuring
    def every_step(self) -> bool:
        """Only with ``every_n_steps``: by default it reads the logging steps' ratios."""
        return self.every_n_steps is not None

    def on_step_end(self, next_step: int) -> None:
        k = self.every_n_steps
        context = self.context
        if k is None or context is None or context.device.type == "meta":
            return
        if self._snapshot is not None and self._snapshot_step == next_step - 1:
            self._measure(next_step - 1)
        self._snapshot = None
        if next_step % k == 0:
            params = [local_tensor(p) for p in context.layout.params]
            with torch.no_grad():
                self._snapshot = list(torch._foreach_mul(params, 1.0))
            self._snapshot_step = next_step

    @torch.no_grad()
    def _measure(self, step: int) -> None:
        """Per-layer ``||delta W|| / ||W||`` of ``step``, on the device, to the host later."""
        context, snapshot, index = self.context, self._snapshot, self._index
        assert context is not None and snapshot is not None and index is not None
        params = [local_tensor(p) for p in context.layout.params]
        if not params:
            return
        deltas = list(torch._foreach_sub(params, snapshot))
        num_layers = context.layout.num_layers
        squares = torch.zeros(2, num_layers, device=context.device, dtype=torch.float32)
        for row, tensors in enumerate((deltas, params)):
            # One stack (dtypes promote), not one cast per tensor: the op count stays flat.
            norms = torch.stack(torch._foreach_norm(tensors)).float()
            squares[row].index_add_(0, index, norms.square())
        norms = squares.sqrt()
        ratios = norms[0] / norms[1].clamp_min(1e-12)
        self._mirror.push(step, ratios)

    def _on_ratios(self, step: int, values: list[float], note: Any) -> None:
        self._ready.append((step, values))

    # ------------------------------------------------------------------ scoring
    def on_step(self, stats: StepStats) -> list[Finding]:
        if self.every_n_steps is None or self.context is None:
            return []
        self._mirror.drain(block=False)
        findings = []
        ready, self._ready = self._ready, []
        for step, ratios in ready:
            if len(ratios) == len(stats.layers):
                findings += self._score(step, stats.layers, ratios)
        return findings

    def on_log(self, stats: LoggedStats) -> list[Finding]:
        if self.every_n_steps is not None or stats.update_ratio is None:
            return []
        return self._score(stats.step, stats.layers, stats.update_ratio)

    def _score(
        self, step: int, layers: Sequence[str], ratios: Sequence[float | None]
    ) -> list[Finding]:
        context = self.context
        if context is None:
            return []
        a = self.alpha
        hits: list[tuple[float, str, float, float]] = []  # (z, layer, ratio, running mean)
        top = 0.0
        for name, ratio in zip(layers, ratios):
            if ratio is None or not math.isfinite(ratio) or ratio <= 0:
                continue
            mean, var, weight, seen = self._state.setdefault(name, [0.0, 0.0, 0.0, 0.0])
            x = math.log(ratio)
            std = max(math.sqrt(var), self.min_std)
            deviation = x - mean if weight > 0 else 0.0
            z = deviation / std
            scored = seen >= self.warmup
            if scored:
                top = max(top, z)
            if scored and z > self.threshold and ratio >= self.min_ratio:
                hits.append((z, name, ratio, math.exp(mean)))
                deviation = std * self.threshold
            new_weight = weight * a + (1.0 - a)
            gain = (1.0 - a) / new_weight
            mean = x if weight == 0 else mean + gain * deviation
            var = var + gain * (deviation * deviation - var)
            self._state[name] = [mean, var, new_weight, seen + 1]
        self.last_zscore = top
        self._top_since_log = max(self._top_since_log, top)
        if not hits:
            return []
        hits.sort(reverse=True)
        message, advice = update_spike_text(
            [(name, ratio, running) for _, name, ratio, running in hits],
            hits[0][0],
            clipping=context.clipping,
            every_step=self.every_n_steps == 1,
        )
        return [
            Finding(
                kind="update_spike",
                layers=tuple(name for _, name, _, _ in hits),
                value=hits[0][0],
                message=message,
                advice=advice,
                details={"ratio": hits[0][2], "running": hits[0][3], "step": step},
                max_gap=context.repeat_every,
                remind_every=context.repeat_every,
                track_layers=True,
                counted="update spikes",
            )
        ]

    def metrics(self) -> Mapping[str, float | torch.Tensor]:
        """The largest per-layer z-score since the last logging step (measured every
        ``every_n_steps`` only: on logging steps the ratios are scored after the copy)."""
        if self.context is None or self.every_n_steps is None or not self._state:
            return {}
        top, self._top_since_log = self._top_since_log, 0.0
        return {UPDATE_ZSCORE: top}

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"layers": {name: list(values) for name, values in self._state.items()}}

    def check_state(self, state: Mapping[str, Any]) -> None:
        layers = state.get("layers", {})
        if not isinstance(layers, Mapping) or not all(
            isinstance(v, list) and len(v) == 4 for v in layers.values()
        ):
            raise ConfigurationError.bad_value(
                "state['layers']", layers, "expected {layer: [mean, var, weight, seen]}"
            )

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._state = {
            str(name): [float(v) for v in values]
            for name, values in state.get("layers", {}).items()
        }
