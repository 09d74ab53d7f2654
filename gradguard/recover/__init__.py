"""The recovery ladder (off by default): skip, lower the learning rate, roll back.

``gg.attach(model, optimizer, on_instability=gg.Recover())``; see ``Recover``.
"""

from __future__ import annotations

from .ladder import LOSS_TRIGGERS, RecoveryLadder, StepPlan
from .options import ExhaustedPolicy, Recover
from .snapshot import LrScale, Snapshot

__all__ = [
    "LOSS_TRIGGERS",
    "ExhaustedPolicy",
    "LrScale",
    "Recover",
    "RecoveryLadder",
    "Snapshot",
    "StepPlan",
]
