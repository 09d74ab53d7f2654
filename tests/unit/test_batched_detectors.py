"""Detectors with ``batched = True`` see every step, in order, up to BATCH_STEPS late, and
never later than what the guard shows: a logging step, a report, a state_dict, detach and a
NaN step hand them what is waiting."""

from __future__ import annotations

import torch
from torch import nn

import gradguard as gg
from gradguard.detect.base import BATCH_STEPS


class Recorder(gg.Detector):
    """Records the steps it is given and when; reports a finding about step 5."""

    kinds = ("recorded",)
    batched = True

    def __init__(self) -> None:
        self.seen: list[int] = []
        self.calls = 0

    def on_step(self, stats: gg.StepStats) -> list[gg.Finding]:
        self.seen.append(stats.step)
        if stats.step != 5:
            return []
        return [gg.Finding("recorded", (), 5.0, "step 5 was seen.", "nothing to do")]


def _guard(**kwargs: object) -> tuple[nn.Module, torch.optim.Optimizer, Recorder, gg.GradGuard]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    recorder = Recorder()
    guard = gg.attach(model, opt, detectors=[recorder], activations=False, warn=False,
                      log_every_n_steps=1000, **kwargs)  # type: ignore[arg-type]  # fmt: skip
    return model, opt, recorder, guard


def _step(model: nn.Module, opt: torch.optim.Optimizer, nan: bool = False) -> None:
    opt.zero_grad()
    loss = model(torch.randn(16, 4)).square().mean()
    (loss * float("nan") if nan else loss).backward()
    opt.step()


def test_steps_arrive_in_order_in_batches_and_findings_keep_their_step() -> None:
    model, opt, recorder, guard = _guard()
    _step(model, opt)
    assert recorder.seen == [0]  # step 0 is a logging step: handed over at once
    for _ in range(BATCH_STEPS - 1):
        _step(model, opt)
    assert recorder.seen == [0]  # waiting: nothing has asked for them yet
    _step(model, opt)
    assert recorder.seen == list(range(BATCH_STEPS + 1))  # one batch, in order
    (event,) = guard.events
    assert event.kind == "recorded" and event.step == 5  # the step of the evidence
    guard.detach()


def test_a_report_and_detach_hand_over_what_waits() -> None:
    model, opt, recorder, guard = _guard()
    for _ in range(3):
        _step(model, opt)
    guard.report()
    assert recorder.seen == [0, 1, 2]
    _step(model, opt)
    _step(model, opt)
    guard.state_dict()
    assert recorder.seen == [0, 1, 2, 3, 4]
    _step(model, opt)
    _step(model, opt)
    guard.detach()
    assert recorder.seen == list(range(7))
    assert [e.step for e in guard.events] == [5]


def test_a_nan_step_flushes_at_once() -> None:
    model, opt, recorder, guard = _guard(on_nonfinite="skip")
    _step(model, opt)
    _step(model, opt, nan=True)
    assert recorder.seen == [0, 1]  # the NaN step did not wait for a full batch
    guard.detach()


def test_under_the_recovery_ladder_every_step_is_handed_over_at_once() -> None:
    model, opt, recorder, guard = _guard(on_instability=gg.Recover())
    for step in range(3):
        _step(model, opt)
        guard._mirror.drain(block=False)  # what the next step reads first (CPU: already done)
        assert recorder.seen == list(range(step + 1))
    guard.detach()
