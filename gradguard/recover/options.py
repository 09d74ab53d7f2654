"""``gg.Recover``: the recovery ladder's settings, checked at construction."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .._errors import ConfigurationError, check_choice, check_number, check_positive_int

__all__ = ["ExhaustedPolicy", "Recover"]

ExhaustedPolicy = Literal["raise", "warn"]


@dataclass(frozen=True, init=False)
class Recover:
    """Turn instability into recovery instead of a dead run: ``on_instability=gg.Recover()``.

    The ladder, one rung at a time (each action is a ``recovery`` Event with its numbers):

    1. **skip** a step whose gradient is NaN/Inf or spikes (``on_nonfinite`` and
       ``on_spike`` behave as ``"skip"``): the weights and the optimizer state stay as
       they were.
    2. after ``skip_budget`` incidents (skipped steps, and loss spikes or a diverging loss
       when the loss is handed over with ``guard.observe_loss``; a steady rise counts once
       per ``window // skip_budget`` steps) within ``window`` steps,
       **lower the learning rate** of every param group by ``lr_factor`` and bring it back
       linearly over ``lr_recovery_steps`` steps. The factor multiplies ``group["lr"]``
       around the optimizer step only (your scheduler's values are put back, unchanged,
       right after the step), so it composes with any LR scheduler. ``lr_factor=1.0``
       leaves this rung out.
    3. if the budget runs out again, **roll back** the model and the optimizer state to the
       last healthy in-memory (CPU) snapshot, taken every ``snapshot_every`` steps, and drop
       the update of the step that rolls back plus the next ``skip_after_rollback`` steps.
       The learning rate then restarts at ``lr_factor ** (rollbacks + 1)`` and ramps back.
    4. after ``max_rollbacks`` rollbacks in one incident (the count starts over once the
       learning rate is back at 100% and ``window`` steps passed without an incident):
       ``on_exhausted="raise"`` raises ``GradientAlarmError`` with the history,
       ``"warn"`` reports it and keeps training with skips and LR back-off only.
    """

    skip_budget: int
    window: int
    lr_factor: float
    lr_recovery_steps: int
    snapshot_every: int
    max_rollbacks: int
    skip_after_rollback: int
    on_exhausted: ExhaustedPolicy
    loss_triggers: bool

    def __init__(
        self,
        *,
        skip_budget: int = 3,
        window: int = 100,
        lr_factor: float = 0.5,
        lr_recovery_steps: int = 200,
        snapshot_every: int = 100,
        max_rollbacks: int = 2,
        skip_after_rollback: int = 0,
        on_exhausted: ExhaustedPolicy = "raise",
        loss_triggers: bool = True,
    ) -> None:
        set_ = object.__setattr__
        set_(self, "skip_budget", check_positive_int("skip_budget", skip_budget))
        set_(self, "window", check_positive_int("window", window))
        if self.window < self.skip_budget:
            raise ConfigurationError.bad_value(
                "window", window, f"expected an integer >= skip_budget={self.skip_budget}"
            )
        set_(
            self,
            "lr_factor",
            check_number("lr_factor", lr_factor, low=0.0, high=1.0, low_open=True),
        )
        set_(self, "lr_recovery_steps", check_positive_int("lr_recovery_steps", lr_recovery_steps))
        set_(self, "snapshot_every", check_positive_int("snapshot_every", snapshot_every))
        set_(
            self,
            "max_rollbacks",
            check_positive_int("max_rollbacks", max_rollbacks, allow_zero=True),
        )
        set_(
            self,
            "skip_after_rollback",
            check_positive_int("skip_after_rollback", skip_after_rollback, allow_zero=True),
        )
        check_choice("on_exhausted", on_exhausted, ("raise", "warn"))
        set_(self, "on_exhausted", on_exhausted)
        if not isinstance(loss_triggers, bool):
            raise ConfigurationError.bad_value(
                "loss_triggers", loss_triggers, "expected True or False"
            )
        set_(self, "loss_triggers", loss_triggers)

    def __repr__(self) -> str:
        return (
            f"Recover(skip_budget={self.skip_budget}, window={self.window}, "
            f"lr_factor={self.lr_factor}, lr_recovery_steps={self.lr_recovery_steps}, "
            f"snapshot_every={self.snapshot_every}, max_rollbacks={self.max_rollbacks}, "
            f"skip_after_rollback={self.skip_after_rollback}, "
            f"on_exhausted={self.on_exhausted!r}, loss_triggers={self.loss_triggers})"
        )
