"""The recovery ladder through the Hugging Face callback: a real CPU Trainer with its own
LR scheduler, NaN steps, a rollback, and the scheduler's learning rate left as it set it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from gradguard.integrations.transformers import GradGuardCallback

import gradguard as gg
from tests.integration.test_transformers import PoisonStep, make_trainer, tiny_gpt2


class PoisonSteps(PoisonStep):
    """NaN gradients on every optimizer step in ``steps``."""

    def __init__(self, model: torch.nn.Module, steps: set[int]) -> None:
        super().__init__(model, -1)
        self.steps = steps

        self.weights_before: dict[int, dict[str, torch.Tensor]] = {}
        self.weights_after: dict[int, dict[str, torch.Tensor]] = {}

    def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.on = state.global_step in self.steps

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        super().on_pre_optimizer_step(args, state, control, **kw)
        self.weights_before[state.global_step] = dict(self.before)

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        super().on_optimizer_step(args, state, control, **kw)
        model = kw["model"]
        self.weights_after[state.global_step] = {
            n: p.detach().clone() for n, p in model.named_parameters()
        }


@pytest.mark.parametrize("optim", ["adamw_torch_fused", "adamw_torch"])
def test_callback_rolls_back_under_the_trainers_scheduler(tmp_path: Path, optim: str) -> None:
    model = tiny_gpt2()
    poison = PoisonSteps(model, {3, 4, 5})
    recover = gg.Recover(skip_budget=3, window=10, lr_factor=1.0, snapshot_every=2)
    callback = GradGuardCallback(on_instability=recover)
    run = make_trainer(
        tmp_path, [poison, callback], model=model, optim=optim, max_steps=10, max_grad_norm=0.0
    )
    with pytest.warns(gg.GradGuardWarning):
        run.train()
    guard = callback.guard
    recovery = [e for e in guard.events if e.kind == "recovery"]
    assert recovery and recovery[0].details["action"] == "rollback"
    # Step 2 (0-based, as PoisonSteps counts) holds the last healthy snapshot; messages and
    # details quote it as the Trainer shows it: global step 3.
    assert recovery[0].details["snapshot_step"] == 3
    assert "snapshot of step 3" in recovery[0].message
    assert guard.skipped_steps == 4  # three NaN steps and the step that rolled back
    # Step 6 rolled back: its weights are those step 2 started from, and it took no update.
    snapshot, after = poison.weights_before[2], poison.weights_after[6]
    assert all(torch.equal(snapshot[n], after[n]) for n in snapshot)
    assert [poison.changed[s] for s in (3, 4, 5)] == [0, 0, 0]  # NaN steps: skipped
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # The linear schedule's value, untouched by the ladder.
    assert run.optimizer.param_groups[0]["lr"] == run.lr_scheduler.get_last_lr()[0]
