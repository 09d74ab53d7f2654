"""The performance contract, tested structurally: no host sync on a non-logging step.

A dispatch mode counts ``aten._local_scalar_dense`` (what ``.item()``, ``bool(t)`` and
``float(t)`` call). torch's own Adam reads its step counter on CPU, so each test counts the
difference between a step with gradguard and the same step without it.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradguard as gg
from tests.models import mlp
from tests.syncs import count_syncs

X = torch.randn(16, 8)


def _step(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    opt.zero_grad(set_to_none=True)
    model(X).square().mean().backward()
    opt.step()


def _syncs_added(fused: bool, **guard_kwargs: object) -> int:
    torch.manual_seed(0)
    model = mlp([8, 32, 32, 4])
    opt = torch.optim.Adam(model.parameters(), fused=fused)
    for _ in range(2):
        _step(model, opt)
    with count_syncs() as bare:
        _step(model, opt)
    guard_kwargs.setdefault("log_every_n_steps", 1000)
    guard = gg.attach(model, opt, **guard_kwargs)  # type: ignore[arg-type]
    for _ in range(3):  # step 0 logs and samples activations; 1 and 2 do neither
        _step(model, opt)
    with count_syncs() as guarded:
        _step(model, opt)
    assert guard.step == 4
    guard.detach()
    return guarded.count - bare.count


@pytest.mark.parametrize("fused", [False, True])
def test_default_configuration_adds_no_sync(fused: bool) -> None:
    assert _syncs_added(fused) == 0


def test_activation_sampling_window_adds_no_sync() -> None:
    # Every step falls in a sampling window: the hooks accumulate on device only.
    assert _syncs_added(False, activations=gg.ActivationMonitor(every_n_steps=1, window=1)) == 0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"on_nonfinite": "skip"},
        {"on_spike": "skip"},
        {"on_nonfinite": "raise"},
        {"on_nonfinite": "skip", "on_spike": "skip"},
        {"on_nonfinite": "raise", "on_spike": "skip"},
    ],
)
def test_decide_now_policies_read_exactly_one_flag(kwargs: dict[str, str]) -> None:
    assert _syncs_added(False, **kwargs) == 1


@pytest.mark.parametrize("kwargs", [{"on_nonfinite": "skip"}, {"on_spike": "skip"}])
def test_skip_on_fused_optimizers_is_sync_free(kwargs: dict[str, str]) -> None:
    assert _syncs_added(True, **kwargs) == 0


def test_clipping_adds_no_sync() -> None:
    assert _syncs_added(False, clip=1.0) == 0
    assert _syncs_added(False, clip=gg.NormClip(0.5, per_layer=True)) == 0
    assert _syncs_added(False, clip=gg.ValueClip(0.01)) == 0
