"""Small models and data shared by the tests (synthetic tensors and sklearn's bundled digits)."""

from __future__ import annotations

import itertools
from functools import lru_cache

import torch
from torch import nn

import gradguard as gg


def mlp(sizes: list[int], act: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


@lru_cache(maxsize=1)
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled 8x8 digits (1797 samples, no download), standardised."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    y = torch.tensor(data.target, dtype=torch.long)
    return x, y


def train_steps(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    steps: int,
    *,
    batch_size: int = 64,
    seed: int = 0,
) -> list[float]:
    """A plain classification loop on digits; returns the losses."""
    x, y = digits()
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (batch_size,), generator=gen)
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def separable_data() -> tuple[torch.Tensor, torch.Tensor]:
    """256 synthetic samples of 16 features in 4 linearly separable classes."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 16, generator=gen)
    y = (x @ torch.randn(16, 4, generator=gen)).argmax(1)
    return x, y


def step_metrics(step: int, grad_norms: dict[str, float | None]) -> gg.StepMetrics:
    """What a guard hands its sinks on a logging step: keyed values plus typed statistics
    (layers in the order given, ``None`` for a layer without a gradient)."""
    norms = tuple(grad_norms.values())
    total = sum(n * n for n in norms if n is not None) ** 0.5
    stats = gg.LoggedStats(
        step=step,
        sink_step=step,
        layers=tuple(grad_norms),
        total=total,
        per_layer={"grad_norm": norms, "param_norm": tuple(1.0 for _ in norms)},
        scalars={},
        present=tuple(n is not None for n in norms),
    )
    return gg.MetricKeys().flatten(stats)
