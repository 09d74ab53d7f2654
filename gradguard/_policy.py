"""Skip or raise, decided before the optimizer updates anything.

Two ways to skip, chosen per step:

* **sync-free** (fused optimizers, ``fused=True``): set the optimizer's ``found_inf`` to the
  device flag, as ``GradScaler`` does; the fused kernel then leaves the parameters and the
  optimizer state untouched. A flag the scaler already set is combined with ours (max),
  never overwritten, and the attribute is restored after the step, or on any later path
  (a step that raised, detach, close).
* **one host read** (every other optimizer, and a fused one whose kernel would create
  state it never fills when skipping: fused SGD's momentum buffer, allocated with
  ``empty_like`` on its first step): read the combined flag once (the step's single sync,
  as ``GradScaler`` and Megatron do) and, to skip, set every gradient to ``None``: torch
  optimizers then leave those parameters and their state alone. ``GradScaler`` instead
  never calls ``step()``; gradguard runs inside ``step()`` and cannot cancel it, so "no
  gradient" is the one signal every torch optimizer honours.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["FoundInfPatch", "StepDecision", "fused", "fused_skip_is_safe"]


@dataclass(frozen=True)
class StepDecision:
    """What the guard decided for one optimizer step.

    ``skip`` is True/False when the decision was read on the host this step, ``None`` when
    it stayed on the device (observe-only, or a sync-free fused skip). ``skip_flag`` is the
    device flag (1.0 = skip) when a skip policy is on, for adapters that hand it to the
    optimizer themselves (``before_step(apply_skip=False)``).
    """

    step: int
    skip: bool | None = None
    skip_flag: torch.Tensor | None = None


def fused(optimizer: torch.optim.Optimizer) -> bool:
    """A fused torch optimizer: its kernel reads ``found_inf``/``grad_scale``."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False))


# Fused optimizers whose kernel creates, or finds zero-initialised, every piece of state
# before it looks at found_inf (checked on torch 2.13: Adam, AdamW; Adagrad's state sum
# exists from construction).
_SAFE_FUSED = ("Adam", "AdamW", "Adagrad")


def fused_skip_is_safe(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``found_inf=1`` leaves this fused optimizer exactly as it was.

    Fused SGD with momentum allocates its momentum buffer with ``empty_like`` on the first
    step and does not fill it when skipping: uninitialised memory that later steps read. So
    SGD is safe only once every parameter with a gradient has its buffer (or without
    momentum); unknown fused optimizers only when every such parameter has state.
    """
    name = type(optimizer).__name__
    if name in _SAFE_FUSED:
        return True
    for group in optimizer.param_groups:
        needs_buffer = name != "SGD" or group.get("momentum", 0) != 0
        if not needs_buffer:
            continue
        for param in group["params"]:
            if param.grad is None:
                continue
            state = optimizer.state.get(param)
            if not state or (name == "SGD" and state.get("momentum_buffer") is None):
                return False
    return True


class FoundInfPatch:
    """Sets ``optimizer.found_inf`` for one step and puts back what was there before."""

    def __init__(self) -> None:
        self._saved: tuple[torch.optim.Optimizer, bool, Any] | None = None

    @property
    def active(self) -> bool:
        return self._saved is not None

    def apply(self, optimizer: torch.optim.Optimizer, flag: torch.Tensor) -> None:
        """Make the fused kernel skip when ``flag`` (a device float, 1 = skip) is set."""
        self.restore()
        had = "found_inf" in optimizer.__dict__
        previous = optimizer.__dict__.get("found_inf")
        self._saved = (optimizer, had, previous)
        value = flag.float()
        if isinstance(previous, torch.Tensor):
            # A GradScaler set it for this step: keep its overflow, add our skip.
            value = torch.maximum(previous.to(value.device, value.dtype), value).to(previous.device)
        optimizer.found_inf = value  # type: ignore[attr-defined]

    def restore(self) -> None:
        """Undo ``apply`` (idempotent). Called after the step and on every other exit."""
        if self._saved is None:
            return
        optimizer, had, previous = self._saved
        self._saved = None
        if had:
            optimizer.found_inf = previous  # type: ignore[attr-defined]
        else:
            optimizer.__dict__.pop("found_inf", None)
