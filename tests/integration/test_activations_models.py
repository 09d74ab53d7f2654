"""Activation health on real models trained on digits: pathologies found, healthy nets quiet."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradguard as gg
from tests.models import mlp, train_steps

ACTIVATION_KINDS = {"dead_units", "saturation"}


def train(
    model: nn.Module,
    steps: int,
    *,
    optimizer: Callable[..., torch.optim.Optimizer] = torch.optim.Adam,
    lr: float = 1e-3,
    every_n_steps: int = 10,
) -> tuple[gg.GradGuard, gg.MemorySink, list[float]]:
    opt = optimizer(model.parameters(), lr=lr)
    sink = gg.MemorySink()
    guard = gg.attach(
        model,
        opt,
        sinks=[sink],
        log_every_n_steps=5,
        activations=gg.ActivationMonitor(every_n_steps=every_n_steps),
        warn=False,
    )
    losses = train_steps(model, opt, steps)
    guard.detach()
    return guard, sink, losses


def activation_events(guard: gg.GradGuard, kind: str | None = None) -> list[gg.Event]:
    kinds = {kind} if kind else ACTIVATION_KINDS
    return [e for e in guard.events if e.kind in kinds]


def biases_minus_five(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                module.bias.fill_(-5.0)
    return model


def weights_times_five(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                module.weight.mul_(5.0)
    return model


class FunctionalMLP(nn.Module):
    """The same MLP with activations written inside forward, three spellings of each."""

    def __init__(self, act: str) -> None:
        super().__init__()
        self.act = act
        self.fc1 = nn.Linear(64, 64)
        self.fc2 = nn.Linear(64, 64)
        self.out = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act == "relu":
            x = F.relu(self.fc1(x))
            x = self.fc2(x).relu()
        else:
            x = torch.tanh(self.fc1(x))
            x = self.fc2(x).tanh()
        return self.out(x)


@pytest.mark.parametrize(
    ("make", "first", "second"),
    [
        (lambda: mlp([64, 64, 64, 10]), "0", "2"),
        (lambda: FunctionalMLP("relu"), "fc1", "fc2"),
    ],
    ids=["modules", "functional"],
)
def test_relu_mlp_with_negative_biases_has_dead_units(
    make: Callable[[], nn.Module], first: str, second: str
) -> None:
    torch.manual_seed(0)
    model = biases_minus_five(make())
    guard, sink, _ = train(model, 25)
    (event,) = activation_events(guard)  # one Event for the whole persisting episode
    assert event.kind == "dead_units" and event.severity == "warning"
    assert set(event.layers) == {first, second}
    assert event.layers[0] == second  # fully dead: worst first
    assert event.details["dead_units"][second] == 64
    assert event.details["units"] == {first: 64, second: 64}
    assert event.details["dead_units"][first] >= 48
    assert event.value == 1.0
    assert f"'{second}' 64 of 64 (100%)" in event.message
    assert "mean bias of -5" in event.advice and "He init" in event.advice
    assert sink.latest(f"gradguard/dead_fraction/{second}") == 1.0


@pytest.mark.parametrize(
    ("make", "layers"),
    [
        (lambda: mlp([64, 64, 64, 10], nn.Tanh), {"0", "2"}),
        (lambda: FunctionalMLP("tanh"), {"fc1", "fc2"}),
    ],
    ids=["modules", "functional"],
)
def test_tanh_mlp_with_large_weights_saturates(
    make: Callable[[], nn.Module], layers: set[str]
) -> None:
    torch.manual_seed(0)
    model = weights_times_five(make())
    guard, sink, _ = train(model, 25)
    (event,) = activation_events(guard)
    assert event.kind == "saturation"
    assert set(event.layers) == layers
    assert event.value == max(event.details["fractions"].values()) > 0.25
    assert "tanh" in event.message
    assert "Xavier" in event.advice
    for layer in layers:  # the first window (read at step 5) is the one that fired
        assert sink.scalars[f"gradguard/saturation/{layer}"][0] == (
            5,
            event.details["fractions"][layer],
        )


def test_units_killed_by_a_huge_learning_rate_get_learning_rate_advice() -> None:
    torch.manual_seed(0)
    model = mlp([64, 128, 128, 10])

    def sgd(params: object, lr: float) -> torch.optim.Optimizer:
        return torch.optim.SGD(params, lr=lr, momentum=0.9)  # type: ignore[arg-type]

    guard, sink, losses = train(model, 45, optimizer=sgd, lr=1.0)
    (event,) = activation_events(guard)
    assert event.kind == "dead_units" and event.layers == ("2",)
    assert "of '2' was dead in the window at step 10" in event.advice
    assert "lower the learning rate" in event.advice
    assert "bias" not in event.advice  # not an initialisation problem
    assert sink.scalars["gradguard/dead_fraction/2"][0][1] < 0.1  # alive at first
    assert losses[-1] > 2.0  # and the model indeed stopped learning


class DigitsCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
        )
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x.view(-1, 1, 8, 8)).flatten(1))


class DigitsTransformer(nn.Module):
    """Each digit as 8 tokens (its rows) of 8 pixels."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 32)
        layer = nn.TransformerEncoderLayer(
            32, nhead=4, dim_feedforward=64, dropout=0.0, activation="gelu", batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x.view(-1, 8, 8))).mean(1))


def he_relu_mlp() -> nn.Module:
    model = mlp([64, 128, 128, 10])
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            nn.init.zeros_(module.bias)
    return model


def xavier_tanh_mlp() -> nn.Module:
    model = mlp([64, 128, 128, 10], nn.Tanh)
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            nn.init.zeros_(module.bias)
    return model


@pytest.mark.parametrize(
    ("make", "lr", "watched"),
    [
        (he_relu_mlp, 1e-3, "dead_fraction/2"),
        (DigitsCNN, 1e-2, "dead_fraction/features.4"),  # ReLU after an affine BatchNorm
        (DigitsTransformer, 1e-3, "dead_fraction/encoder.layers.1.linear1"),  # GELU
        (xavier_tanh_mlp, 1e-3, "saturation/2"),
    ],
    ids=["he-relu-mlp", "cnn-batchnorm", "transformer-gelu", "xavier-tanh-mlp"],
)
def test_healthy_models_raise_no_activation_event(
    make: Callable[[], nn.Module], lr: float, watched: str
) -> None:
    torch.manual_seed(0)
    guard, sink, losses = train(make(), 60, lr=lr)
    assert activation_events(guard) == []
    assert losses[-1] < losses[0] * 0.8  # it trained
    values = [v for _, v in sink.scalars[f"gradguard/{watched}"]]
    assert len(values) == 6  # windows at steps 0, 10, ..., 50, each read once
    assert max(values) < 0.2


@pytest.mark.filterwarnings("ignore:.*isinstance.treespec, LeafSpec.*:FutureWarning")  # lightning
def test_lightning_module_calling_its_submodule_is_sampled(tmp_path: Path) -> None:
    # DigitsModule.training_step calls self.net(x): the LightningModule's own forward never
    # runs, so each optimizer step counts as one sampled pass.
    pytest.importorskip("lightning")
    from gradguard.integrations.lightning import GradGuardCallback

    from tests.integration.lightning_kit import DigitsModule, digits_loader, trainer

    module = DigitsModule(lr=1e-3)
    biases_minus_five(module.net)
    sink = gg.MemorySink()
    callback = GradGuardCallback(
        activations=gg.ActivationMonitor(every_n_steps=5),
        log_every_n_steps=5,
        sinks=[sink],
        warn=False,
    )
    trainer(tmp_path, max_steps=12, callbacks=[callback]).fit(module, digits_loader())
    (event,) = activation_events(callback.guard)
    assert event.kind == "dead_units" and event.layers == ("net.0",)
    assert event.details["forward_passes"] == 4
    assert sink.latest("gradguard/dead_fraction/net.0") == 1.0
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in module.modules())
