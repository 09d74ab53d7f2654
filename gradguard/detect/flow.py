"""Gradient-flow diagnosis: vanishing and exploding gradients read from the depth profile.

Runs on logging steps over numbers already on the host (``LoggedStats``): no extra sync.

Depth order is the guard's: the reverse of the order in which layers received their
gradients in the first backward pass (input first), or module registration order when no
backward was seen. Only layers with real depth count ("weight layers": Linear, Conv, RNN,
MultiheadAttention, and custom modules owning a matrix); biases-only modules, norm layers
(BatchNorm, LayerNorm, GroupNorm, RMSNorm) and embeddings are left out, because their
gradients are naturally small or sparse and would fake a profile.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from typing import Any, ClassVar

from .._debounce import Finding
from .._errors import ConfigurationError, check_number, check_positive_int
from .._stats import DEAD_FRACTION, INPUT_RMS, INPUT_SPREAD, SATURATION, LoggedStats
from ..report.advice import ModelTraits, exploding_text, vanishing_text
from ..report.causes import inputs_remedy
from .anatomy import anatomy
from .base import Detector, GuardContext

__all__ = ["GradientFlowDetector"]

_KINDS = ("vanishing", "exploding")


class GradientFlowDetector(Detector):
    """Finds vanishing and exploding gradients in the per-layer gradient norms.

    Each logging step, the weight layers' gradient norms are read in depth order (input
    first) on a log10 scale, and compared by the median of the output-side third against
    the median of the input-side third (robust to one odd layer, and to the size of any one
    layer):

    * **vanishing**: the output side's median is at least ``orders`` powers of ten above the
      input side's (default 2, i.e. 100x; healthy MLPs, CNNs with BatchNorm and small
      transformers measured within 0.6). Layers with an exactly zero gradient say "no
      signal" (an unused branch, or dead units upstream, reported by the activation
      monitor) and are left out.
    * **exploding**, on any of three pieces of evidence: the profile the other way round
      (input side ``orders`` powers of ten above the output side); the gradients dwarf the
      weights (median over weight layers of ``||grad|| / ||weights||`` at least
      ``grad_to_weight``, default 100, healthy runs stay below about 1); or the total norm
      rose ``rise_orders`` powers of ten (default 2) above its early level, the median of
      the first ``baseline_checks`` logging steps.

    A condition must hold on ``patience`` consecutive logging steps (default 3) before the
    Event; while it persists, a "still present" Event follows every ``repeat_every`` steps
    (default 1000); it is over once it has been absent ``patience`` logging steps in a row.
    ``min_layers`` weight layers with a gradient are needed to read a profile (default 3).
    ``grad_to_weight=None`` or ``rise_orders=None`` turns that piece of evidence off (e.g.
    ``grad_to_weight`` under a loss summed over very large batches).

    Update ratios (``||update|| / ||weights||``) are quoted in the message but do not trip
    the detector: adaptive optimizers flatten them, and per-group learning rates (layer-wise
    decay when fine-tuning, frozen-ish groups) make them fall toward the input on purpose.

    The advice follows the evidence: when the reported layers' weights grew 2x or more
    since the first check, the gradients vanish because a learning rate too high saturated
    the units, and the advice hands over to the learning rate (the ``lr_too_high`` Event
    says more); when the activation monitor measured badly scaled inputs, exploding
    gradients are blamed on them first.

    Use it through ``GradGuard(detectors=[gg.GradientFlowDetector(orders=3)])``; the default
    guard runs one with these defaults.
    """

    kinds: ClassVar[tuple[str, ...]] = _KINDS

    def __init__(
        self,
        *,
        orders: float = 2.0,
        grad_to_weight: float | None = 100.0,
        rise_orders: float | None = 2.0,
        patience: int = 3,
        min_layers: int = 3,
        baseline_checks: int = 3,
        repeat_every: int = 1000,
    ) -> None:
        self.orders = check_number("orders", orders, low=0.0, low_open=True)
        self.grad_to_weight = (
            None
            if grad_to_weight is None
            else check_number("grad_to_weight", grad_to_weight, low=0.0, low_open=True)
        )
        self.rise_orders = (
            None
            if rise_orders is None
            else check_number("rise_orders", rise_orders, low=0.0, low_open=True)
        )
        self.patience = check_positive_int("patience", patience)
        self.min_layers = check_positive_int("min_layers", min_layers)
        if self.min_layers < 2:
            raise ConfigurationError.bad_value(
                "min_layers", min_layers, "expected an integer >= 2 (a profile needs two ends)"
            )
        self.baseline_checks = check_positive_int("baseline_checks", baseline_checks)
        self.repeat_every = check_positive_int("repeat_every", repeat_every)
        # From bind(): weight layer name -> rows (sum of the first dims of its matrices).
        self._rows: dict[str, int] | None = None
        self._static_traits: dict[str, Any] = {}
        self._reset()
        self.last_profile: dict[str, Any] = {}
        self.latest_activity: dict[str, dict[str, float]] = {}

    def __repr__(self) -> str:
        return (
            f"GradientFlowDetector(orders={self.orders}, grad_to_weight={self.grad_to_weight}, "
            f"rise_orders={self.rise_orders}, patience={self.patience}, "
            f"min_layers={self.min_layers}, repeat_every={self.repeat_every})"
        )

    def _reset(self) -> None:
        self._streak = dict.fromkeys(_KINDS, 0)
        self._clear = dict.fromkeys(_KINDS, 0)
        self._active: dict[str, int] = {}
        self._early_total: list[float] = []
        self._early_layer: dict[str, list[float]] = {}
        self._init_gain: float | None = None
        self._first_weights: dict[str, float] = {}
        self._first_step: int | None = None
        self._inputs: dict[str, float] = {}

    # ------------------------------------------------------------------ binding
    def bind(self, context: GuardContext) -> None:
        """Learn which layers have depth and what the model is made of (shapes only, no sync)."""
        super().bind(context)
        self._rows, self._static_traits = anatomy(context.layout, context.model)

    def is_weight_layer(self, name: str) -> bool:
        """Whether ``name`` counts for the depth profile (every layer, before ``bind``)."""
        return self._rows is None or name in self._rows

    def _traits(self, stats: LoggedStats, layers: tuple[str, ...] = ()) -> ModelTraits:
        saturating = tuple(self._static_traits.get("saturating", ()))
        if not saturating and self.latest_activity.get(SATURATION):
            saturating = ("sigmoid/tanh",)
        growth = None
        grown = [
            norm / self._first_weights[name]
            for name, norm in zip(stats.layers, stats.param_norm)
            if name in layers
            and norm is not None
            and math.isfinite(norm)
            and self._first_weights.get(name, 0.0) > 0
        ]
        if grown:
            growth = statistics.median(grown)
        since = stats.step - self._first_step if self._first_step is not None else None
        return ModelTraits(
            saturating=saturating,
            relu_family=bool(self._static_traits.get("relu_family", False)),
            recurrent=self._static_traits.get("recurrent"),
            normalised=bool(self._static_traits.get("normalised", False)),
            init_gain=self._init_gain,
            clipping=self.context is not None and self.context.clip is not None,
            growth=growth,
            growth_steps=since,
            inputs=inputs_remedy(self._inputs.get(INPUT_RMS), self._inputs.get(INPUT_SPREAD), None),
        )

    # ------------------------------------------------------------------ the check
    def on_log(self, stats: LoggedStats) -> list[Finding]:
        for metric in (DEAD_FRACTION, SATURATION):
            values = stats.per_layer.get(metric)
            if values is not None:
                seen = {n: v for n, v in zip(stats.layers, values) if v is not None}
                if seen:
                    self.latest_activity.setdefault(metric, {}).update(seen)
        for metric in (INPUT_RMS, INPUT_SPREAD):
            if metric in stats.scalars:
                self._inputs[metric] = stats.scalars[metric]
        names: list[str] = []
        grads: list[float] = []
        weights: list[float] = []
        zero: list[str] = []
        param_norm = stats.param_norm
        for i, name in enumerate(stats.layers):
            grad = stats.grad_norm[i]
            if grad is None or not stats.present[i] or not self.is_weight_layer(name):
                continue
            if not math.isfinite(grad):
                return []  # the guard reports NaN/Inf itself; no profile from a broken step
            if grad == 0.0:
                zero.append(name)
                continue
            names.append(name)
            grads.append(grad)
            weight = param_norm[i]
            weights.append(weight if weight is not None else float("nan"))
        if not math.isfinite(stats.total):
            return []
        self._remember_early(stats, names, grads, weights)
        logs = [math.log10(g) for g in grads]
        self.last_profile = {"step": stats.sink_step, "layers": names, "zero_layers": zero}

        findings: dict[str, tuple[str, tuple[str, ...], float, dict[str, Any]] | None] = {}
        findings["vanishing"] = None
        findings["exploding"] = None
        if len(names) >= self.min_layers:
            k = max(1, len(names) // 3)
            out_median = statistics.median(logs[-k:])
            in_median = statistics.median(logs[:k])
            span = out_median - in_median
            self.last_profile["orders"] = span
            reference = names[-k:]
            if span >= self.orders:
                order = sorted(range(len(names) - k), key=lambda i: logs[i])
                worst = [i for i in order if logs[i] <= out_median - self.orders] or order[:k]
                findings["vanishing"] = (
                    "profile",
                    tuple(names[i] for i in worst),
                    10**span,
                    {
                        "orders": span,
                        "reference": reference,
                        "reference_norm": 10**out_median,
                        "worst_norm": grads[worst[0]],
                    },
                )
            elif -span >= self.orders:
                order = sorted(range(len(names) - k), key=lambda i: -logs[i])
                worst = [i for i in order if logs[i] >= out_median + self.orders] or order[:k]
                findings["exploding"] = (
                    "profile",
                    tuple(names[i] for i in worst),
                    10**-span,
                    {
                        "orders": -span,
                        "reference": reference,
                        "reference_norm": 10**out_median,
                        "worst_norm": grads[worst[0]],
                    },
                )
        if findings["exploding"] is None:
            findings["exploding"] = self._scale_or_rise(stats, names, grads, weights)

        found: list[Finding] = []
        for kind in _KINDS:
            evidence = findings[kind]
            traits = self._traits(stats, evidence[1] if evidence is not None else ())
            finding = self._confirm(kind, stats, evidence, traits)
            if finding is not None:
                found.append(finding)
        return found

    def _remember_early(
        self, stats: LoggedStats, names: list[str], grads: list[float], weights: list[float]
    ) -> None:
        if self._first_step is None or stats.step < self._first_step:
            self._first_step = stats.step
            self._first_weights = {
                n: w for n, w in zip(stats.layers, stats.param_norm) if w is not None
            }
        if self._init_gain is None and self._rows is not None and names:
            gains = [
                w / math.sqrt(self._rows[n])
                for n, w in zip(names, weights)
                if math.isfinite(w) and w > 0
            ]
            if gains:
                self._init_gain = statistics.median(gains)
        if len(self._early_total) < self.baseline_checks and stats.total > 0:
            self._early_total.append(stats.total)
            for name, grad in zip(names, grads):
                self._early_layer.setdefault(name, []).append(grad)

    def _scale_or_rise(
        self, stats: LoggedStats, names: list[str], grads: list[float], weights: list[float]
    ) -> tuple[str, tuple[str, ...], float, dict[str, Any]] | None:
        if self.grad_to_weight is not None and names:
            ratios = [
                (g / w, i)
                for i, (g, w) in enumerate(zip(grads, weights))
                if math.isfinite(w) and w > 0
            ]
            if ratios:
                median = statistics.median(r for r, _ in ratios)
                if median >= self.grad_to_weight:
                    ranked = sorted(ratios, reverse=True)
                    worst = [i for r, i in ranked if r >= self.grad_to_weight] or [ranked[0][1]]
                    top = worst[0]
                    return (
                        "scale",
                        tuple(names[i] for i in worst),
                        median,
                        {"grad": grads[top], "weight": weights[top], "layers_counted": len(ratios)},
                    )
        if (
            self.rise_orders is not None
            and len(self._early_total) >= self.baseline_checks
            and stats.step > 0
        ):
            baseline = statistics.median(self._early_total)
            rise = stats.total / baseline if baseline > 0 else 0.0
            if rise >= 10**self.rise_orders:
                per_layer: list[tuple[float, str]] = []
                for i, name in enumerate(names):
                    early = self._early_layer.get(name)
                    if early:
                        per_layer.append((grads[i] / statistics.median(early), name))
                per_layer.sort(reverse=True)
                rising = [n for r, n in per_layer if r >= 10**self.rise_orders] or [
                    n for _, n in per_layer[:3]
                ]
                return ("rise", tuple(rising), rise, {"baseline": baseline, "total": stats.total})
        return None

    def _confirm(
        self,
        kind: str,
        stats: LoggedStats,
        finding: tuple[str, tuple[str, ...], float, dict[str, Any]] | None,
        traits: ModelTraits,
    ) -> Finding | None:
        """Confirmation: a condition counts once it held on ``patience`` checks in a row,
        and stays on (reported at each check) until it was absent ``patience`` checks."""
        if finding is None:
            self._streak[kind] = 0
            if kind in self._active:
                self._clear[kind] += 1
                if self._clear[kind] >= self.patience:
                    del self._active[kind]
                    self._clear[kind] = 0
            return None
        self._streak[kind] += 1
        self._clear[kind] = 0
        if self._streak[kind] < self.patience:
            return None
        self._active.setdefault(kind, stats.sink_step)
        return self._finding(kind, stats, finding, traits)

    def _finding(
        self,
        kind: str,
        stats: LoggedStats,
        finding: tuple[str, tuple[str, ...], float, dict[str, Any]],
        traits: ModelTraits,
    ) -> Finding:
        evidence, layers, value, info = finding
        checks = self._streak[kind]
        if kind == "vanishing":
            update = None
            ratios = stats.update_ratio
            if ratios is not None and layers:
                update = ratios[stats.layers.index(layers[0])]
            message, advice = vanishing_text(
                layers,
                info["worst_norm"],
                info["reference"],
                info["reference_norm"],
                info["orders"],
                checks,
                traits,
                update_ratio=update if update else None,
            )
        else:
            message, advice = exploding_text(evidence, layers, value, info, checks, traits)
        details = {"evidence": evidence, "checks": checks}
        details.update(info)
        # A check every logging step: a missed one (absent, not yet cleared) keeps the episode.
        interval = self.context.log_every_n_steps if self.context is not None else 1
        return Finding(
            kind=kind,
            layers=layers,
            value=value,
            message=message,
            advice=advice,
            details=details,
            max_gap=interval * (self.patience + 1),
            remind_every=self.repeat_every,
        )

    # ------------------------------------------------------------------ state
    def active(self) -> dict[str, int]:
        """Conditions currently confirmed: kind -> the step they were first confirmed."""
        return dict(self._active)

    def state_dict(self) -> dict[str, Any]:
        return {
            "streak": dict(self._streak),
            "clear": dict(self._clear),
            "active": dict(self._active),
            "early_total": list(self._early_total),
            "early_layer": {k: list(v) for k, v in self._early_layer.items()},
            "init_gain": self._init_gain,
            "first_step": self._first_step,
            "first_weights": dict(self._first_weights),
            "inputs": dict(self._inputs),
        }

    def check_state(self, state: Mapping[str, Any]) -> None:
        for key in ("streak", "clear", "active", "early_layer", "first_weights", "inputs"):
            if not isinstance(state.get(key, {}), Mapping):
                raise ConfigurationError.bad_value(
                    f"state[{key!r}]", state.get(key), "expected a mapping"
                )

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._reset()
        self._streak.update({str(k): int(v) for k, v in state.get("streak", {}).items()})
        self._clear.update({str(k): int(v) for k, v in state.get("clear", {}).items()})
        self._active = {str(k): int(v) for k, v in state.get("active", {}).items()}
        self._early_total = [float(v) for v in state.get("early_total", [])]
        self._early_layer = {
            str(k): [float(x) for x in v] for k, v in state.get("early_layer", {}).items()
        }
        gain = state.get("init_gain")
        self._init_gain = None if gain is None else float(gain)
        first = state.get("first_step")
        self._first_step = None if first is None else int(first)
        self._first_weights = {str(k): float(v) for k, v in state.get("first_weights", {}).items()}
        self._inputs = {str(k): float(v) for k, v in state.get("inputs", {}).items()}
