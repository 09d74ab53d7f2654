"""The recovery ladder against reference runs: a rolled-back run equals, bit for bit, the
run that never saw the undone batches; the LR factor rides on top of a scheduler and is
put back exactly after each step."""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import pytest
import torch

import gradguard as gg
from tests.recovery_kit import STEPS, equal_states, run_guarded, run_reference


@pytest.fixture(autouse=True)
def quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gg.GradGuardWarning)
        yield


def actions(guard: gg.GradGuard) -> list[tuple[int, str]]:
    return [(e.step, e.details["action"]) for e in guard.events if e.kind == "recovery"]


ROLLBACK_ONLY = gg.Recover(
    skip_budget=3, window=10, lr_factor=1.0, snapshot_every=5, max_rollbacks=1
)
NAN_12_TO_14 = {12: "nan", 13: "nan", 14: "nan"}


@pytest.mark.parametrize(
    "optimizer",
    ["adam", "adam_fused", "adamw_fused", "adamw_foreach", "sgd_momentum", "sgd_momentum_fused"],
)
@pytest.mark.parametrize("micro", [1, 2])
def test_rolled_back_run_equals_the_run_that_never_saw_the_bad_batches(
    optimizer: str, micro: int
) -> None:
    # Steps 12-14 hold NaN: skipped (rung 1); the third skip in 10 steps spends the budget,
    # so step 15 rolls back to the snapshot of step 10 and drops its own update. Steps 10
    # and 11 were undone; the reference trains on every other batch.
    model, opt, guard, _ = run_guarded(optimizer, ROLLBACK_ONLY, NAN_12_TO_14, micro=micro)
    assert actions(guard) == [(15, "rollback"), (25, "recovered")]
    rollback = next(e for e in guard.events if e.kind == "recovery")
    assert rollback.details["snapshot_step"] == 10
    assert rollback.details["skips_in_window"] == 3
    assert guard.skipped_steps == 4  # three NaN steps and the step that rolled back
    kept = set(range(STEPS)) - set(range(10, 16))
    assert equal_states((model, opt), run_reference(optimizer, kept, micro=micro))
    guard.detach()


def _factor(step: int) -> float:
    """The ladder's LR factor in the scenario below (its formula, written out)."""
    if 15 <= step < 19:
        return 0.5 + (1.0 - 0.5) * (step - 15) / 4
    if 25 <= step < 29:
        return 0.25 + (1.0 - 0.25) * (step - 25) / 4
    return 1.0


def test_lr_backoff_then_rollback_under_a_scheduler_matches_a_hand_made_reference() -> None:
    # Incident 1 (steps 12-14): the LR rung: 50% at step 15, back to 100% at step 19.
    # Incident 2 (steps 22-24): rollback at 25 to step 20's snapshot, LR restarts at 25%.
    poison = {**NAN_12_TO_14, 22: "nan", 23: "nan", 24: "nan"}
    recover = gg.Recover(
        skip_budget=3, window=10, lr_factor=0.5, lr_recovery_steps=4, snapshot_every=5
    )
    schedules: list[torch.optim.lr_scheduler.LambdaLR] = []

    def lam(t: int) -> float:
        return 1.0 / (1.0 + 0.1 * t)

    def scheduler(opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        schedules.append(torch.optim.lr_scheduler.LambdaLR(opt, lam))
        return schedules[0]

    model, opt, guard, seen = run_guarded(
        "sgd_momentum", recover, poison, scheduler=scheduler, log_every_n_steps=1
    )
    assert actions(guard) == [(15, "lr_backoff"), (25, "rollback")]
    scheduled = [0.01 * lam(t) for t in range(STEPS)]
    # The update of every step used the scheduler's lr times the ladder's factor (step 25,
    # which rolled back, has no gradient and no update)...
    updated = [t for t in range(STEPS) if t != 25]
    assert [seen[t] for t in updated] == [scheduled[t] * _factor(t) for t in updated]
    # ...and the scheduler's own value is back, exactly, after every step.
    assert opt.param_groups[0]["lr"] == schedules[0].get_last_lr()[0] == 0.01 * lam(STEPS)
    kept = set(range(STEPS)) - {12, 13, 14, 20, 21, 22, 23, 24, 25}
    reference = run_reference("sgd_momentum", kept, lr_at=lambda t: scheduled[t] * _factor(t))
    assert equal_states((model, opt), reference)
    # The metrics of the last logging step (29): one rollback, one back-off, LR at 100%.
    assert guard.last_scalars["gradguard/recovery/rollbacks"] == 1.0
    assert guard.last_scalars["gradguard/recovery/lr_backoffs"] == 1.0
    assert guard.last_scalars["gradguard/recovery/lr_factor"] == 1.0
    guard.detach()


def test_tensor_lr_under_one_cycle_is_scaled_during_the_step_and_the_same_object_after() -> None:
    recover = gg.Recover(skip_budget=3, window=10, lr_factor=0.5, lr_recovery_steps=4)
    lr = torch.tensor(0.01)
    model, opt = __import__("tests.recovery_kit", fromlist=["make"]).make("adam_fused", lr=lr)
    guard = gg.attach(model, opt, on_instability=recover, activations=False, on_spike="ignore")
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.02, total_steps=STEPS + 1)
    during: list[float] = []
    opt.register_step_pre_hook(lambda o, a, k: during.append(float(o.param_groups[0]["lr"])))
    after: list[float] = []
    for step in range(STEPS):
        opt.zero_grad(set_to_none=True)
        x = torch.randn(16, 4) * (float("nan") if step in NAN_12_TO_14 else 1.0)
        model(x).square().mean().backward()
        scheduled = float(opt.param_groups[0]["lr"])
        opt.step()
        assert opt.param_groups[0]["lr"] is lr  # the scheduler's tensor, put back
        after.append(float(lr))
        assert after[-1] == scheduled
        sched.step()
        if step == 15:
            assert during[-1] == pytest.approx(scheduled * 0.5, rel=1e-6)
    assert actions(guard) == [(15, "lr_backoff"), (25, "recovered")]
    assert during[:15] == after[:15]
    guard.detach()


def test_a_loss_spike_counts_one_step_late_and_rolls_back_past_it() -> None:
    # Two loud batches (targets x100) at steps 12 and 13: their updates went ahead (the loss
    # is read from the packet, after the step); the second spike spends the budget, so step
    # 14 rolls back to step 10's snapshot: the reference never saw steps 10-14.
    recover = gg.Recover(skip_budget=2, window=10, lr_factor=1.0, snapshot_every=5)
    model, opt, guard, _ = run_guarded("adam", recover, {12: "loud", 13: "loud"}, observe_loss=True)
    assert actions(guard)[0] == (14, "rollback")
    assert next(e for e in guard.events if e.kind == "recovery").details["reasons"] == [
        "loss_spike"
    ]
    kept = set(range(STEPS)) - set(range(10, 15))
    assert equal_states((model, opt), run_reference("adam", kept))
    guard.detach()


def test_rollback_under_a_grad_scaler_on_cpu_matches_the_reference() -> None:
    scaler = torch.amp.GradScaler("cpu")
    recover = gg.Recover(skip_budget=2, window=10, lr_factor=1.0, snapshot_every=5)
    model, opt, guard, _ = run_guarded(
        "adam", recover, {12: "loud", 13: "loud"}, observe_loss=True, scaler=scaler
    )
    assert actions(guard)[0] == (14, "rollback")
    kept = set(range(STEPS)) - set(range(10, 15))
    assert equal_states((model, opt), run_reference("adam", kept))
    guard.detach()


def test_exhausted_ladder_raises_with_the_history() -> None:
    # NaN from step 5 on: LR back-off at 7, rollback to step 0 at 9, exhausted at 12.
    recover = gg.Recover(skip_budget=2, window=10, snapshot_every=5, max_rollbacks=1)
    poison = {step: "nan" for step in range(5, STEPS)}
    with pytest.raises(gg.GradientAlarmError) as caught:
        run_guarded("adam", recover, poison)
    message = str(caught.value)
    assert caught.value.step == 12
    assert "step 7: lr_backoff" in message and "step 9: rollback" in message
    assert "1 rollback(s) did not stabilise training" in message


def test_exhausted_ladder_warns_and_keeps_training_when_told() -> None:
    recover = gg.Recover(
        skip_budget=2, window=10, snapshot_every=5, max_rollbacks=1, on_exhausted="warn"
    )
    poison = {step: "nan" for step in range(5, 20)}
    model, _, guard, _ = run_guarded("adam", recover, poison)
    assert actions(guard)[:3] == [(7, "lr_backoff"), (9, "rollback"), (12, "exhausted")]
    exhausted = [e for e in guard.events if e.details.get("action") == "exhausted"]
    assert exhausted[0].severity == "error"
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert guard.step == STEPS
    summary = guard.summary()
    assert summary["events"]["recovery"] >= 3
    assert summary["verdict"] == "error"
    assert "recovery" in guard.report().lower()
    guard.detach()


def test_every_recovery_action_is_also_a_warning() -> None:
    # An LR back-off at 15 and a rollback at 25: both said, though a warning of one kind is
    # otherwise rate-limited (repeat_every) so that a flood does not drown the console.
    poison = {**NAN_12_TO_14, 22: "nan", 23: "nan", 24: "nan"}
    recover = gg.Recover(
        skip_budget=3, window=10, lr_factor=0.5, lr_recovery_steps=4, snapshot_every=5
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, _, guard, _ = run_guarded("sgd_momentum", recover, poison)
    said = [str(w.message) for w in caught if issubclass(w.category, gg.GradGuardWarning)]
    recovery = [e for e in guard.events if e.kind == "recovery"]
    assert len(recovery) == 2
    assert all(any(f"[gradguard step {e.step}]" in s and e.message in s for s in said)
               for e in recovery)  # fmt: skip
    guard.detach()
