"""Invariants of every clip strategy, on gradients that hypothesis draws.

Each example builds a small MLP of drawn widths, sets drawn gradients (values spread over
many orders of magnitude), and lets the guard clip them in the optimizer's pre-hook
(SGD with lr=0, so the parameters and the next step stay put).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import gradguard as gg
from tests.strategies import assert_covers

STRATEGIES: dict[str, Callable[[float], gg.ClipStrategy]] = {
    "norm": lambda limit: gg.NormClip(limit),
    "norm-per-layer": lambda limit: gg.NormClip(limit, per_layer=True),
    "value": lambda limit: gg.ValueClip(limit / 10),
    "autoclip": lambda limit: gg.AutoClip(percentile=limit % 100),
    "autoclip-per-layer": lambda limit: gg.AutoClip(percentile=limit % 100, per_layer=True),
    "zclip": lambda limit: gg.ZClip(warmup_steps=2),
    "zclip-percentile": lambda limit: gg.ZClip(warmup_steps=2, mode="percentile", z_threshold=0.5),
    "agc": lambda limit: gg.AGC(clipping=limit / 100),
}


def test_the_properties_cover_every_strategy() -> None:
    assert_covers(lambda make=make: make(1.0) for make in STRATEGIES.values())


SETTINGS = settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@st.composite
def gradient_steps(draw: st.DrawFn) -> tuple[list[int], list[list[torch.Tensor]]]:
    """Widths of an MLP and, for a few steps, one gradient per parameter."""
    widths = draw(st.lists(st.integers(1, 6), min_size=2, max_size=4))
    shapes: list[tuple[int, ...]] = []
    for a, b in itertools.pairwise(widths):
        shapes += [(b, a), (b,)]
    steps = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        step = []
        for shape in shapes:
            exponent = draw(st.integers(-6, 6))
            step.append(torch.randn(shape, generator=gen) * 10.0**exponent)
        out.append(step)
    return widths, out


def build(
    widths: list[int], clip: gg.ClipStrategy
) -> tuple[nn.Sequential, torch.optim.SGD, gg.MemorySink]:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(a, b) for a, b in itertools.pairwise(widths)])
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    sink = gg.MemorySink()
    gg.attach(
        model,
        opt,
        clip=clip,
        sinks=[sink],
        log_every_n_steps=1,
        activations=False,
        detectors=[],
        on_spike="ignore",  # gradients of every scale on purpose: no spike warnings
    )
    return model, opt, sink


def set_grads(model: nn.Module, grads: list[torch.Tensor]) -> None:
    for p, g in zip(model.parameters(), grads):
        p.grad = g.clone()


def norm(tensors: list[torch.Tensor]) -> float:
    return math.sqrt(sum(float(t.double().square().sum()) for t in tensors))


@SETTINGS
@given(data=gradient_steps(), name=st.sampled_from(sorted(STRATEGIES)), limit=st.floats(0.01, 99.0))
def test_clipping_never_increases_a_norm(
    data: tuple[list[int], list[list[torch.Tensor]]], name: str, limit: float
) -> None:
    widths, steps = data
    model, opt, _sink = build(widths, STRATEGIES[name](limit))
    for grads in steps:
        set_grads(model, grads)
        opt.step()
        after = [p.grad for p in model.parameters()]
        assert norm(after) <= norm(grads) * (1 + 1e-6)
        # ...nor the norm of any layer, nor any single element.
        for layer in range(len(grads) // 2):
            pair = slice(2 * layer, 2 * layer + 2)
            assert norm(after[pair]) <= norm(grads[pair]) * (1 + 1e-6)
        for a, g in zip(after, grads):
            assert bool((a.abs() <= g.abs() * (1 + 1e-6)).all())


@SETTINGS
@given(data=gradient_steps(), name=st.sampled_from(sorted(STRATEGIES)), limit=st.floats(0.01, 99.0))
def test_reported_scale_is_in_zero_one(
    data: tuple[list[int], list[list[torch.Tensor]]], name: str, limit: float
) -> None:
    widths, steps = data
    model, opt, sink = build(widths, STRATEGIES[name](limit))
    for grads in steps:
        set_grads(model, grads)
        opt.step()
        coef = sink.latest("gradguard/clip/coef")
        assert 0.0 < coef <= 1.0
        measured = norm([p.grad for p in model.parameters()]) / norm(grads)
        assert coef == measured or math.isclose(coef, measured, rel_tol=1e-4)
        clipped = [v for _, v in sink.scalars["gradguard/clip/clipped_steps"]]
        assert clipped[-1] - (clipped[-2] if len(clipped) > 1 else 0.0) == float(coef < 1.0)


@SETTINGS
@given(data=gradient_steps(), limit=st.floats(1e-3, 1e3), per_layer=st.booleans())
def test_normclip_is_idempotent(
    data: tuple[list[int], list[list[torch.Tensor]]], limit: float, per_layer: bool
) -> None:
    widths, steps = data
    model, opt, _ = build(widths, gg.NormClip(limit, per_layer=per_layer))
    set_grads(model, steps[0])
    opt.step()
    once = [p.grad.clone() for p in model.parameters()]
    opt.step()  # the same, already clipped, gradients again
    # A clipped norm lands on the limit up to float32 rounding; if it rounds above, torch's
    # formula scales by limit / (limit + 1e-6) once more, and no further.
    rtol = 1e-6 / limit + 4e-6
    for a, b in zip(once, model.parameters()):
        torch.testing.assert_close(b.grad, a, rtol=rtol, atol=0.0)
    twice = [p.grad.clone() for p in model.parameters()]
    opt.step()
    for a, b in zip(twice, model.parameters()):
        torch.testing.assert_close(b.grad, a, rtol=rtol, atol=0.0)
    assert norm(once) <= limit * (1 + 1e-5) * (math.sqrt(len(once) / 2) if per_layer else 1.0)
