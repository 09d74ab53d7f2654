"""A zoo of small models with known gradient pathologies, and healthy ones, for detector tests.

Every case trains a tiny model on scikit-learn's bundled digits (or synthetic sequences) for
a few hundred CPU steps. Reuse it::

    from tests.zoo import CASES, run_case
    guard, sink = run_case("deep_sigmoid", activations=False)

``CASES`` maps a name to a ``Case``: how to build it, which Event kind it must produce
(``None`` for a healthy model, which must produce no warning at all) and which layers that
Event must name.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
from torch import nn

import gradguard as gg
from tests.models import digits

__all__ = ["BROKEN", "CASES", "HEALTHY", "Case", "Workload", "build", "run_case"]


@dataclass
class Workload:
    """A model, its optimizer and a function that draws the next training batch's loss."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    loss: Callable[[], torch.Tensor]


@dataclass(frozen=True)
class Case:
    """One entry of the zoo.

    ``expected`` is the Event kind the case must raise (``None``: healthy, no warning may
    fire); ``layers`` are layer names the Event must name, and ``first`` the names of which
    one must come first (the worst layer) when it is not empty.
    """

    name: str
    builder: Callable[[int], Workload]
    steps: int
    expected: str | None
    layers: tuple[str, ...] = ()
    first: tuple[str, ...] = ()
    description: str = ""


# ---------------------------------------------------------------------------- data
def _digits_loss(
    model: nn.Module,
    batch_size: int,
    seed: int,
    reshape: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Callable[[], torch.Tensor]:
    x, y = digits()
    gen = torch.Generator().manual_seed(seed)

    def loss() -> torch.Tensor:
        idx = torch.randint(0, x.shape[0], (batch_size,), generator=gen)
        inputs = x[idx] if reshape is None else reshape(x[idx])
        return nn.functional.cross_entropy(model(inputs), y[idx])

    return loss


@lru_cache(maxsize=4)
def _sequences(length: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic sequences whose class is the sign of the sum of their first 5 steps."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(512, length, 4, generator=gen)
    y = (x[:, :5, 0].sum(1) > 0).long()
    return x, y


# ---------------------------------------------------------------------------- models
def _stack(sizes: list[int], act: Callable[[], nn.Module]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


def deep_sigmoid(seed: int) -> Workload:
    """Ten sigmoid layers: each multiplies the backward signal by at most 1/4."""
    torch.manual_seed(seed)
    model = _stack([64] + [32] * 10 + [10], nn.Sigmoid)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return Workload(model, opt, _digits_loss(model, 64, seed))


def deep_linear_large_init(seed: int) -> Workload:
    """Twelve linear layers (no activation) initialised 2.5x too large."""
    torch.manual_seed(seed)
    model = _stack([64] + [32] * 12 + [10], nn.Identity)
    with torch.no_grad():
        for module in model:
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=2.5 / math.sqrt(module.in_features))
                nn.init.zeros_(module.bias)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    return Workload(model, opt, _digits_loss(model, 64, seed))


class SequenceClassifier(nn.Module):
    """Linear input projection -> tanh ``nn.RNN`` -> linear head on the last state."""

    def __init__(self, hidden: int = 16, recurrent_gain: float = 1.0) -> None:
        super().__init__()
        self.inp = nn.Linear(4, hidden)
        self.rnn = nn.RNN(hidden, hidden, batch_first=True, nonlinearity="tanh")
        self.head = nn.Linear(hidden, 2)
        with torch.no_grad():
            for name, param in self.rnn.named_parameters():
                if name == "weight_hh_l0":
                    nn.init.normal_(param, std=recurrent_gain / math.sqrt(hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        states, _ = self.rnn(self.inp(x))
        return self.head(states[:, -1])  # type: ignore[no-any-return]


def rnn_large_recurrent(seed: int) -> Workload:
    torch.manual_seed(seed)
    model = SequenceClassifier(recurrent_gain=2.5)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = _sequences(100)
    gen = torch.Generator().manual_seed(seed)

    def loss() -> torch.Tensor:
        idx = torch.randint(0, x.shape[0], (32,), generator=gen)
        return nn.functional.cross_entropy(model(x[idx]), y[idx])

    return Workload(model, opt, loss)


def dead_relu(seed: int) -> Workload:
    """A ReLU MLP whose hidden biases start at -5: most units never fire."""
    torch.manual_seed(seed)
    model = _stack([64, 64, 64, 64, 10], nn.ReLU)
    with torch.no_grad():
        for index in (0, 2, 4):
            layer = model[index]
            assert isinstance(layer, nn.Linear)
            nn.init.constant_(layer.bias, -5.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    return Workload(model, opt, _digits_loss(model, 64, seed))


def saturated_tanh(seed: int) -> Workload:
    """A tanh MLP with weights 10x their default scale: most outputs sit in the flat tails."""
    torch.manual_seed(seed)
    model = _stack([64, 64, 64, 64, 10], nn.Tanh)
    with torch.no_grad():
        for index in (0, 2, 4):
            layer = model[index]
            assert isinstance(layer, nn.Linear)
            layer.weight.mul_(10.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    return Workload(model, opt, _digits_loss(model, 64, seed))


def healthy_mlp(seed: int) -> Workload:
    """He-initialised ReLU MLP, Adam."""
    torch.manual_seed(seed)
    model = _stack([64, 128, 64, 64, 32, 10], nn.ReLU)
    for module in model:
        if isinstance(module, nn.Linear):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            nn.init.zeros_(module.bias)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    return Workload(model, opt, _digits_loss(model, 64, seed))


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
        )
        self.head = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))  # type: ignore[no-any-return]


def healthy_cnn(seed: int) -> Workload:
    """Three conv + BatchNorm + ReLU blocks on 8x8 digits, SGD with momentum."""
    torch.manual_seed(seed)
    model = SmallCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return Workload(model, opt, _digits_loss(model, 64, seed, lambda x: x.view(-1, 1, 8, 8)))


class SmallTransformer(nn.Module):
    """Digits as 8 tokens (one per image row): projection + learned positions + 2 encoder layers."""

    def __init__(self, d_model: int = 32) -> None:
        super().__init__()
        self.embed = nn.Linear(8, d_model)
        self.pos = nn.Embedding(8, d_model)
        layer = nn.TransformerEncoderLayer(
            d_model, nhead=4, dim_feedforward=64, dropout=0.0, activation="gelu", batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x.view(-1, 8, 8)) + self.pos.weight
        return self.head(self.norm(self.encoder(tokens)).mean(1))  # type: ignore[no-any-return]


def healthy_transformer(seed: int) -> Workload:
    torch.manual_seed(seed)
    model = SmallTransformer()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return Workload(model, opt, _digits_loss(model, 64, seed))


# ---------------------------------------------------------------------------- the zoo
CASES: dict[str, Case] = {
    case.name: case
    for case in [
        Case(
            "deep_sigmoid",
            deep_sigmoid,
            150,
            "vanishing",
            first=("0", "2"),
            description="10 sigmoid layers, default init",
        ),
        Case(
            "deep_linear_large_init",
            deep_linear_large_init,
            150,
            "exploding",
            description="12 linear layers, init 2.5x too large",
        ),
        Case(
            "rnn_large_recurrent",
            rnn_large_recurrent,
            150,
            "exploding",
            first=("inp", "rnn"),
            description="tanh RNN over 100 steps, recurrent gain 2.5",
        ),
        Case(
            "dead_relu",
            dead_relu,
            120,
            "dead_units",
            layers=("0", "2", "4"),
            description="ReLU MLP, hidden biases -5",
        ),
        Case(
            "saturated_tanh",
            saturated_tanh,
            120,
            "saturation",
            layers=("0", "2", "4"),
            description="tanh MLP, weights x10",
        ),
        Case("healthy_mlp", healthy_mlp, 300, None, description="He-init ReLU MLP, Adam"),
        Case("healthy_cnn", healthy_cnn, 300, None, description="CNN + BatchNorm, SGD momentum"),
        Case(
            "healthy_transformer",
            healthy_transformer,
            300,
            None,
            description="2-layer TransformerEncoder (GELU), AdamW",
        ),
    ]
}
BROKEN = tuple(name for name, case in CASES.items() if case.expected is not None)
HEALTHY = tuple(name for name, case in CASES.items() if case.expected is None)


def build(name: str, seed: int = 0) -> Workload:
    """A fresh model, optimizer and batch source for the named case."""
    return CASES[name].builder(seed)


def run_case(
    name: str, steps: int | None = None, *, seed: int = 0, **guard_kwargs: Any
) -> tuple[gg.GradGuard, gg.MemorySink]:
    """Train the named case under a GradGuard built from ``guard_kwargs`` (defaults otherwise).

    Returns the guard (still attached, so ``report()`` sees the layers) and a MemorySink
    that received every scalar and Event.
    """
    case = CASES[name]
    work = case.builder(seed)
    sink = gg.MemorySink()
    sinks = [sink, *guard_kwargs.pop("sinks", ())]
    guard = gg.attach(work.model, work.optimizer, sinks=sinks, **guard_kwargs)
    work.model.train()
    for _ in range(case.steps if steps is None else steps):
        work.optimizer.zero_grad(set_to_none=True)
        work.loss().backward()
        work.optimizer.step()
    return guard, sink
