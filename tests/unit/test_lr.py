"""LearningRateDetector: weights that grow fast, a loss that does not fall while they move,
update ratios far above ~1e-3 for many steps."""

from __future__ import annotations

import math
from collections.abc import Sequence

import pytest
import torch
from torch import nn

import gradguard as gg
from tests.models import digits, mlp

LAYERS = ("0", "2", "4")


def logged(
    step: int, weights: float | Sequence[float], ratio: float | Sequence[float] = 1e-3
) -> gg.LoggedStats:
    """A logging step's statistics: the same weight norm / update ratio for every layer,
    or one per layer."""
    norms = [weights] * 3 if isinstance(weights, (int, float)) else list(weights)
    ratios = [ratio] * 3 if isinstance(ratio, (int, float)) else list(ratio)
    return gg.LoggedStats(
        step=step,
        sink_step=step,
        layers=LAYERS,
        total=1.0,
        per_layer={
            "grad_norm": (1.0, 1.0, 1.0),
            "param_norm": tuple(norms),
            "update_ratio": tuple(ratios),
        },
        scalars={},
        present=(True, True, True),
    )


def stepped(step: int, loss: float) -> gg.StepStats:
    return gg.StepStats(
        step, LAYERS, 1.0, (1.0, 1.0, 1.0), (True,) * 3, False, False, {"loss": loss}
    )


def feed(
    detector: gg.LearningRateDetector,
    steps: int,
    weights: object,
    ratio: object = 1e-3,
    loss: object = None,
    every: int = 50,
) -> list[gg.Finding]:
    """Run ``steps`` steps; ``weights``/``ratio``/``loss`` map a step to its value."""
    found: list[gg.Finding] = []
    for step in range(steps):
        if loss is not None:
            detector.on_step(stepped(step, loss(step)))  # type: ignore[operator]
        if step % every == 0:
            found += detector.on_log(logged(step, weights(step), ratio(step)))  # type: ignore[operator]
    return found


def test_weights_tripling_early_is_too_high_a_rate() -> None:
    found = feed(gg.LearningRateDetector(), 201, lambda s: 1.0 + s / 50, lambda s: 0.02)
    assert found and found[0].kind == "lr_too_high"
    assert found[0].details["evidence"] == ["growth"]
    assert "grew 3.0x in 100 steps" in found[0].message


def test_slow_healthy_growth_and_growth_after_the_window_are_not_evidence() -> None:
    # 1.7x in 200 steps (the healthy zoo's fastest), then on to 4x by step 1000.
    found = feed(gg.LearningRateDetector(), 1001, lambda s: 1.0 + 0.0035 * s, lambda s: 0.01)
    assert found == []


def test_doubling_fast_counts_only_after_steps_of_ratio_over_a_tenth() -> None:
    growth = lambda s: 1.0 + s / 80  # noqa: E731 (2.25x at step 100)
    assert feed(gg.LearningRateDetector(), 101, growth, lambda s: 0.05) == []
    found = feed(gg.LearningRateDetector(), 101, growth, lambda s: 0.4 if s == 0 else 0.02)
    assert [f.details["evidence"] for f in found] == [["growth"]]
    assert "up to 0.4 of their norm (step 0; 400x the usual ~1e-3)" in found[0].message


def test_a_loss_that_does_not_fall_while_the_weights_double() -> None:
    growth = lambda s: 1.0 + s / 250  # noqa: E731 (2x by step 250: too slow for "growth")
    flat = lambda s: 2.3 + 0.05 * math.sin(s)  # noqa: E731
    found = feed(gg.LearningRateDetector(), 301, growth, lambda s: 0.01, flat)
    assert found and found[0].details["evidence"] == ["loss"]
    assert "the loss barely fell from 2.3" in found[0].message
    falling = lambda s: 2.3 * math.exp(-s / 300)  # noqa: E731
    assert feed(gg.LearningRateDetector(), 301, growth, lambda s: 0.01, falling) == []
    # A flat loss with weights that barely move is someone else's diagnosis (dead units...).
    assert feed(gg.LearningRateDetector(), 301, lambda s: 1.05, lambda s: 0.01, flat) == []


def test_update_ratios_over_a_tenth_for_a_hundred_steps() -> None:
    found = feed(gg.LearningRateDetector(), 151, lambda s: 1.0, lambda s: 0.3, every=25)
    assert found and found[0].details["evidence"] == ["ratio"]
    assert "0.3 of their norm, for 100 steps now (300x the usual ~1e-3)" in found[0].message
    # Adam's first steps or a warm-up peak: two checks, then back to normal.
    blip = lambda s: 0.3 if s < 50 else 0.01  # noqa: E731
    assert feed(gg.LearningRateDetector(), 301, lambda s: 1.0, blip, every=25) == []


def test_one_layer_with_its_own_large_rate_is_not_the_model() -> None:
    # Per-group learning rates (a new head trained 100x faster): medians over layers.
    found = feed(
        gg.LearningRateDetector(),
        301,
        lambda s: (1.0, 1.0, 1.0 + s / 20),
        lambda s: (1e-3, 1e-3, 0.5),
    )
    assert found == []


def test_the_advice_knows_when_clipping_is_on() -> None:
    torch.manual_seed(0)
    model = mlp([64, 32, 32, 32, 10], nn.Tanh)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    sink = gg.MemorySink()
    gg.attach(model, opt, sinks=[sink], clip=gg.AutoClip(), activations=False, warn=False)
    x, y = digits()
    for step in range(101):
        batch = slice((step * 32) % 1700, (step * 32) % 1700 + 32)
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
        opt.step()
    (event,) = [e for e in sink.events if e.kind == "lr_too_high"]
    assert "lower the learning rate" in event.advice and "warm" in event.advice
    assert "clipping is on" in event.advice
    assert set(event.layers) <= {"0", "2", "4", "6"}


def test_state_round_trip_keeps_the_reference_weights() -> None:
    detector = gg.LearningRateDetector()
    feed(detector, 51, lambda s: 1.0 + s / 50, lambda s: 0.02)  # 2x by step 50: no evidence
    state = detector.state_dict()
    resumed = gg.LearningRateDetector()
    resumed.check_state(state)
    resumed.load_state_dict(state)
    found = resumed.on_log(logged(100, 3.0, 0.02))
    assert found and "grew 3.0x in 100 steps" in found[0].message


@pytest.mark.parametrize(
    ("kwargs", "word"),
    [
        ({"growth": 1.0}, "growth"),
        ({"loss_steps": 10}, "loss_steps"),
        ({"ratio": 0.0}, "ratio"),
        ({"loss_drop": 1.0}, "loss_drop"),
        ({"patience": 0}, "patience"),
    ],
)
def test_bad_arguments_are_refused_at_construction(kwargs: dict[str, float], word: str) -> None:
    with pytest.raises(gg.ConfigurationError, match=word):
        gg.LearningRateDetector(**kwargs)  # type: ignore[arg-type]
