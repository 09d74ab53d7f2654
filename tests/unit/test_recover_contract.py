"""The recovery ladder's contract: arguments checked at construction, its state survives a
resume (all or nothing), nothing is left behind after detach, and what it costs in syncs."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import torch

import gradguard as gg
from tests.models import mlp
from tests.recovery_kit import STEPS, batches, make, run_guarded
from tests.syncs import count_syncs


@pytest.fixture(autouse=True)
def quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gg.GradGuardWarning)
        yield


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"skip_budget": 0}, "skip_budget"),
        ({"skip_budget": 2.5}, "skip_budget"),
        ({"window": 2, "skip_budget": 3}, "window"),
        ({"lr_factor": 0.0}, "lr_factor"),
        ({"lr_factor": 1.5}, "lr_factor"),
        ({"lr_factor": float("nan")}, "lr_factor"),
        ({"lr_recovery_steps": 0}, "lr_recovery_steps"),
        ({"snapshot_every": -1}, "snapshot_every"),
        ({"max_rollbacks": -1}, "max_rollbacks"),
        ({"skip_after_rollback": True}, "skip_after_rollback"),
        ({"on_exhausted": "ignore"}, "on_exhausted"),
        ({"loss_triggers": 1}, "loss_triggers"),
    ],
)
def test_bad_arguments_are_refused_at_construction(kwargs: dict[str, Any], named: str) -> None:
    with pytest.raises(gg.ConfigurationError, match=named):
        gg.Recover(**kwargs)


def test_on_instability_takes_a_recover_and_implies_skipping() -> None:
    with pytest.raises(gg.ConfigurationError, match="on_instability"):
        gg.GradGuard(on_instability="rollback")  # type: ignore[typeddict-item]
    with pytest.raises(gg.ConfigurationError, match="on_nonfinite='raise'"):
        gg.GradGuard(on_nonfinite="raise", on_instability=gg.Recover())
    guard = gg.GradGuard(on_instability=gg.Recover())
    assert (guard.on_nonfinite, guard.on_spike) == ("skip", "skip")
    assert gg.GradGuard(on_instability=gg.Recover(), on_spike="ignore").on_spike == "ignore"
    assert gg.GradGuard().config.on_instability is None  # off by default
    assert "Recover(skip_budget=3" in repr(gg.Recover())


def _ramp_run(split: int | None) -> list[float]:
    """LR back-off at step 15 (NaN at 12-14); with ``split``, the run stops after that
    many steps and resumes in a fresh guard, model and optimizer from the saved states."""
    recover = gg.Recover(skip_budget=3, window=10, lr_factor=0.5, lr_recovery_steps=8)
    model, opt = make("sgd_momentum")
    guard = gg.attach(model, opt, on_instability=recover, activations=False, on_spike="ignore")
    seen: list[float] = []
    hook = opt.register_step_pre_hook(lambda o, a, k: seen.append(o.param_groups[0]["lr"]))
    for step, data in enumerate(batches()):
        if step == split:
            saved = copy.deepcopy((guard.state_dict(), model.state_dict(), opt.state_dict()))
            guard.detach()
            hook.remove()
            model, opt = make("sgd_momentum")
            model.load_state_dict(saved[1])
            opt.load_state_dict(saved[2])
            guard = gg.GradGuard(on_instability=recover, activations=False, on_spike="ignore")
            guard.load_state_dict(saved[0])
            guard.attach(model, opt)
            hook = opt.register_step_pre_hook(lambda o, a, k: seen.append(o.param_groups[0]["lr"]))
        ((x, y),) = data
        if step in (12, 13, 14):
            x = x * float("nan")
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    guard.detach()
    return seen


@pytest.mark.parametrize("split", [14, 17])
def test_the_ladder_state_survives_a_resume(split: int) -> None:
    # Split at 14: the escalation is pending (decided, not yet applied); at 17: mid-ramp.
    uninterrupted = _ramp_run(None)
    assert uninterrupted[15] == 0.005
    assert _ramp_run(split) == uninterrupted


def test_a_bad_recovery_state_is_refused_and_changes_nothing() -> None:
    _, _, guard, _ = run_guarded("adam", gg.Recover(skip_budget=2, window=10), {5: "nan", 6: "nan"})
    before = guard.state_dict()
    for key, value in [
        ("rollbacks", "2"),
        ("lr_low", 0.0),
        ("incidents", [[1]]),
        ("pending", {"x": 1}),
    ]:
        bad = copy.deepcopy(before)
        bad["recovery"][key] = value
        with pytest.raises(gg.ConfigurationError, match="recovery"):
            guard.load_state_dict(bad)
        assert guard.state_dict()["recovery"] == before["recovery"]
    guard.detach()


def test_state_is_weights_only_loadable(tmp_path: Any) -> None:
    _, _, guard, _ = run_guarded("adam", gg.Recover(skip_budget=2, window=10), {5: "nan", 6: "nan"})
    path = tmp_path / "guard.pt"
    torch.save(guard.state_dict(), path)
    loaded = torch.load(path, weights_only=True)
    assert loaded["recovery"]["lr_backoffs"] == 1
    fresh = gg.GradGuard(on_instability=gg.Recover(skip_budget=2, window=10))
    fresh.load_state_dict(loaded)  # kept until attach
    guard.detach()


def test_nothing_is_left_behind_after_detach_mid_step() -> None:
    recover = gg.Recover(skip_budget=1, window=5, lr_factor=0.5)
    model, opt = make("adam")
    lr = opt.param_groups[0]["lr"]
    guard = gg.attach(model, opt, on_instability=recover, activations=False)
    for step in range(3):
        opt.zero_grad(set_to_none=True)
        x = torch.randn(4, 4) * (float("nan") if step == 1 else 1.0)
        model(x).square().mean().backward()
        if step < 2:
            opt.step()
    # Step 0's snapshot is kept (step 0 was healthy); NaN at step 1 spends the budget.
    # Step 2: the guard decides (LR lowered for this step) and the step never happens.
    guard.before_step()
    assert opt.param_groups[0]["lr"] != lr
    ladder = guard._ladder
    assert ladder is not None and ladder.snapshot is not None
    guard.detach()
    assert opt.param_groups[0]["lr"] is lr
    assert ladder.snapshot is None and not ladder.lr.active
    assert "found_inf" not in opt.__dict__
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks


def test_a_step_that_raised_gets_its_learning_rate_back() -> None:
    recover = gg.Recover(skip_budget=1, window=5, lr_factor=0.5)
    model, opt = make("sgd")
    guard = gg.attach(model, opt, on_instability=recover, activations=False)
    lrs: list[float] = []
    for step in range(4):
        opt.zero_grad(set_to_none=True)
        x = torch.randn(4, 4) * (float("nan") if step == 0 else 1.0)
        model(x).square().mean().backward()
        if step == 1:
            guard.before_step()  # as if optimizer.step raised after gradguard's pre-hook
            continue
        opt.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs == [1e-2] * 3
    guard.detach()


def _syncs_added(fused: bool, snapshot_every: int) -> int:
    """Syncs a guarded step adds at guard step 3 (not a logging step)."""
    torch.manual_seed(0)
    model = mlp([8, 32, 32, 4])
    opt = torch.optim.Adam(model.parameters(), fused=fused)
    x = torch.randn(16, 8)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        opt.step()

    for _ in range(2):
        step()
    with count_syncs() as bare:
        step()
    recover = gg.Recover(snapshot_every=snapshot_every)
    guard = gg.attach(model, opt, on_instability=recover, log_every_n_steps=1000)
    for _ in range(3):
        step()
    with count_syncs() as guarded:
        step()
    guard.detach()
    return guarded.count - bare.count


def test_cost_in_syncs_is_the_skip_flag_only() -> None:
    # Like on_nonfinite="skip": one flag read per step, none on a fused optimizer. A
    # snapshot step (every step here) adds no .item() read on the CPU; on CUDA it waits
    # once for its copies (see the benchmark).
    assert _syncs_added(False, 1000) == 1
    assert _syncs_added(True, 1000) == 0
    assert _syncs_added(True, 1) == 0


def test_steps_are_counted_and_the_dropped_one_is_not_measured() -> None:
    recover = gg.Recover(skip_budget=3, window=10, lr_factor=1.0, snapshot_every=5)
    sink = gg.MemorySink()
    _, _, guard, _ = run_guarded(
        "adam", recover, {12: "nan", 13: "nan", 14: "nan"}, log_every_n_steps=1, sinks=[sink]
    )
    assert guard.step == STEPS
    logged = [step for step, _ in sink.scalars["gradguard/grad_norm_total"]]
    assert 15 not in logged and 14 in logged and 16 in logged  # 15 rolled back
    recovery = [e for e in sink.events if e.kind == "recovery"]
    assert [e.details["action"] for e in recovery] == ["rollback", "recovered"]
    guard.detach()
