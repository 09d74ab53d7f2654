"""Interrupted steps and forwards: training that goes on after an exception or a Ctrl-C.

An optimizer step can stop after gradguard's pre-hook ran (another pre-hook raising, a
KeyboardInterrupt); a forward pass can stop inside a sampled activation window. Training
that continues afterwards (a notebook, a retry loop) must not be silently skipped, and
the activation monitor must not stay pushed on torch's function-mode stack.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import gradguard as gg
from tests.faults._kit import Snapshot, backward, loss_of, poison, tiny

FUSED_OPTIMIZERS: dict[str, Callable[[Any], torch.optim.Optimizer]] = {
    "adam-fused": lambda p: torch.optim.Adam(p, lr=1e-2, fused=True),
    "sgd-momentum-fused": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, fused=True),
    "adam-foreach": lambda p: torch.optim.Adam(p, lr=1e-2, foreach=True),
}


class Boom(RuntimeError):
    """What the other pre-hook raises."""


def _raising_hook(exc: BaseException) -> Callable[..., None]:
    def hook(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        raise exc

    return hook


@pytest.mark.parametrize("exc", [Boom("other hook"), KeyboardInterrupt()], ids=["raise", "ctrl-c"])
@pytest.mark.parametrize("make", FUSED_OPTIMIZERS.values(), ids=list(FUSED_OPTIMIZERS))
def test_an_interrupted_step_does_not_skip_later_steps(
    make: Callable[[Any], torch.optim.Optimizer], exc: BaseException
) -> None:
    model = tiny()
    opt = make(model.parameters())
    guard = gg.attach(model, opt, on_nonfinite="skip", activations=False, warn=False)
    for _ in range(2):
        backward(model, opt)
        opt.step()
    # A NaN step, interrupted after gradguard's pre-hook decided to skip it.
    handle = opt.register_step_pre_hook(_raising_hook(exc))
    backward(model, opt)
    poison(model[2].weight)
    with pytest.raises(type(exc)):
        opt.step()
    handle.remove()
    # Training goes on: the next healthy steps update every weight.
    for _ in range(3):
        backward(model, opt)
        before = Snapshot(model, opt)
        opt.step()
        assert len(before.changed(model)) == len(list(model.parameters()))
        assert "found_inf" not in opt.__dict__
    assert guard.skipped_steps == 1 and guard.step == 6


@pytest.mark.parametrize("ending", ["detach", "close"])
@pytest.mark.parametrize("make", FUSED_OPTIMIZERS.values(), ids=list(FUSED_OPTIMIZERS))
def test_detach_after_an_interrupted_step_leaves_no_found_inf(
    make: Callable[[Any], torch.optim.Optimizer], ending: str
) -> None:
    model = tiny()
    opt = make(model.parameters())
    guard = gg.attach(model, opt, on_nonfinite="skip", activations=False, warn=False)
    backward(model, opt)
    opt.step()  # state exists: fused SGD takes the sync-free found_inf path from here
    opt.register_step_pre_hook(_raising_hook(KeyboardInterrupt()))
    backward(model, opt)
    poison(model[0].bias, float("inf"))
    with pytest.raises(KeyboardInterrupt):
        opt.step()
    getattr(guard, ending)()
    assert "found_inf" not in opt.__dict__
    opt._optimizer_step_pre_hooks.clear()  # the user's hook goes too
    backward(model, opt)
    before = Snapshot(model, opt)
    opt.step()  # unguarded now, and not a silent no-op
    assert len(before.changed(model)) == len(list(model.parameters()))


def test_a_scaler_flag_is_restored_after_an_interrupted_step() -> None:
    """A ``found_inf`` that a GradScaler set before the step is put back as it was."""
    model = tiny()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, fused=True)
    guard = gg.attach(model, opt, on_nonfinite="skip", activations=False, warn=False)
    backward(model, opt)
    opt.step()
    theirs = torch.zeros(())
    opt.found_inf = theirs  # type: ignore[attr-defined]
    handle = opt.register_step_pre_hook(_raising_hook(Boom("other hook")))
    backward(model, opt)
    poison(model[4].weight)
    with pytest.raises(Boom):
        opt.step()
    handle.remove()
    guard.detach()
    assert opt.__dict__["found_inf"] is theirs


class Fragile(nn.Linear):
    """A Linear layer whose forward can raise KeyboardInterrupt (a Ctrl-C inside it)."""

    interrupt = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        if self.interrupt:
            raise KeyboardInterrupt
        return out


class Interruptible(nn.Module):
    """A ReLU MLP that can be interrupted inside a layer or inside its own forward."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first = nn.Linear(4, 16)
        self.middle = Fragile(16, 16)
        self.last = nn.Linear(16, 3)
        self.interrupt = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.middle(torch.relu(self.first(x)))
        if self.interrupt:
            raise KeyboardInterrupt
        return self.last(torch.relu(h))


@pytest.mark.parametrize("where", ["model", "layer"])
def test_an_interrupted_sampled_forward_closes_and_the_next_window_publishes(
    where: str, request: pytest.FixtureRequest
) -> None:
    model = Interruptible()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    sink = gg.MemorySink()
    monitor = gg.ActivationMonitor(every_n_steps=2, window=2)
    guard = gg.attach(
        model, opt, activations=monitor, sinks=[sink], log_every_n_steps=1, warn=False
    )
    request.addfinalizer(guard.detach)  # a failure here must not leak the mode
    assert torch._C._len_torch_function_stack() == 0
    flag_owner: Any = model if where == "model" else model.middle
    flag_owner.interrupt = True
    with pytest.raises(KeyboardInterrupt):
        loss_of(model).backward()  # step 0's window: the first sampled pass stops half-way
    flag_owner.interrupt = False
    for _ in range(6):  # training resumes
        backward(model, opt)
        opt.step()
        # The interrupted pass is closed at the latest at the end of the next step.
        assert torch._C._len_torch_function_stack() == 0
    assert torch._C._len_torch_function_stack() == 0
    published = sink.scalars.get("gradguard/dead_fraction/first", [])
    assert published, sorted(sink.scalars)


def test_an_evaluation_after_a_ctrl_c_runs_outside_the_monitor() -> None:
    model = Interruptible()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    monitor = gg.ActivationMonitor(every_n_steps=2, window=2)
    guard = gg.attach(model, opt, activations=monitor, warn=False)
    try:
        model.middle.interrupt = True
        with pytest.raises(KeyboardInterrupt):
            loss_of(model).backward()
        model.middle.interrupt = False
        model.eval()  # the user stops training and evaluates
        with torch.no_grad():
            model(torch.randn(2, 4))
        assert torch._C._len_torch_function_stack() == 0
    finally:
        guard.detach()  # never leak the mode into the next test
