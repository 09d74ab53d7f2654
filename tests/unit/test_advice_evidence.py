"""The gradient-flow advice follows the evidence: tanh's own slope, weights that grew (the
learning rate), inputs far from unit scale."""

from __future__ import annotations

import torch
from torch import nn

import gradguard as gg
from tests.models import digits, mlp


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: int) -> gg.MemorySink:
    x, y = digits()
    sink = gg.MemorySink()
    gg.attach(model, opt, sinks=[sink], log_every_n_steps=5, activations=False, warn=False)
    for step in range(steps):
        batch = slice((step * 64) % 1700, (step * 64) % 1700 + 64)
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
        opt.step()
    return sink


def test_a_tanh_stack_is_told_tanh_slope_not_sigmoid_slope() -> None:
    torch.manual_seed(0)
    model = mlp([64] + [32] * 10 + [10], nn.Tanh)
    with torch.no_grad():
        for module in model:
            if isinstance(module, nn.Linear):
                module.weight.mul_(0.5)  # small weights: each layer shrinks the signal
    sink = train(model, torch.optim.SGD(model.parameters(), lr=0.01), 16)
    (event,) = [e for e in sink.events if e.kind == "vanishing"]
    assert "tanh's slope is at most 1" in event.advice
    assert "sigmoid" not in event.advice and "ReLU" in event.advice


def flow_stats(step: int, weights: float, scalars: dict[str, float]) -> gg.LoggedStats:
    """Six weight layers whose gradients dwarf their weights (exploding, "scale")."""
    layers = tuple(str(i) for i in range(6))
    return gg.LoggedStats(
        step=step,
        sink_step=step,
        layers=layers,
        total=1e4,
        per_layer={
            "grad_norm": (1e4,) * 6,
            "param_norm": (weights,) * 6,
            "update_ratio": (1e-3,) * 6,
        },
        scalars=scalars,
        present=(True,) * 6,
    )


def test_exploding_gradients_with_raw_inputs_say_standardise_first() -> None:
    detector = gg.GradientFlowDetector()
    found = []
    for step in range(4):
        found += detector.on_log(flow_stats(step, 10.0, {"input/rms": 120.0}))
    finding = found[-1]  # confirmed after 3 checks, then reported at each check
    assert [f.kind for f in found] == ["exploding", "exploding"]
    assert finding.advice.startswith("the model reads inputs of RMS 120, far from unit scale")
    detector = gg.GradientFlowDetector()
    found = []
    for step in range(4):
        found += detector.on_log(flow_stats(step, 10.0, {"input/rms": 1.0}))
    assert "inputs" not in found[0].advice


def test_vanishing_in_weights_that_grew_points_at_the_learning_rate() -> None:
    detector = gg.GradientFlowDetector()
    layers = tuple(str(i) for i in range(6))
    found = []
    for step, weights in enumerate((1.0, 2.5, 2.6, 2.7)):
        found += detector.on_log(
            gg.LoggedStats(
                step=step,
                sink_step=step,
                layers=layers,
                total=1.0,
                per_layer={
                    "grad_norm": (1e-6, 1e-6, 1e-3, 1e-3, 1.0, 1.0),
                    "param_norm": (weights,) * 6,
                },
                scalars={},
                present=(True,) * 6,
            )
        )
    finding = found[-1]
    assert [f.kind for f in found] == ["vanishing", "vanishing"]
    assert "the weights grew 2.7x in 3 steps" in finding.advice
    assert "the learning rate is too high" in finding.advice
