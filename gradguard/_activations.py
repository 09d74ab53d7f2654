"""Activation health: dead ReLU units and saturated sigmoid/tanh units (sampled)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ._errors import check_positive_int
from ._events import Event
from ._layers import LayerLayout

__all__ = ["ActivationMonitor"]


class ActivationMonitor:
    """Samples a window of training forward passes every ``every_n_steps`` optimizer steps.

    (Interface placeholder: the detection is being built in the activation-health issue.)
    """

    def __init__(self, every_n_steps: int = 100, window: int = 4) -> None:
        self.every_n_steps = check_positive_int("every_n_steps", every_n_steps)
        self.window = check_positive_int("window", window)

    def bind(self, model: nn.Module, layout: LayerLayout) -> None:
        self._model = model

    def unbind(self) -> None:
        pass

    def on_step_end(self, next_step: int) -> None:
        pass

    def metrics(self) -> dict[str, torch.Tensor]:
        return {}

    def check(self, view: Any) -> list[Event]:
        return []

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
