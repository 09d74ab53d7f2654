"""The adapter API's finer points: who decides the logging steps, where warnings point,
and an attach that fails half-way."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import gradguard as gg


def _model_and_opt() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def test_before_step_log_overrides_the_interval_both_ways() -> None:
    model, opt = _model_and_opt()
    sink = gg.MemorySink()
    guard = gg.GradGuard(sinks=[sink], log_every_n_steps=4, activations=False)
    guard.bind(model, opt)
    # The adapter's say for steps 0..5 (None: the interval decides).
    for log in (True, None, True, None, False, None):
        opt.zero_grad()
        model(torch.randn(8, 4)).square().mean().backward()
        guard.before_step(log=log)
        opt.step()
        guard.after_step()
    guard.detach()
    steps = [s for s, _ in sink.scalars["gradguard/grad_norm_total"]]
    assert steps == [0, 2]  # 4 is a multiple of 4 but the adapter said no; 2 is not, but yes
    assert guard.log_every_n_steps == 4


def test_an_event_warning_points_at_the_users_step_call() -> None:
    model, opt = _model_and_opt()
    gg.attach(model, opt, log_every_n_steps=1, activations=False)
    opt.zero_grad()
    (model(torch.randn(8, 4)).sum() * float("nan")).backward()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step()
        opt.step()  # the NaN warning arrives at most one step late
    (warning,) = [w for w in caught if issubclass(w.category, gg.GradGuardWarning)]
    assert warning.filename == __file__, warning.filename  # not gradguard/_packet.py


def test_an_attach_whose_hooks_cannot_be_registered_leaves_nothing_behind() -> None:
    model, opt = _model_and_opt()

    def refuse(*args: object, **kwargs: object) -> None:
        raise RuntimeError("no hooks today")

    # A real optimizer whose post-hook registration fails, as a wrapper that forbids hooks would.
    opt.register_step_post_hook = refuse  # type: ignore[method-assign,assignment]
    with pytest.raises(RuntimeError, match="no hooks today"):
        gg.attach(model, opt, activations=False)
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
    del opt.register_step_post_hook  # the instance attribute; the class method is back
    guard = gg.attach(model, opt, activations=False)  # the optimizer is free to watch again
    assert guard.attached
    guard.detach()
