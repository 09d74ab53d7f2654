"""gradguard's metrics in a Hugging Face Trainer's ``logs``, for every ``report_to`` backend.

The Trainer hands each training log to its callbacks in list order: ``DefaultFlowCallback``,
the reporting callbacks (``report_to``: TensorBoard, W&B, MLflow...), then the user's, then
the console printer. A metric a user's callback adds in ``on_log`` comes too late for the
reporters. So ``TrainerLogs`` is a sink that keeps the latest logging step's metrics, and
two small helper callbacks sit around the reporters: the first adds the metrics to the log
the reporters are about to read, the second takes them out again (the console line stays
the Trainer's own; hundreds of per-layer keys have no place there).

Callbacks are never handed the Trainer nor its callback list; the list is found through
the caller (``CallbackHandler.call_event``), a few frames up.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from types import FrameType
from typing import TYPE_CHECKING, Any

import gradguard as gg

__all__ = ["TrainerLogs", "logging_interval", "trainer_logs_after"]

if TYPE_CHECKING:
    from transformers import TrainerCallback as _CallbackBase
else:
    try:
        from transformers import TrainerCallback as _CallbackBase
    except ImportError:  # GradGuardCallback says what to install
        _CallbackBase = object

_STEPS = ("steps", "IntervalStrategy.STEPS")


def trainer_logs_after(args: Any, state: Any) -> bool:
    """Whether the Trainer logs after this optimizer step (``DefaultFlowCallback``'s rule;
    ``state.global_step`` is not incremented yet)."""
    step = state.global_step + 1
    if step == 1 and getattr(args, "logging_first_step", False):
        return True
    every = int(getattr(state, "logging_steps", 0) or 0)
    by_steps = str(getattr(args, "logging_strategy", "")) in _STEPS
    return by_steps and every > 0 and step % every == 0


def logging_interval(args: Any, state: Any, fallback: int) -> int:
    """The Trainer's logging interval in optimizer steps (``fallback`` when it logs by epoch)."""
    if str(getattr(args, "logging_strategy", "")) in _STEPS:
        return max(int(getattr(state, "logging_steps", 0) or 0), 1)
    return fallback


class TrainerLogs:
    """A sink that keeps the latest logging step's metrics (and Event counts) until the
    Trainer's training log at that step takes them."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.step: int | None = None
        self.scalars: dict[str, float] = {}
        self.event_counts: dict[str, int] = {}
        self.helpers = (_LogsHelper(self, add=True), _LogsHelper(self, add=False))

    # ------------------------------------------------------------------ the sink
    def log_scalars(self, scalars: Mapping[str, float], step: int) -> None:
        self.step, self.scalars = step, {k: float(v) for k, v in scalars.items()}

    def log_event(self, event: gg.Event) -> None:
        self.event_counts[event.kind] = self.event_counts.get(event.kind, 0) + 1

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass

    # ------------------------------------------------------------------ the logs
    def add_to(self, step: int, logs: dict[str, Any]) -> None:
        if "loss" not in logs:  # an evaluation or the end-of-training summary
            return
        if self.step == step:  # published for this step: taken once
            logs.update(self.scalars)
            self.step, self.scalars = None, {}
        for kind, count in self.event_counts.items():
            logs[f"{self.prefix}/events/{kind}"] = float(count)

    def remove_from(self, logs: dict[str, Any]) -> None:
        head = self.prefix + "/"
        for key in [k for k in logs if isinstance(k, str) and k.startswith(head)]:
            del logs[key]

    def place(self, callback: Any) -> bool:
        """Put the helpers around the reporting callbacks of the Trainer that is calling
        ``callback`` now; False when its callback list cannot be found."""
        handler = _calling_handler(callback)
        if handler is None:
            return False
        from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

        reporters = tuple(INTEGRATION_TO_CALLBACK.values())
        callbacks = [c for c in handler.callbacks if all(c is not h for h in self.helpers)]
        found = [i for i, c in enumerate(callbacks) if isinstance(c, reporters)]
        if found:
            first, last = found[0], found[-1] + 1
            add, remove = self.helpers
            callbacks = [*callbacks[:first], add, *callbacks[first:last], remove, *callbacks[last:]]
        # A new list, not an edit of the one the handler may be iterating over right now.
        handler.callbacks = callbacks
        return True


class _LogsHelper(_CallbackBase):
    """Adds gradguard's metrics to a training log (``add=True``) or takes them out."""

    def __init__(self, logs: TrainerLogs, *, add: bool) -> None:
        self.logs, self.add = logs, add

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any
    ) -> None:
        if logs is None:
            return
        if self.add:
            self.logs.add_to(state.global_step, logs)
        else:
            self.logs.remove_from(logs)

    def __repr__(self) -> str:
        return f"GradGuardLogs({'add' if self.add else 'remove'})"


def _calling_handler(callback: Any) -> Any:
    """The Trainer's ``CallbackHandler`` that is calling ``callback`` right now."""
    from transformers.trainer_callback import CallbackHandler

    frame: FrameType | None = sys._getframe(1)
    for _ in range(8):
        if frame is None:
            return None
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, CallbackHandler) and any(
            c is callback for c in candidate.callbacks
        ):
            return candidate
        frame = frame.f_back
    return None
