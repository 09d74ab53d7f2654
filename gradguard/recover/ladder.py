"""The recovery ladder's state machine: incidents in, actions out, one step later.

Timing, the same on every device and every rank: the host learns what happened at step
``s`` (skipped or not, the host detectors' loss findings) from the step's packet; with the
ladder on, the guard waits for the previous step's packet at the start of each step (it is
normally there already), so an incident at step ``s`` is always acted on at step ``s + 1``,
before that step's update. The snapshot of step ``s`` (taken before its update) becomes
the one to roll back to only once step ``s`` itself proved healthy: its gradients and its
loss were computed from exactly those weights.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .._debounce import Finding
from .._errors import GradientAlarmError
from .._stats import (
    RECOVERY_INCIDENTS,
    RECOVERY_LR_BACKOFFS,
    RECOVERY_LR_FACTOR,
    RECOVERY_ROLLBACKS,
)
from ..clip.base import ClipStrategy
from ..report.recovery_advice import recovery_text
from .options import Recover
from .snapshot import LrScale, Snapshot
from .state import check_ladder_state

__all__ = ["LOSS_TRIGGERS", "RecoveryLadder", "StepPlan"]

# Host findings that count as incidents when the loss is handed over.
LOSS_TRIGGERS = ("loss_spike", "divergence")
_HISTORY = 100
_INTS = (
    "rung",
    "rollbacks_in_incident",
    "rollbacks",
    "lr_backoffs",
    "skip_until",
    "lr_since",
    "last_incident",
    "last_divergence",
)


@dataclass
class StepPlan:
    """What the ladder wants for one step: drop its update, the LR factor, what to say,
    and an alarm to raise instead of stepping."""

    skip: bool = False
    lr_factor: float = 1.0
    findings: list[Finding] = field(default_factory=list)
    alarm: GradientAlarmError | None = None


class RecoveryLadder:
    """Runs ``Recover``'s rungs for one guard (see ``gg.Recover``)."""

    def __init__(self, options: Recover) -> None:
        self.options = options
        self.shown_step: Callable[[int], int] = lambda step: step  # set by the guard
        self.lr = LrScale()
        self.use_loss = options.loss_triggers
        self.snapshot: Snapshot | None = None
        self._candidate: Snapshot | None = None
        self._incidents: deque[tuple[int, str]] = deque()
        self._pending: dict[str, Any] = {}
        self._rung = 0  # 0: skipping only; 1: the LR rung has been used in this incident
        self._rollbacks_in_incident = 0
        self._rollbacks = 0
        self._lr_backoffs = 0
        self._exhausted = False
        self._skip_until = 0
        self._lr_low = 1.0
        self._lr_since = -1  # the step the LR ramp started; -1: no ramp
        self._last_incident = -1  # -1: none yet
        self._last_divergence = -1  # the last step a divergence finding counted
        self._factor = 1.0
        self.history: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ attach / detach
    def bind(self, *, world_size: int) -> None:
        # The loss is per rank under DDP; gradients (and so skips) are the same on every
        # rank. Loss findings would make ranks act apart: they trigger only in one process.
        self.use_loss = self.options.loss_triggers and world_size <= 1

    def release(self) -> None:
        """Detach: the learning rate goes back, the snapshots are let go (they hold the
        model's state; a later attach takes new ones)."""
        self.lr.restore()
        self.snapshot = None
        self._candidate = None

    def forget_snapshots(self) -> None:
        """The watched parameters changed: an old snapshot no longer fits them."""
        self.snapshot = None
        self._candidate = None

    # ------------------------------------------------------------------ per step
    def observe(self, step: int, *, skipped: bool, triggers: Sequence[str]) -> None:
        """What the host learnt about ``step`` (from its packet)."""
        reasons = ["skip"] if skipped else []
        if self.use_loss:
            reasons += [kind for kind in triggers if kind in LOSS_TRIGGERS]
        if "divergence" in reasons:
            # A steady rise is reported step after step while it lasts: it counts once per
            # window // skip_budget steps, so a rise that fills a whole window spends the
            # budget once, and the LR rung gets time to act before the next one.
            spacing = max(1, self.options.window // self.options.skip_budget)
            if self._last_divergence >= 0 and step - self._last_divergence < spacing:
                reasons.remove("divergence")
            else:
                self._last_divergence = step
        candidate = self._candidate
        if candidate is not None and candidate.step == step:
            self._candidate = None
            if not reasons:
                self.snapshot = candidate  # its own step proved it healthy
        if reasons:
            self._last_incident = step
            self._incidents.append((step, reasons[0]))
        window = self.options.window
        while self._incidents and self._incidents[0][0] <= step - window:
            self._incidents.popleft()
        if reasons and len(self._incidents) >= self.options.skip_budget and not self._pending:
            self._pending = {
                "count": len(self._incidents),
                "reasons": sorted({reason for _, reason in self._incidents}),
                "step": step,
            }
            self._incidents.clear()

    def begin_step(
        self,
        step: int,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        clip: ClipStrategy | None,
    ) -> StepPlan:
        """Apply what the last step decided; say whether this step's update is dropped and
        which LR factor it gets; take a snapshot when one is due."""
        plan = StepPlan()
        if self._pending:
            pending, self._pending = self._pending, {}
            self._escalate(step, pending, model, optimizer, clip, plan)
            if plan.alarm is not None:
                return plan
        elif self._recovered(step):
            self._rung, self._rollbacks_in_incident, self._exhausted = 0, 0, False
            plan.findings.append(self._finding("recovered", step, 0, []))
        plan.skip = step < self._skip_until
        plan.lr_factor = self._factor = self._lr_factor(step)
        if not plan.skip and self._snapshot_due(step):
            self._candidate = Snapshot.take(step, model, optimizer, clip)
        return plan

    def _snapshot_due(self, step: int) -> bool:
        every = self.options.snapshot_every
        if step % every:
            return False
        # Only after healthy steps: none of the last ``snapshot_every`` had an incident.
        return self._last_incident < 0 or step - self._last_incident > every

    def _recovered(self, step: int) -> bool:
        engaged = self._rung or self._rollbacks_in_incident or self._exhausted
        quiet = self._last_incident < 0 or step - self._last_incident > self.options.window
        return bool(engaged) and self._lr_since < 0 and quiet and step >= self._skip_until

    def _lr_factor(self, step: int) -> float:
        if self._lr_since < 0:
            return 1.0
        elapsed = step - self._lr_since
        if elapsed >= self.options.lr_recovery_steps:
            self._lr_since, self._lr_low = -1, 1.0
            return 1.0
        low = self._lr_low
        return low + (1.0 - low) * elapsed / self.options.lr_recovery_steps

    def _start_ramp(self, step: int, low: float) -> None:
        if low < 1.0:
            self._lr_low, self._lr_since = low, step

    def _escalate(
        self,
        step: int,
        pending: Mapping[str, Any],
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        clip: ClipStrategy | None,
        plan: StepPlan,
    ) -> None:
        options = self.options
        count, reasons = int(pending["count"]), list(pending["reasons"])
        if self._rung == 0 and options.lr_factor < 1.0:
            self._rung = 1
            self._lr_backoffs += 1
            self._start_ramp(step, options.lr_factor)
            plan.findings.append(self._finding("lr_backoff", step, count, reasons))
            return
        self._rung = 1
        why = ""
        if self._exhausted:
            # Already reported (and, with "raise", never reached): keep skipping and start
            # the LR ramp again from its lowest point, without repeating the Event.
            self._start_ramp(step, options.lr_factor ** (self._rollbacks_in_incident + 1))
            self.history.append({"action": "lr_backoff", "step": step, "lr_factor": self._lr_low})
            del self.history[:-_HISTORY]
            return
        if self._rollbacks_in_incident >= options.max_rollbacks:
            why = f"{options.max_rollbacks} rollback(s) did not stabilise training"
        elif self.snapshot is None:
            why = "there is no healthy snapshot to roll back to yet"
        else:
            try:
                self.snapshot.restore(model, optimizer, clip)
            except (RuntimeError, ValueError, KeyError) as error:
                # The model or the optimizer changed since the snapshot (checked before
                # anything was restored), or restoring failed: it no longer fits.
                self.snapshot = None
                why = f"the snapshot no longer fits the model and optimizer ({error})"
        if why:
            self._exhausted = True
            self._start_ramp(step, options.lr_factor ** (self._rollbacks_in_incident + 1))
            finding = self._finding("exhausted", step, count, reasons, why=why)
            plan.findings.append(finding)
            if options.on_exhausted == "raise":
                lines = "; ".join(_history_line(entry) for entry in self.history)
                plan.alarm = GradientAlarmError(
                    f"step {step}: {finding.message} History: {lines}. Try: {finding.advice}",
                    step=step,
                    layers=(),
                )
            return
        assert self.snapshot is not None
        self._candidate = None
        self._rollbacks_in_incident += 1
        self._rollbacks += 1
        self._skip_until = step + 1 + options.skip_after_rollback
        self._start_ramp(step, options.lr_factor ** (self._rollbacks_in_incident + 1))
        plan.findings.append(self._finding("rollback", step, count, reasons))

    def _finding(
        self, action: str, step: int, count: int, reasons: list[str], *, why: str = ""
    ) -> Finding:
        options = self.options
        factor = self._lr_low if self._lr_since == step else self._lr_factor(step)
        snapshot_step = self.shown_step(self.snapshot.step) if self.snapshot is not None else -1
        message, advice = recovery_text(
            action,
            step=step,
            count=count,
            window=options.window,
            reasons=reasons,
            lr_factor=factor,
            lr_recovery_steps=options.lr_recovery_steps,
            snapshot_step=snapshot_step,
            rollbacks=self._rollbacks_in_incident,
            max_rollbacks=options.max_rollbacks,
            skip_after_rollback=options.skip_after_rollback,
            why=why,
        )
        details: dict[str, Any] = {
            "action": action,
            "step": step,
            "lr_factor": factor,
            "snapshot_step": snapshot_step,
            "skips_in_window": count,
            "reasons": list(reasons),
            "rollbacks": self._rollbacks,
        }
        self.history.append(dict(details))
        del self.history[:-_HISTORY]
        return Finding(
            kind="recovery",
            layers=(),
            value=factor if action != "rollback" else float(snapshot_step),
            message=message,
            advice=advice,
            severity="error" if action == "exhausted" else "warning",
            details=details,
            max_gap=0,  # every action is news: never folded into an earlier one
            remind_every=1,
            counted="recovery actions",
        )

    # ------------------------------------------------------------------ readout
    def metrics(self) -> dict[str, float]:
        return {
            RECOVERY_LR_FACTOR: self._factor,
            RECOVERY_ROLLBACKS: float(self._rollbacks),
            RECOVERY_LR_BACKOFFS: float(self._lr_backoffs),
            RECOVERY_INCIDENTS: float(len(self._incidents)),
        }

    @property
    def rollbacks(self) -> int:
        return self._rollbacks

    @property
    def lr_factor(self) -> float:
        """The factor applied to the learning rate at the last step."""
        return self._factor

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The ladder's own state (snapshots are not saved: they live in memory only)."""
        return {
            "rung": self._rung,
            "rollbacks_in_incident": self._rollbacks_in_incident,
            "rollbacks": self._rollbacks,
            "lr_backoffs": self._lr_backoffs,
            "exhausted": self._exhausted,
            "skip_until": self._skip_until,
            "lr_low": self._lr_low,
            "lr_since": self._lr_since,
            "last_incident": self._last_incident,
            "last_divergence": self._last_divergence,
            "factor": self._factor,
            "incidents": [[s, r] for s, r in self._incidents],
            "pending": dict(self._pending),
            "history": [dict(entry) for entry in self.history],
        }

    def check_state(self, state: Mapping[str, Any]) -> None:
        check_ladder_state(state, _INTS)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.check_state(state)
        self._rung = int(state.get("rung", 0))
        self._rollbacks_in_incident = int(state.get("rollbacks_in_incident", 0))
        self._rollbacks = int(state.get("rollbacks", 0))
        self._lr_backoffs = int(state.get("lr_backoffs", 0))
        self._exhausted = bool(state.get("exhausted", False))
        self._skip_until = int(state.get("skip_until", 0))
        self._lr_low = float(state.get("lr_low", 1.0))
        self._lr_since = int(state.get("lr_since", -1))
        self._last_incident = int(state.get("last_incident", -1))
        self._last_divergence = int(state.get("last_divergence", -1))
        self._factor = float(state.get("factor", 1.0))
        self._incidents = deque((int(s), str(r)) for s, r in state.get("incidents", []))
        pending = state.get("pending", {})
        self._pending = (
            {
                "count": int(pending["count"]),
                "reasons": [str(r) for r in pending["reasons"]],
                "step": int(pending["step"]),
            }
            if pending
            else {}
        )
        self.history = [dict(entry) for entry in state.get("history", [])][-_HISTORY:]


def _history_line(entry: Mapping[str, Any]) -> str:
    factor = entry.get("lr_factor", 1.0)
    text = f"step {entry.get('step')}: {entry.get('action')}"
    if isinstance(factor, float) and not math.isclose(factor, 1.0):
        text += f" (lr x{factor:.3g})"
    return text
