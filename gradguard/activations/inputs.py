"""The model's inputs as its first layer reads them, over a sampled window.

At the start of a sampled pass the monitor marks the floating-point tensors handed to the
model; marks follow them through views and elementwise operations (``x.view(...)``,
``x / 255``), so the first layer to run, if it reads a marked tensor, reads the inputs. Its
per-feature sums and sums of squares (features: the last dimension, or the channels of a
convolution) accumulate on the device; ``input_metrics`` turns them into the overall mean,
std and RMS and the spread of the features' scales, which join the logging step's bulk copy.
Integer inputs (token ids) and a first layer that normalises (BatchNorm, LayerNorm...) are
not measured: there is nothing to standardise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .._dist import is_dtensor
from .._layers import NORMALISATION_LAYERS
from .._stats import INPUT_MEAN, INPUT_RMS, INPUT_SPREAD, INPUT_STD

__all__ = ["INPUT_TRACK", "InputStats", "input_metrics", "reads_normalised"]

# The producer-map layer name that marks "the model's inputs" (never a real layer's name).
INPUT_TRACK = ""


def reads_normalised(module: nn.Module) -> bool:
    """The module normalises what it reads: inputs reaching it first need no advice."""
    return isinstance(module, NORMALISATION_LAYERS)


@dataclass
class InputStats:
    """Per-feature sums over a window, on the device."""

    layer: str
    features: int
    sums: torch.Tensor
    squares: torch.Tensor
    count: int  # samples per feature

    @classmethod
    def of(cls, layer: str, module: nn.Module, x: torch.Tensor) -> InputStats | None:
        if not x.is_floating_point() or is_dtensor(x) or x.ndim == 0 or x.numel() == 0:
            return None
        dim = x.ndim - 1
        if isinstance(module, nn.modules.conv._ConvNd):
            dim = max(x.ndim - len(module.kernel_size) - 1, 0)
        dims = tuple(d for d in range(x.ndim) if d != dim)
        values = x.detach().float()
        if dims:
            sums = values.sum(dim=dims)
            squares = torch.linalg.vector_norm(values, 2, dim=dims).square()
        else:
            sums, squares = values.clone(), values.square()
        return cls(layer, int(x.shape[dim]), sums, squares, x.numel() // int(x.shape[dim]))

    def add(self, other: InputStats) -> None:
        if other.layer == self.layer and other.features == self.features:
            self.sums = self.sums + other.sums.to(self.sums.device)
            self.squares = self.squares + other.squares.to(self.squares.device)
            self.count += other.count


def input_metrics(stats: InputStats, device: torch.device) -> dict[str, torch.Tensor]:
    """Mean, std, RMS over every input value, and the 90th / 10th percentile ratio of the
    features' RMS (features that are always 0 left out; with fewer than 10 features, such
    as an image's channels, the largest over the smallest), as 0-d device tensors."""
    total = float(stats.count * stats.features)
    mean = stats.sums.sum() / total
    mean_square = stats.squares.sum() / total
    feature_rms = (stats.squares / stats.count).sqrt()
    alive = feature_rms > feature_rms.max() * 1e-6
    scales = torch.where(alive, feature_rms, torch.full_like(feature_rms, float("nan")))
    high, low = (0.9, 0.1) if stats.features >= 10 else (1.0, 0.0)
    spread = torch.nanquantile(scales, high) / torch.nanquantile(scales, low)
    return {
        INPUT_MEAN: mean.to(device),
        INPUT_STD: (mean_square - mean.square()).clamp_min(0.0).sqrt().to(device),
        INPUT_RMS: mean_square.sqrt().to(device),
        INPUT_SPREAD: spread.to(device),
    }
