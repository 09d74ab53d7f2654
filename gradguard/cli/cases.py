"""The demo's cases: scikit-learn's bundled digits, and for each problem a broken model and
the same model fixed the way gradguard's advice says."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

import torch
from torch import nn

from .._errors import MissingDependencyError

__all__ = ["CASES", "Builder", "DemoCase", "Digits", "load_digits_split"]

Digits = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
Builder = Callable[[int], tuple[nn.Module, torch.optim.Optimizer]]


# ---------------------------------------------------------------------------- data
def load_digits_split(test_fraction: float = 0.2) -> Digits:
    """scikit-learn's bundled digits as (x_train, y_train, x_test, y_test), standardised.

    The split is fixed (it does not depend on the demo's seed), so runs compare alike.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise MissingDependencyError("scikit-learn", "demo") from error
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32)
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(12345))
    n_test = round(x.shape[0] * test_fraction)
    test, train = order[:n_test], order[n_test:]
    mean, std = x[train].mean(0), x[train].std(0) + 1e-6
    x = (x - mean) / std
    return x[train], y[train], x[test], y[test]


# ---------------------------------------------------------------------------- models
def _mlp(sizes: list[int], activation: Callable[[], nn.Module]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(pairwise(sizes)):
        layers.append(nn.Linear(fan_in, fan_out))
        if i < len(sizes) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)


def _linears(model: nn.Module) -> Iterator[nn.Linear]:
    return (m for m in model.modules() if isinstance(m, nn.Linear))


def _he_init(model: nn.Module) -> nn.Module:
    """He (Kaiming) normal weights for ReLU layers, zero biases."""
    with torch.no_grad():
        for linear in _linears(model):
            nn.init.kaiming_normal_(linear.weight, nonlinearity="relu")
            nn.init.zeros_(linear.bias)
    return model


DEEP = [64] + [32] * 10 + [10]


def vanishing_broken(seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = _mlp(DEEP, nn.Sigmoid)
    return model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)


def vanishing_fixed(seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = _he_init(_mlp(DEEP, nn.ReLU))
    return model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)


DEAD = [64, 128, 128, 128, 10]
DEAD_BIAS = -1.5


def dead_broken(seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = _mlp(DEAD, nn.ReLU)
    with torch.no_grad():
        for linear in list(_linears(model))[:-1]:
            nn.init.constant_(linear.bias, DEAD_BIAS)
    return model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


def dead_fixed(seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = _he_init(_mlp(DEAD, nn.ReLU))
    return model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


EXPLODING = [64] + [64] * 8 + [10]
EXPLODING_GAIN = 3.0


def exploding_broken(seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = _mlp(EXPLODING, nn.ReLU)
    with torch.no_grad():
        for linear in _linears(model):
            # EXPLODING_GAIN times the He scale: every layer multiplies the signal (forward)
            # and the gradient (backward) by about EXPLODING_GAIN.
            nn.init.normal_(linear.weight, std=EXPLODING_GAIN * math.sqrt(2.0 / linear.in_features))
    # Adam bounds each update, so the weights do not turn NaN at once: the model trains on,
    # badly, with gradients 10^4 times their healthy size.
    return model, torch.optim.Adam(model.parameters(), lr=1e-3)


def exploding_fixed(seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = _he_init(_mlp(EXPLODING, nn.ReLU))
    return model, torch.optim.Adam(model.parameters(), lr=1e-3)


@dataclass(frozen=True)
class DemoCase:
    """One problem: how to build the broken and the fixed model, and what differs."""

    name: str
    problem: str
    broken: str
    fixed: str
    build_broken: Builder
    build_fixed: Builder
    fixed_guard_kwargs: dict[str, Any] = field(default_factory=dict)


CASES: dict[str, DemoCase] = {
    "vanishing": DemoCase(
        name="vanishing",
        problem="vanishing gradients",
        broken=(
            "10 hidden layers of 32 sigmoid units, PyTorch's default init, "
            "SGD(lr=0.01, momentum=0.9)"
        ),
        fixed="the same 10 hidden layers with ReLU and He (Kaiming) init, same optimizer",
        build_broken=vanishing_broken,
        build_fixed=vanishing_fixed,
    ),
    "dead": DemoCase(
        name="dead",
        problem="dead ReLU units",
        broken=(
            f"3 hidden ReLU layers of 128 units whose biases start at {DEAD_BIAS}, "
            "SGD(lr=0.05, momentum=0.9)"
        ),
        fixed="the same layers with He init and zero biases, same optimizer",
        build_broken=dead_broken,
        build_fixed=dead_fixed,
    ),
    "exploding": DemoCase(
        name="exploding",
        problem="exploding gradients",
        broken=(
            f"8 hidden ReLU layers of 64 units initialised {EXPLODING_GAIN:g}x too large, "
            "Adam(lr=1e-3)"
        ),
        fixed="the same layers with He init, same optimizer",
        build_broken=exploding_broken,
        build_fixed=exploding_fixed,
    ),
}
