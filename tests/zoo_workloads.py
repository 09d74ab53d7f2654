"""The zoo's workloads: a model, its optimizer and its data, for each case of ``zoo.py``.

Pathologies on scikit-learn's bundled digits and synthetic sequences; healthy models from a
small MLP to the real architectures of ``zoo_real.py``, each with its usual recipe.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import nn

from tests.models import digits
from tests.zoo_real import CharLSTM, NanoGPT, ResNet, ViT, char_windows, warmup

__all__ = ["Workload"]


@dataclass
class Workload:
    """A model, its optimizer and a function that draws the next training batch's loss."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    loss: Callable[[], torch.Tensor]
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None


# ---------------------------------------------------------------------------- data
def _digits_loss(
    model: nn.Module,
    batch_size: int,
    seed: int,
    reshape: Callable[[torch.Tensor], torch.Tensor] | None = None,
    data: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> Callable[[], torch.Tensor]:
    x, y = digits() if data is None else data
    gen = torch.Generator().manual_seed(seed)

    def loss() -> torch.Tensor:
        idx = torch.randint(0, x.shape[0], (batch_size,), generator=gen)
        inputs = x[idx] if reshape is None else reshape(x[idx])
        return nn.functional.cross_entropy(model(inputs), y[idx])

    return loss


@lru_cache(maxsize=1)
def raw_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """The digits as 0-255 grey levels (sklearn stores 0-16), not standardised."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) * (255.0 / 16.0)
    return x, torch.tensor(data.target, dtype=torch.long)


@lru_cache(maxsize=1)
def mixed_scale_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """Standardised digits whose 64 features are rescaled by 10^-3 .. 10^1 (in a shuffled
    order), like tabular data mixing ratios, counts and amounts: RMS ~2, but feature scales
    spread over four orders of magnitude."""
    x, y = digits()
    gen = torch.Generator().manual_seed(0)
    scales = (
        10.0 ** torch.linspace(-3.0, 1.0, x.shape[1])[torch.randperm(x.shape[1], generator=gen)]
    )
    return x * scales, y


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


def constant_init(seed: int) -> Workload:
    """A ReLU MLP whose weights all start at 0.05 (biases: PyTorch's default), Adam lr 1e-2.

    Every hidden unit of a layer computes the same function; the units later die together,
    which the dead-unit advice used to blame on the learning rate."""
    torch.manual_seed(seed)
    model = _stack([64, 64, 64, 64, 10], nn.ReLU)
    for module in model:
        if isinstance(module, nn.Linear):
            nn.init.constant_(module.weight, 0.05)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    return Workload(model, opt, _digits_loss(model, 64, seed))


def raw_pixels(seed: int) -> Workload:
    """A ReLU MLP fed 0-255 grey levels as they are, Adam lr 1e-3 (it even trains)."""
    torch.manual_seed(seed)
    model = _stack([64, 128, 64, 10], nn.ReLU)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    return Workload(model, opt, _digits_loss(model, 64, seed, data=raw_digits()))


def mixed_feature_scales(seed: int) -> Workload:
    """A ReLU MLP on features whose scales span 10^-3 .. 10^1, Adam lr 1e-3."""
    torch.manual_seed(seed)
    model = _stack([64, 128, 64, 10], nn.ReLU)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    return Workload(model, opt, _digits_loss(model, 64, seed, data=mixed_scale_digits()))


def tanh_adam_high_lr(seed: int) -> Workload:
    """Eight tanh layers of 32 units under Adam at lr 0.05 (50x its usual 1e-3): the weights
    triple, the units saturate, the gradient vanishes and the loss goes back up."""
    torch.manual_seed(seed)
    model = _stack([64] + [32] * 8 + [10], nn.Tanh)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    return Workload(model, opt, _digits_loss(model, 32, seed))


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


def _images(x: torch.Tensor) -> torch.Tensor:
    return x.view(-1, 1, 8, 8)


def _lm_loss(
    model: nn.Module, context: int, batch_size: int, seed: int
) -> Callable[[], torch.Tensor]:
    draw = char_windows(context, batch_size, seed)

    def loss() -> torch.Tensor:
        inputs, targets = draw()
        logits = model(inputs)
        return nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
        )

    return loss


def healthy_gpt(seed: int) -> Workload:
    """nanoGPT's recipe: AdamW(lr 1e-3, betas 0.9/0.95, wd 0.1 on matrices), 30 warm-up steps."""
    torch.manual_seed(seed)
    model = NanoGPT()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
        lr=1e-3,
        betas=(0.9, 0.95),
    )
    return Workload(model, opt, _lm_loss(model, 32, 16, seed), warmup(opt, 30))


def healthy_resnet(seed: int) -> Workload:
    """ResNet recipe: SGD(lr 0.1, Nesterov momentum 0.9, weight decay 5e-4)."""
    torch.manual_seed(seed)
    model = ResNet()
    opt = torch.optim.SGD(
        model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4
    )
    return Workload(model, opt, _digits_loss(model, 64, seed, _images))


def healthy_lstm(seed: int) -> Workload:
    """char-rnn recipe: Adam(lr 2e-3), 32-character windows."""
    torch.manual_seed(seed)
    model = CharLSTM()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    return Workload(model, opt, _lm_loss(model, 32, 16, seed))


def healthy_vit(seed: int) -> Workload:
    """ViT recipe: AdamW(lr 1e-3, weight decay 0.05), 20 warm-up steps."""
    torch.manual_seed(seed)
    model = ViT()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    return Workload(model, opt, _digits_loss(model, 64, seed, _images), warmup(opt, 20))
