"""Symmetric units: a layer whose units all have the same incoming weights.

A constant (or zero) initialisation gives every unit of a layer the same weights; the units
then compute the same function, receive the same gradient and stay identical, so the layer
behaves as a single unit whatever its width. The norms look ordinary; only the weight rows
show it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from .._debounce import Finding
from .._dist import is_dtensor
from .._errors import ConfigurationError, check_number, check_positive_int
from .._stats import UNIT_SPREAD, LoggedStats
from ..report.causes import symmetric_units_text
from .base import Detector, GuardContext

__all__ = ["SymmetryDetector", "row_spread", "unit_weight"]

_SATURATING = (nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Softsign, nn.Hardsigmoid)
_RELU_FAMILY = (nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.GELU, nn.SiLU, nn.Mish)


def unit_weight(module: nn.Module) -> torch.Tensor | None:
    """The weight whose rows are the module's units: Linear, Bilinear, and ungrouped,
    non-transposed convolutions (in a grouped conv, equal filters read different channels)."""
    if isinstance(module, nn.modules.conv._ConvNd):
        if module.transposed or module.groups != 1:
            return None
    elif not isinstance(module, (nn.Linear, nn.Bilinear)):
        return None
    weight = getattr(module, "weight", None)
    return weight if isinstance(weight, nn.Parameter) else None


@torch.no_grad()
def row_spread(weight: torch.Tensor, max_rows: int) -> torch.Tensor:
    """``||W - mean_row(W)|| / ||W||`` over at most ``max_rows`` evenly strided rows (0-d,
    on the weight's device; 0 for an all-zero weight: every unit is the same; NaN for a
    weight holding NaN/Inf, which reads as "not measured")."""
    rows = weight.detach()
    if rows.shape[0] > max_rows:
        rows = rows[:: -(-rows.shape[0] // max_rows)]
    rows = rows.reshape(rows.shape[0], -1).float()
    total = torch.linalg.vector_norm(rows)
    spread: torch.Tensor = torch.linalg.vector_norm(rows - rows.mean(0)) / total.clamp_min(1e-30)
    return spread


class SymmetryDetector(Detector):
    """Finds layers whose units (rows of a Linear/Conv weight) are identical, or nearly.

    On each of the first ``checks`` logging steps (default 3, the first one after the first
    optimizer step) it measures, per Linear/Conv layer with at least two units, the spread
    of the weight rows around their mean relative to the weight norm,
    ``||W - mean_row(W)|| / ||W||`` (``unit_spread/<layer>``; an all-zero weight reads 0). A
    layer whose spread stays below ``threshold`` on ``patience`` checks in a row (default 2:
    the rows stayed identical through the training steps in between, so their gradients were
    identical too) raises ``symmetric_units``.

    ``threshold`` (default 0.1): on the digits MLP with every weight at 0.05, the hidden
    layers read 1.3e-07 to 9e-03 after the first step (PyTorch's random biases break the
    symmetry slowly: 4e-03 to 0.13 at step 50, and some seeds recover by step 150); every
    healthy zoo model reads at least 0.78 at any check (the nanoGPT head tied to the token
    embedding), most 0.9-0.97. A check does not count for a layer that had a gradient but
    did not move (a warm-up that starts at lr 0), so a zero-initialised layer is judged once
    it moves; one that its gradient breaks at once (a LoRA ``B``, a zero-init classifier
    head) differs after its first update and is not reported. A layer stuck at zero with
    no gradient at all (two zero-initialised layers in a row) is reported.

    Cost: only on those first logging steps, about five small kernels per layer on at most
    ``max_rows`` rows of its weight (evenly strided: identical rows stay identical in any
    subset), joining the logging step's single bulk copy; nothing afterwards. Sharded
    (DTensor) weights are not measured.
    """

    kinds: ClassVar[tuple[str, ...]] = ("symmetric_units",)

    def __init__(
        self,
        threshold: float = 0.1,
        *,
        checks: int = 3,
        patience: int = 2,
        max_rows: int = 256,
    ) -> None:
        self.threshold = check_number("threshold", threshold, low=0.0, high=1.0, low_open=True)
        self.checks = check_positive_int("checks", checks)
        self.patience = check_positive_int("patience", patience)
        if self.patience > self.checks:
            raise ConfigurationError.bad_value(
                "patience", patience, f"expected an integer <= checks ({checks})"
            )
        self.max_rows = check_positive_int("max_rows", max_rows)
        if self.max_rows < 2:
            raise ConfigurationError.bad_value("max_rows", max_rows, "expected an integer >= 2")
        self._weights: dict[str, torch.Tensor] = {}
        self._units: dict[str, int] = {}
        self._checked: dict[str, int] = {}  # layer -> checks done (state_dict)
        self._streak: dict[str, int] = {}  # layer -> symmetric checks in a row (state_dict)
        self._measuring = False
        self._relu_family = False
        self._saturating = False

    def __repr__(self) -> str:
        return (
            f"SymmetryDetector(threshold={self.threshold}, checks={self.checks}, "
            f"patience={self.patience})"
        )

    def bind(self, context: GuardContext) -> None:
        super().bind(context)
        watched = {id(p) for p in context.layout.params}
        self._weights, self._units = {}, {}
        for name in context.layout.names:
            module = context.layout.modules.get(name)
            weight = unit_weight(module) if module is not None else None
            if (
                weight is None
                or id(weight) not in watched
                or weight.ndim < 2
                or weight.shape[0] < 2
                or is_dtensor(weight)
                or weight.is_meta
            ):
                continue
            self._weights[name] = weight
            self._units[name] = int(weight.shape[0])
        modules = list(context.model.modules())
        self._relu_family = any(isinstance(m, _RELU_FAMILY) for m in modules)
        self._saturating = any(isinstance(m, _SATURATING) for m in modules)

    def unbind(self) -> None:
        self._weights = {}
        self._measuring = False
        super().unbind()

    @torch.no_grad()
    def metrics(self) -> Mapping[str, float | torch.Tensor]:
        """``unit_spread`` per layer (NaN where not measured) while checks remain."""
        context = self.context
        due = [n for n in self._weights if self._checked.get(n, 0) < self.checks]
        self._measuring = bool(due) and context is not None
        if context is None or not due:
            return {}
        nan = torch.full((), math.nan, device=context.device)
        values = []
        for name in context.layout.names:
            weight = self._weights.get(name) if name in due else None
            if weight is None:
                values.append(nan)
            else:
                values.append(row_spread(weight, self.max_rows).to(context.device))
        return {UNIT_SPREAD: torch.stack(values)}

    def on_log(self, stats: LoggedStats) -> list[Finding]:
        values = stats.per_layer.get(UNIT_SPREAD)
        if not self._measuring or values is None:
            return []
        self._measuring = False
        flagged: list[tuple[str, float, int]] = []
        ratios = stats.update_ratio or (None,) * len(stats.layers)
        for name, spread, ratio, grad in zip(stats.layers, values, ratios, stats.grad_norm):
            if spread is None or name not in self._weights:
                continue
            if ratio == 0.0 and grad:
                continue  # a gradient but no update (lr 0 at a warm-up's start): no evidence
            self._checked[name] = self._checked.get(name, 0) + 1
            if spread < self.threshold:
                self._streak[name] = self._streak.get(name, 0) + 1
                if self._streak[name] >= self.patience:
                    flagged.append((name, spread, self._units[name]))
            else:
                self._streak[name] = 0
        if not flagged:
            return []
        depth = {name: i for i, name in enumerate(stats.layers)}
        flagged.sort(key=lambda row: (row[1], depth.get(row[0], 0)))
        checks = max(self._streak[name] for name, _, _ in flagged)
        message, advice = symmetric_units_text(
            flagged,
            checks,
            stats.sink_step,
            relu_family=self._relu_family,
            saturating=self._saturating,
        )
        interval = self.context.log_every_n_steps if self.context is not None else 1
        return [
            Finding(
                kind="symmetric_units",
                layers=tuple(name for name, _, _ in flagged),
                value=flagged[0][1],
                message=message,
                advice=advice,
                details={
                    "spread": {name: spread for name, spread, _ in flagged},
                    "units": {name: units for name, _, units in flagged},
                    "checks": checks,
                },
                max_gap=2 * interval,
                track_layers=True,
                counted="checks",
            )
        ]

    def state_dict(self) -> dict[str, Any]:
        """What a resume needs: the checks done and the symmetric streak per layer."""
        return {"checked": dict(self._checked), "streak": dict(self._streak)}

    def check_state(self, state: Mapping[str, Any]) -> None:
        for key in ("checked", "streak"):
            if not isinstance(state.get(key, {}), Mapping):
                raise ConfigurationError.bad_value(
                    f"state[{key!r}]", state.get(key), "expected a mapping"
                )

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a ``state_dict`` (checked first by ``check_state``)."""
        self._checked = {str(k): int(v) for k, v in state.get("checked", {}).items()}
        self._streak = {str(k): int(v) for k, v in state.get("streak", {}).items()}
