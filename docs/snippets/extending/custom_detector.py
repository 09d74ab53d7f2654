"""A Detector of your own: the gradient vanished entirely for `patience` steps in a row.

Run it: python docs/snippets/extending/custom_detector.py
"""

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

import gradguard as gg


class NoSignal(gg.Detector):
    """The total gradient norm stayed below ``floor`` for ``patience`` steps in a row."""

    kinds = ("no_signal",)  # a kind of its own; the built-in ones are in gg.EVENT_KINDS

    def __init__(self, floor: float = 1e-8, patience: int = 3) -> None:
        self.floor = floor
        self.patience = patience
        self.quiet = 0  # steps in a row below the floor: state worth checkpointing

    def on_step(self, stats: gg.StepStats) -> list[gg.Finding]:
        # Every optimizer step, host values: no device work, no sync.
        self.quiet = self.quiet + 1 if stats.total < self.floor else 0
        if self.quiet < self.patience:
            return []
        return [
            gg.Finding(
                kind="no_signal",
                layers=(),
                value=stats.total,
                message=f"The gradient norm has been {stats.total:.1e} for {self.quiet} steps.",
                advice="check that the loss depends on the parameters (a detach? a constant?)",
            )
        ]

    def state_dict(self) -> dict[str, Any]:
        return {"quiet": self.quiet}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.quiet = int(state["quiet"])


model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
guard = gg.attach(model, opt, detectors=[*gg.default_detectors(), NoSignal()], warn=False)
for _ in range(10):
    loss = model(torch.randn(16, 4)).sum() * 0.0  # a bug: the loss ignores the model
    opt.zero_grad()
    loss.backward()
    opt.step()
guard.detach()

kinds = [event.kind for event in guard.events]
print(kinds)
print(guard.events[0])
assert kinds == ["no_signal"], kinds  # one Event: the guard's debouncer folds the rest
