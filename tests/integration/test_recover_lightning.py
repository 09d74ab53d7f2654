"""The recovery ladder through the Lightning callback: a real CPU Trainer, NaN batches, a
rollback, and the same weights as a Trainer run that never trained on the undone batches."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from gradguard.integrations.lightning import GradGuardCallback
from torch.nn import functional as F

import gradguard as gg
from tests.integration.lightning_kit import DigitsModule, digits_loader, params_of, trainer

BAD = {4, 5, 6}
UNDONE = {2, 3, 4, 5, 6, 7}  # rolled back to step 2's snapshot; step 7 rolls back


class ScriptedModule(DigitsModule):
    """NaN loss on the batches in ``nan``; no loss at all on those in ``absent`` (Lightning
    still calls ``optimizer.step`` and counts the step, but no parameter has a gradient,
    so nothing moves: the batch is as good as never seen)."""

    def __init__(self, *, nan: set[int], absent: set[int], fused: bool) -> None:
        super().__init__(fused=fused)
        self.nan, self.absent = nan, absent

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        if batch_idx in self.absent:
            return None
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        return loss * float("nan") if batch_idx in self.nan else loss


@pytest.mark.parametrize("fused", [False, True])
def test_callback_rolls_back_and_matches_a_run_without_the_undone_batches(
    tmp_path: Path, fused: bool
) -> None:
    recover = gg.Recover(skip_budget=3, window=5, lr_factor=1.0, snapshot_every=2)
    callback = GradGuardCallback(on_instability=recover, activations=False, on_spike="ignore")
    module = ScriptedModule(nan=BAD, absent=set(), fused=fused)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(tmp_path / "guarded", max_steps=12, callbacks=[callback]).fit(
            module, digits_loader()
        )
    guard = callback.guard
    assert guard is not None
    recovery = [e for e in guard.events if e.kind == "recovery"]
    assert (recovery[0].step, recovery[0].details["action"]) == (7, "rollback")
    assert recovery[0].details["snapshot_step"] == 2
    reference = ScriptedModule(nan=set(), absent=UNDONE, fused=fused)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(tmp_path / "reference", max_steps=12).fit(reference, digits_loader())
    got, want = params_of(module), params_of(reference)
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in got)
