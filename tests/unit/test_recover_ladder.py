"""The ladder's state machine fed directly (the guard feeds it from each step's packet):
what counts as an incident, and when the ladder starts again from its first rung."""

from __future__ import annotations

import torch

import gradguard as gg
from gradguard.recover import RecoveryLadder
from tests.recovery_kit import make


def _run(ladder: RecoveryLadder, steps: range, bad: set[int], kind: str) -> list[tuple[int, str]]:
    model, opt = make("sgd")
    actions = []
    for step in steps:
        plan = ladder.begin_step(step, model, opt, None)
        actions += [(step, f.details["action"]) for f in plan.findings]
        skipped = kind == "skip" and step in bad
        triggers = [kind] if kind != "skip" and step in bad else []
        ladder.observe(step, skipped=skipped, triggers=triggers)
    return actions


def test_a_steady_rise_spends_the_budget_once_per_window() -> None:
    # The trend detector reports "divergence" on every step of a rise; it counts once per
    # window // skip_budget = 10 steps, so 30 steps of rise make 3 incidents, not 30.
    ladder = RecoveryLadder(gg.Recover(skip_budget=3, window=30, lr_recovery_steps=1000))
    actions = _run(ladder, range(0, 60), set(range(5, 60)), "divergence")
    assert actions[:2] == [(26, "lr_backoff"), (56, "rollback")]


def test_loss_findings_do_not_count_when_told_or_under_a_process_group() -> None:
    for recover, world in (
        (gg.Recover(skip_budget=1, loss_triggers=False), 1),
        (gg.Recover(skip_budget=1), 2),
    ):
        ladder = RecoveryLadder(recover)
        ladder.bind(world_size=world)
        assert _run(ladder, range(20), {3, 4, 5}, "loss_spike") == []
    ladder = RecoveryLadder(gg.Recover(skip_budget=1))
    ladder.bind(world_size=1)
    assert _run(ladder, range(5), {3}, "loss_spike") == [(4, "lr_backoff")]


def test_after_a_quiet_window_at_full_lr_the_ladder_starts_again_from_the_lr_rung() -> None:
    recover = gg.Recover(skip_budget=1, window=5, lr_recovery_steps=3, snapshot_every=2)
    ladder = RecoveryLadder(recover)
    actions = _run(ladder, range(40), {3, 5, 25}, "skip")
    # 3: back-off at 4; 5 (LR still lowered): rollback at 6; quiet from 6 on, LR back at
    # 100% by 9: recovered at 11; 25 is a new incident: the LR rung again, not a rollback.
    assert actions == [
        (4, "lr_backoff"),
        (6, "rollback"),
        (11, "recovered"),
        (26, "lr_backoff"),
        (31, "recovered"),
    ]
    assert ladder.rollbacks == 1


def test_metrics_name_the_ladder_state() -> None:
    ladder = RecoveryLadder(gg.Recover(skip_budget=2, window=10, lr_recovery_steps=4))
    _run(ladder, range(4), {1, 2}, "skip")
    metrics = ladder.metrics()
    assert metrics["recovery/lr_factor"] == 0.5  # skips at 1 and 2: back-off at step 3
    assert metrics["recovery/lr_backoffs"] == 1.0
    assert metrics["recovery/rollbacks"] == 0.0
    assert metrics["recovery/incidents_in_window"] == 0.0  # spent by the back-off
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
