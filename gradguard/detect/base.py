"""The one interface every detector implements, and what it is bound to.

A detector watches typed statistics and returns ``Finding``s; the guard's ``Debouncer``
decides which findings become Events. Two moments to look:

* ``on_step(stats)``: every optimizer step, with a ``StepStats`` read from the per-step
  packet (at most one step late on an accelerator, so never a host sync); a detector whose
  evidence spans many steps (a trend, a growth over 100 steps) sets ``batched = True`` and
  receives its steps in order, in batches of up to ``BATCH_STEPS``: Python run once per
  step between the step's kernels is several times slower than the same code in a loop;
* ``on_log(stats)``: every logging step, with the full ``LoggedStats``.

A detector that needs device work of its own (the activation monitor's forward hooks)
uses ``on_step_end`` to schedule it and ``metrics`` to hand device tensors to the logging
step's single bulk copy. To write your own::

    class LossOfSignal(gg.Detector):
        '''The total gradient norm fell below ``floor``: nothing is being learnt.'''

        kinds = ("no_signal",)

        def __init__(self, floor: float = 1e-8) -> None:
            self.floor = floor

        def on_log(self, stats: gg.LoggedStats) -> list[gg.Finding]:
            if stats.total >= self.floor:
                return []
            return [gg.Finding(kind="no_signal", layers=(), value=stats.total,
                               message=f"The gradient norm is {stats.total:.1e}.",
                               advice="check that the loss depends on the parameters")]

    guard = gg.attach(model, opt, detectors=[*gg.default_detectors(), LossOfSignal()])
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from .._debounce import Finding
from .._layers import LayerLayout
from .._owned import OwnedByOneGuard
from .._stats import LoggedStats, StepStats

if TYPE_CHECKING:
    from ..clip.base import ClipStrategy

__all__ = ["BATCH_STEPS", "Detector", "GuardContext"]

# The largest batch a ``batched`` detector receives at once.
BATCH_STEPS = 8


def same_step(step: int) -> int:
    """Guard step -> the step the user sees, when no adapter maps them: the same step."""
    return step


@dataclass(frozen=True)
class GuardContext:
    """What a detector learns when it is bound: the model, its layers and the guard's
    configuration (so that advice never recommends what is already on)."""

    model: nn.Module
    layout: LayerLayout
    device: torch.device
    log_every_n_steps: int
    repeat_every: int
    on_nonfinite: str
    on_spike: str
    clip: ClipStrategy | None
    compiled: bool = False
    shown_step: Callable[[int], int] = field(default=same_step)
    """Guard step -> the step the user sees (the sinks' step, e.g. the Trainer's global
    step): use it for steps quoted in messages."""

    @property
    def clipping(self) -> str | None:
        """The clip strategy's class name, or None when gradguard does not clip."""
        return type(self.clip).__name__ if self.clip is not None else None


class Detector(OwnedByOneGuard):
    """Base of every detector: bind, look at typed statistics, return findings, keep state.

    ``kinds`` lists the Event kinds it may report. Every method has a do-nothing default,
    so a detector overrides only what it uses.
    """

    kinds: ClassVar[tuple[str, ...]] = ()
    # True: ``on_step`` may see each step up to BATCH_STEPS steps late, in a batch (every
    # step, in order; at once on a NaN/Inf or skipped step, a logging step, a state_dict,
    # a report and detach). For evidence that builds over many steps; cheaper per step.
    batched: ClassVar[bool] = False
    context: GuardContext | None = None
    _role = "detector"

    def bind(self, context: GuardContext) -> None:
        """Called at attach and whenever the watched layers change."""
        self.context = context

    def unbind(self) -> None:
        """Called at detach: drop hooks and references to the model."""
        self.context = None

    def every_step(self) -> bool:
        """Whether ``on_step`` and ``on_step_end`` have work for this instance (asked once,
        when the guard is built: it calls neither when not). By default, whether the class
        overrides them; a detector whose options leave them idle says False."""
        cls = type(self)
        return cls.on_step is not Detector.on_step or cls.on_step_end is not Detector.on_step_end

    def on_step(self, stats: StepStats) -> list[Finding]:
        """Every optimizer step (host values, at most one step late)."""
        del stats
        return []

    def on_log(self, stats: LoggedStats) -> list[Finding]:
        """Every logging step."""
        del stats
        return []

    def on_step_end(self, next_step: int) -> None:
        """After every optimizer step (and at attach) with the number of the next step."""
        del next_step

    def metrics(self) -> Mapping[str, float | torch.Tensor]:
        """Metrics for the next logging step, by metric name: host numbers, or device
        tensors (0-d, or one value per layer with NaN for "not measured") that join the
        logging step's single bulk copy."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """What the detector has learnt so far (running means, windows, counters), as
        plain values that ``torch.save`` stores and ``torch.load(weights_only=True)`` reads:
        it becomes part of ``guard.state_dict()``. The default keeps nothing."""
        return {}

    def check_state(self, state: Mapping[str, Any]) -> None:
        """Raise ``ConfigurationError`` if ``state`` cannot be loaded (checked before any
        part of a guard's state is applied, so a bad state changes nothing)."""
        del state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what ``state_dict`` returned (after ``check_state`` accepted it), so a
        resumed run carries on where it stopped instead of warming up again."""
        del state

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
