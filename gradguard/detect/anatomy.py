"""What a model is made of, as the gradient-flow detector needs it: which layers have
depth (weight matrices, not lookup tables or normalisation), how many units each has, and
the traits its advice depends on (saturating activations, ReLUs, recurrence, normalisation).
Shapes and module types only: no tensor is read."""

from __future__ import annotations

from typing import Any

from torch import nn

from .._layers import NORMALISATION_LAYERS, LayerLayout

__all__ = ["anatomy", "is_weight_layer"]

_WEIGHT_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Bilinear,
    nn.modules.conv._ConvNd,
    nn.RNNBase,
    nn.RNNCellBase,
    nn.MultiheadAttention,
)
_NO_DEPTH_TYPES: tuple[type[nn.Module], ...] = (
    nn.Embedding,
    nn.EmbeddingBag,
    *NORMALISATION_LAYERS,
)
_NORM_TYPES = NORMALISATION_LAYERS
_SATURATING_TYPES: tuple[type[nn.Module], ...] = (
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardtanh,
    nn.Softsign,
    nn.Hardsigmoid,
)
_RELU_TYPES: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.RReLU,
    nn.ELU,
    nn.CELU,
    nn.SELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
)
# Names that mark a custom module's matrix as a lookup table rather than a layer with depth.
_TABLE_WORDS = ("embed", "pos", "token", "cls")


def is_weight_layer(module: nn.Module, owned: list[tuple[str, int]]) -> bool:
    """``owned``: (parameter name, ndim) of the parameters this layer owns and trains."""
    if isinstance(module, _NO_DEPTH_TYPES):
        return False
    if isinstance(module, _WEIGHT_TYPES):
        return any(ndim >= 2 for _, ndim in owned)
    return any(
        ndim >= 2 and not any(word in name.lower() for word in _TABLE_WORDS) for name, ndim in owned
    )


def anatomy(layout: LayerLayout, model: nn.Module) -> tuple[dict[str, int], dict[str, Any]]:
    """The weight layers with their unit counts (rows), and the model's static traits."""
    owned: dict[str, list[tuple[str, int]]] = {}
    rows: dict[str, int] = {}
    for param, index, qualified in zip(layout.params, layout.param_layer, layout.param_names):
        name = layout.names[index]
        owned.setdefault(name, []).append((qualified.rsplit(".", 1)[-1], param.ndim))
        if param.ndim >= 2:
            rows[name] = rows.get(name, 0) + int(param.shape[0])
    weight_rows = {
        name: rows.get(name, 1)
        for name, params in owned.items()
        if is_weight_layer(layout.modules.get(name, model), params)
    }
    modules = list(model.modules())
    saturating = sorted(
        {
            type(m).__name__
            for m in modules
            if isinstance(m, _SATURATING_TYPES) and not isinstance(m, nn.ReLU6)
        }
    )
    recurrent = next(
        (type(m).__name__ for m in modules if isinstance(m, (nn.RNNBase, nn.RNNCellBase))), None
    )
    if recurrent == "RNNCell":
        recurrent = "RNN"
    traits = {
        "saturating": tuple(saturating),
        "relu_family": any(isinstance(m, _RELU_TYPES) for m in modules),
        "recurrent": recurrent,
        "normalised": any(isinstance(m, _NORM_TYPES) for m in modules),
    }
    return weight_rows, traits
