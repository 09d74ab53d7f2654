"""Feed recorded per-step values (loss, total gradient norm) to host-side detectors, as the
guard would from its step packets: how the stability detectors are tested on exact series."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

import gradguard as gg
from gradguard._layers import discover_layers
from gradguard.detect.base import GuardContext

__all__ = ["context", "replay"]


def context(*, on_spike: str = "warn", clip: gg.ClipStrategy | None = None) -> GuardContext:
    """A real binding context for a one-layer model (the detectors need one to report)."""
    model = nn.Linear(1, 1)
    layout = discover_layers(model, torch.optim.SGD(model.parameters(), lr=0.1))
    return GuardContext(
        model=model,
        layout=layout,
        device=torch.device("cpu"),
        log_every_n_steps=10,
        repeat_every=100,
        on_nonfinite="warn",
        on_spike=on_spike,
        clip=clip,
    )


def replay(
    detectors: Sequence[gg.Detector],
    losses: Sequence[float | None],
    norms: Sequence[float],
) -> list[tuple[int, gg.Finding]]:
    """Every finding, with its step, from one ``StepStats`` per (loss, norm) pair."""
    bound = context()
    for detector in detectors:
        detector.bind(bound)
    found = []
    for step, (loss, norm) in enumerate(zip(losses, norms)):
        values = {} if loss is None else {"loss": float(loss)}
        stats = gg.StepStats(
            step, ("0",), norm, (norm,), (True,), not math.isfinite(norm), False, values
        )
        for detector in detectors:
            found += [(step, finding) for finding in detector.on_step(stats)]
    return found
