"""ActivationMonitor: the scale of the inputs the first layer reads, and the headroom of
float16 activations (``act_absmax``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradguard as gg
from gradguard.report.advice import fmt
from tests.models import digits, mlp


def train(
    model: nn.Module,
    inputs: torch.Tensor,
    steps: int = 4,
    lr: float = 1e-3,
    autocast: torch.dtype | None = None,
    **monitor: float,
) -> tuple[gg.GradGuard, gg.MemorySink]:
    """One window of 4 passes at steps 0-3, read on the logging step 4."""
    _, y = digits()
    sink = gg.MemorySink()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    guard = gg.attach(
        model,
        opt,
        sinks=[sink],
        log_every_n_steps=4,
        activations=gg.ActivationMonitor(**monitor),  # type: ignore[arg-type]
        warn=False,
    )
    for step in range(steps + 1):
        batch = slice(step * 64, step * 64 + 64)
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
            out = model(inputs[batch])
        nn.functional.cross_entropy(out.float(), y[batch]).backward()
        opt.step()
    return guard, sink


def kinds(sink: gg.MemorySink) -> list[str]:
    return [e.kind for e in sink.events]


def test_raw_pixels_are_reported_on_the_first_layer_with_their_numbers() -> None:
    x, _ = digits()
    raw = (x - x.min()) * 20.0  # non-negative, RMS in the hundreds
    torch.manual_seed(0)
    _, sink = train(mlp([64, 32, 10]), raw)
    (event,) = [e for e in sink.events if e.kind == "input_scale"]
    assert event.layers == ("0",)
    window = raw[: 4 * 64]
    rms = float(window.square().mean().sqrt())
    (logged,) = sink.scalars["gradguard/input/rms"]
    assert logged == (4, pytest.approx(rms, rel=1e-4))
    assert sink.scalars["gradguard/input/mean"][0][1] == pytest.approx(float(window.mean()), 1e-4)
    assert f"RMS {fmt(rms)}" in event.message
    assert "standardise the inputs" in event.advice


def test_standardised_inputs_are_quiet_and_their_statistics_are_logged() -> None:
    x, _ = digits()
    torch.manual_seed(0)
    _, sink = train(mlp([64, 32, 10]), x)
    assert sink.events == []
    assert 0.5 < sink.scalars["gradguard/input/rms"][0][1] < 2.0
    assert sink.scalars["gradguard/input/feature_spread"][0][1] < 10.0


def test_feature_scales_spread_over_orders_of_magnitude() -> None:
    x, _ = digits()
    scales = 10.0 ** torch.linspace(-3.0, 0.5, 64)
    torch.manual_seed(0)
    _, sink = train(mlp([64, 32, 10]), x * scales)
    (event,) = [e for e in sink.events if e.kind == "input_scale"]
    assert "64 features whose scales differ" in event.message and "mean" not in event.message


class ScalesInside(nn.Module):
    """Divides raw pixels by 255 in its forward: the first layer reads normalised values."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc((x.view(-1, 8, 8) / 255.0 - 0.2).flatten(1))  # type: ignore[no-any-return]


def test_what_counts_is_what_the_first_layer_reads() -> None:
    x, _ = digits()
    raw = (x - x.min()) * 20.0
    torch.manual_seed(0)
    _, sink = train(ScalesInside(), raw)
    assert "input_scale" not in kinds(sink)
    assert sink.scalars["gradguard/input/rms"][0][1] < 2.0


def test_a_normalisation_layer_first_or_token_ids_need_no_advice() -> None:
    x, _ = digits()
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm1d(64), *mlp([64, 32, 10]))
    _, sink = train(model, (x - x.min()) * 20.0)
    assert "input_scale" not in kinds(sink)
    assert "gradguard/input/rms" not in sink.scalars
    tokens = nn.Sequential(nn.Embedding(64, 16), nn.Flatten(), nn.Linear(16 * 64, 10))
    _, sink = train(tokens, (torch.arange(64).repeat(320, 1) * 7) % 64)
    assert "gradguard/input/rms" not in sink.scalars


def test_a_frozen_first_layer_hides_the_inputs() -> None:
    # The trainable head reads the frozen layer's output, not the inputs: nothing to say.
    x, _ = digits()
    torch.manual_seed(0)
    model = mlp([64, 32, 10])
    model[0].requires_grad_(False)
    _, sink = train(model, (x - x.min()) * 20.0)
    assert "gradguard/input/rms" not in sink.scalars


def test_images_are_measured_per_channel_on_a_first_conv() -> None:
    x, _ = digits()
    images = ((x - x.min()) * 20.0).view(-1, 1, 8, 8).repeat(1, 3, 1, 1)
    images[:, 1] *= 0.001  # one channel a thousand times smaller
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
    torch.manual_seed(0)
    _, sink = train(model, images)
    (event,) = [e for e in sink.events if e.kind == "input_scale"]
    assert event.layers == ("0",) and "3 features whose scales differ 1,000x" in event.message


def test_the_saturation_advice_names_badly_scaled_inputs() -> None:
    x, _ = digits()
    torch.manual_seed(0)
    _, sink = train(mlp([64, 32, 32, 10], nn.Tanh), x * 255.0)
    saturation = next(e for e in sink.events if e.kind == "saturation")
    assert saturation.layers[0] == "0"
    assert "'0' reads inputs of RMS" in saturation.advice and "standardise" in saturation.advice


def fixed_linear(peak: float) -> nn.Sequential:
    """Two Linear layers whose first output is exactly ``peak`` at most on these inputs."""
    first, second = nn.Linear(4, 4), nn.Linear(4, 10)
    with torch.no_grad():
        first.weight.copy_(torch.diag(torch.tensor([peak, 1.0, 1.0, 1.0])))
        first.bias.zero_()
        second.weight.fill_(1e-3)
    return nn.Sequential(first, second)


def test_a_float16_layer_near_its_limit_is_named_with_its_headroom() -> None:
    ones = torch.ones(320, 4)
    _, sink = train(fixed_linear(60_000.0), ones, lr=0.0, autocast=torch.float16)
    (event,) = [e for e in sink.events if e.kind == "overflow_risk"]
    assert event.layers == ("0",)
    assert "'0' reached 60,000, 92% of float16's max (65,504)" in event.message
    assert "bf16" in event.advice
    assert sink.scalars["gradguard/act_absmax/0"] == [(4, 60_000.0)]
    assert sink.scalars["gradguard/act_absmax/1"][0][1] == pytest.approx(60.0, rel=1e-2)


def test_headroom_is_quiet_below_the_threshold_and_in_float32() -> None:
    ones = torch.ones(320, 4)
    _, sink = train(fixed_linear(50_000.0), ones, lr=0.0, autocast=torch.float16)
    assert "overflow_risk" not in kinds(sink)
    _, sink = train(fixed_linear(60_000.0), ones, lr=0.0)
    assert "overflow_risk" not in kinds(sink)
    assert sink.scalars["gradguard/act_absmax/0"] == [(4, 60_000.0)]
    _, sink = train(fixed_linear(50_000.0), ones, lr=0.0, autocast=torch.float16, headroom=0.7)
    assert "overflow_risk" in kinds(sink)


@pytest.mark.parametrize(
    ("kwargs", "word"),
    [
        ({"input_rms_limit": 0.0}, "input_rms_limit"),
        ({"input_spread_limit": 1.0}, "input_spread_limit"),
        ({"headroom": 1.5}, "headroom"),
    ],
)
def test_bad_arguments_are_refused_at_construction(kwargs: dict[str, float], word: str) -> None:
    with pytest.raises(gg.ConfigurationError, match=word):
        gg.ActivationMonitor(**kwargs)  # type: ignore[arg-type]
