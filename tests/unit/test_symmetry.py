"""SymmetryDetector: layers whose units all have the same incoming weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradguard as gg
from tests.models import digits, mlp


def train(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    steps: int,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    **options: object,
) -> tuple[gg.GradGuard, gg.MemorySink]:
    x, y = digits()
    sink = gg.MemorySink()
    options.setdefault("log_every_n_steps", 5)
    options.setdefault("activations", False)
    guard = gg.attach(model, opt, sinks=[sink], warn=False, **options)  # type: ignore[arg-type]
    for step in range(steps):
        batch = slice((step * 64) % 1700, (step * 64) % 1700 + 64)
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()
    return guard, sink


def constant_mlp(value: float = 0.05) -> nn.Sequential:
    model = mlp([64, 32, 32, 32, 10])
    for module in model:
        if isinstance(module, nn.Linear):
            nn.init.constant_(module.weight, value)
            nn.init.zeros_(module.bias)
    return model


def test_constant_init_names_every_hidden_layer_and_gives_the_init_remedy() -> None:
    model = constant_mlp()
    guard, sink = train(model, torch.optim.SGD(model.parameters(), lr=0.1), 12)
    (event,) = [e for e in sink.events if e.kind == "symmetric_units"]
    # The hidden layers' units stay identical; the head's rows differ (different targets).
    assert set(event.layers) == {"0", "2", "4"}
    assert event.step == 5  # the second check (steps 0 and 5) confirms it
    assert event.value < 1e-5
    assert "Symmetric units" in event.message and "32 units" in event.message
    assert "constant" in event.advice and "He (nn.init.kaiming_normal_)" in event.advice
    assert "symmetric units" in guard.report()


def test_zero_weights_read_as_all_zero_and_tanh_nets_get_xavier_first() -> None:
    torch.manual_seed(0)
    model = mlp([64, 32, 32, 10], nn.Tanh)
    nn.init.zeros_(model[2].weight)
    nn.init.zeros_(model[2].bias)
    # Two zero layers in a row: neither gets a weight gradient, both stay at zero.
    nn.init.zeros_(model[4].weight)
    _, sink = train(model, torch.optim.SGD(model.parameters(), lr=0.1), 12)
    (event,) = [e for e in sink.events if e.kind == "symmetric_units"]
    assert set(event.layers) == {"2", "4"}
    assert "'2' (32 units, all zero)" in event.message
    assert event.advice.index("Xavier") < event.advice.index(" for tanh")


def test_a_zero_init_layer_that_its_gradient_breaks_is_not_reported() -> None:
    # A zero-initialised classifier head (as some ViT recipes do): its rows differ after
    # the first update, even under a warm-up that starts the learning rate at 0.
    torch.manual_seed(0)
    model = mlp([64, 64, 10])
    nn.init.zeros_(model[2].weight)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: step / 10)
    _, sink = train(model, opt, 20, warmup)
    assert sink.events == []
    spreads = sink.scalars["gradguard/unit_spread/2"]
    assert spreads[0][1] == 0.0  # step 0 did not move it (lr 0): not counted as evidence
    assert spreads[1][1] > 0.5


def test_measures_only_the_first_checks_and_resumes_where_it_stopped() -> None:
    torch.manual_seed(0)
    model = mlp([64, 32, 10])
    guard, sink = train(model, torch.optim.SGD(model.parameters(), lr=0.05), 30)
    steps = [step for step, _ in sink.scalars["gradguard/unit_spread/0"]]
    assert steps == [0, 5, 10]  # three checks, then nothing: no cost afterwards
    assert min(v for _, v in sink.scalars["gradguard/unit_spread/0"]) > 0.9
    state = guard.state_dict()
    guard.detach()

    sink2 = gg.MemorySink()
    fresh = gg.GradGuard(sinks=[sink2], log_every_n_steps=5, activations=False, warn=False)
    fresh.load_state_dict(state)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    fresh.attach(model, opt)
    x, y = digits()
    for _ in range(6):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[:64]), y[:64]).backward()
        opt.step()
    assert "gradguard/grad_norm_total" in sink2.scalars
    assert not any("unit_spread" in key for key in sink2.scalars)


def test_nan_weights_are_not_mistaken_for_identical_units() -> None:
    torch.manual_seed(0)
    model = mlp([64, 32, 10])
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    _, sink = train(model, torch.optim.SGD(model.parameters(), lr=0.0), 12)
    assert [e.kind for e in sink.events if e.kind == "symmetric_units"] == []
    assert "gradguard/unit_spread/0" not in sink.scalars


@pytest.mark.parametrize(
    ("kwargs", "word"),
    [
        ({"threshold": 0.0}, "threshold"),
        ({"threshold": 2.0}, "threshold"),
        ({"checks": 1, "patience": 2}, "patience"),
        ({"max_rows": 1}, "max_rows"),
    ],
)
def test_bad_arguments_are_refused_at_construction(kwargs: dict[str, float], word: str) -> None:
    with pytest.raises(gg.ConfigurationError, match=word):
        gg.SymmetryDetector(**kwargs)  # type: ignore[arg-type]
