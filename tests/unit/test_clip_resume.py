"""Resume: 40 steps straight == 20 steps, save, fresh everything, load, 20 steps.

The checkpoint goes through ``torch.save`` and ``torch.load(weights_only=True)``, as
Lightning loads it, so the clip state must be tensors and numbers only.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import gradguard as gg
from tests.models import digits, mlp
from tests.strategies import assert_covers

STEPS, HALF, SPIKE = 40, 20, 30

STRATEGIES: dict[str, Callable[[], gg.ClipStrategy]] = {
    "norm": lambda: gg.NormClip(0.5),
    "norm-per-layer": lambda: gg.NormClip(0.3, per_layer=True),
    "value": lambda: gg.ValueClip(0.01),
    "autoclip": lambda: gg.AutoClip(),
    "autoclip-short-history": lambda: gg.AutoClip(30.0, history=16),
    "autoclip-per-layer": lambda: gg.AutoClip(25.0, history=16, per_layer=True),
    "zclip": lambda: gg.ZClip(warmup_steps=10),
    "zclip-percentile-capped": lambda: gg.ZClip(
        warmup_steps=25, mode="percentile", max_grad_norm=2.0
    ),
    "agc": lambda: gg.AGC(clipping=0.02, exclude=("4",)),
}


def batches() -> list[tuple[torch.Tensor, torch.Tensor, float]]:
    x, y = digits()
    gen = torch.Generator().manual_seed(7)
    out = []
    for step in range(STEPS):
        idx = torch.randint(0, x.shape[0], (32,), generator=gen)
        out.append((x[idx], y[idx], 30.0 if step == SPIKE else 1.0))
    return out


def fresh(
    make: Callable[[], gg.ClipStrategy],
) -> tuple[nn.Module, torch.optim.Optimizer, gg.GradGuard, gg.MemorySink]:
    torch.manual_seed(0)
    model = mlp([64, 32, 32, 10])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sink = gg.MemorySink()
    # warn=False: the 30x batch at step 30 is a gradient spike the spike detector reports
    # (its warm-up is 10 steps); these tests are about the clip state, not the warning.
    guard = gg.GradGuard(
        clip=make(),
        sinks=[sink],
        log_every_n_steps=1,
        activations=False,
        detectors=[],
        warn=False,
    )
    return model, opt, guard, sink


def train(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    data: list[tuple[torch.Tensor, torch.Tensor, float]],
) -> None:
    for x, y, scale in data:
        opt.zero_grad(set_to_none=True)
        (nn.functional.cross_entropy(model(x), y) * scale).backward()
        opt.step()


def clip_series(sink: gg.MemorySink) -> dict[str, list[tuple[int, float]]]:
    return {k: v for k, v in sink.scalars.items() if "/clip/" in k or k.endswith("grad_norm_total")}


def roundtrip(state: dict[str, Any]) -> dict[str, Any]:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded: dict[str, Any] = torch.load(buffer, weights_only=True)
    return loaded


def test_the_resume_cases_cover_every_strategy() -> None:
    assert_covers(STRATEGIES.values())


CASES = [(name, True) for name in STRATEGIES] + [
    ("autoclip-per-layer", False),
    ("zclip", False),
]


@pytest.mark.parametrize(("name", "load_before_attach"), CASES)
def test_resume_continues_bit_identically(
    name: str, load_before_attach: bool, bookkeeping: str
) -> None:
    data = batches()
    make = STRATEGIES[name]

    model, opt, guard, straight = fresh(make)
    guard.attach(model, opt)
    train(model, opt, data)
    expected_params = [p.detach().clone() for p in model.parameters()]

    model, opt, guard, first = fresh(make)
    guard.attach(model, opt)
    train(model, opt, data[:HALF])
    checkpoint = roundtrip(
        {"model": model.state_dict(), "optimizer": opt.state_dict(), "guard": guard.state_dict()}
    )
    guard.detach()

    model, opt, guard, second = fresh(make)
    model.load_state_dict(checkpoint["model"])
    opt.load_state_dict(checkpoint["optimizer"])
    if load_before_attach:  # as Lightning does: the state waits for attach
        guard.load_state_dict(checkpoint["guard"])
        guard.attach(model, opt)
    else:
        guard.attach(model, opt)
        guard.load_state_dict(checkpoint["guard"])
    train(model, opt, data[HALF:])

    for got, want in zip(model.parameters(), expected_params):
        assert torch.equal(got, want)
    want_series = clip_series(straight)
    resumed = {k: clip_series(first)[k] + v for k, v in clip_series(second).items()}
    # A strategy without one norm limit (value, unit-wise) has no threshold series; ZClip
    # logs none during its warm-up (nothing is in force then).
    assert resumed.keys() == want_series.keys() and len(want_series) in (3, 4)
    for key, values in want_series.items():
        got_values = torch.tensor([v for _, v in resumed[key]])
        want_values = torch.tensor([v for _, v in values])
        torch.testing.assert_close(got_values, want_values, rtol=0.0, atol=0.0, equal_nan=True)
        assert [s for s, _ in resumed[key]] == [s for s, _ in values]
        if not key.endswith("/threshold"):
            assert [s for s, _ in values] == list(range(STEPS))
    assert resumed["gradguard/clip/clipped_steps"][-1][1] > 0  # the clip bound somewhere


def test_autoclip_refuses_a_state_with_another_history() -> None:
    model, opt, guard, _ = fresh(lambda: gg.AutoClip(history=16))
    guard.attach(model, opt)
    train(model, opt, batches()[:3])
    state = guard.state_dict()
    model, opt, guard, _ = fresh(lambda: gg.AutoClip(history=32))
    guard.attach(model, opt)
    with pytest.raises(
        gg.ConfigurationError,
        match=r"AutoClip history=32 cannot load a state saved with history=16",
    ):
        guard.load_state_dict(state)


def test_zclip_state_is_what_the_package_lacks() -> None:
    """After warm-up, a resumed ZClip clips at once; the package would warm up again."""
    model, opt, guard, _ = fresh(lambda: gg.ZClip(warmup_steps=10))
    guard.attach(model, opt)
    train(model, opt, batches()[:HALF])
    state = roundtrip(guard.state_dict())["clip"]
    assert set(state) == {"steps", "warmup", "mean", "var"}
    assert state["steps"] == HALF and float(state["mean"]) > 0.0
