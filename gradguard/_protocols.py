"""The interfaces between the pipeline and its host-side parts (detectors, activation monitor)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from ._events import Event
from ._layers import LayerLayout

__all__ = ["Detector", "HostView", "Monitor"]


@dataclass
class HostView:
    """What host-side detectors see on a logging step (plain Python numbers).

    ``layers`` and the per-layer lists are in depth order, input first. ``present`` marks the
    layers that had a gradient this step. ``scalars`` holds every metric under its full key.
    """

    step: int
    layers: list[str]
    grad_norm: list[float]
    present: list[bool]
    total: float
    param_norm: list[float] | None
    update_ratio: list[float] | None
    scalars: dict[str, float] = field(default_factory=dict)
    prefix: str = "gradguard"


class Detector(Protocol):
    """A host-side detector run on logging steps over statistics already copied to the host."""

    def check(self, view: HostView) -> list[Event]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Monitor(Protocol):
    """The activation monitor's side of the pipeline (see ``ActivationMonitor``)."""

    def bind(self, model: nn.Module, layout: LayerLayout) -> None: ...

    def unbind(self) -> None: ...

    def on_step_end(self, next_step: int) -> None: ...

    def metrics(self) -> dict[str, torch.Tensor]: ...

    def check(self, view: HostView) -> list[Event]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...
