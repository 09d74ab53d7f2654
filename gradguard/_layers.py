"""Which parameters gradguard watches, grouped into named layers in depth order."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from ._errors import ConfigurationError

__all__ = ["ROOT_LAYER", "LayerLayout", "discover_layers"]

ROOT_LAYER = "root"


@dataclass
class LayerLayout:
    """The watched parameters and the layer each belongs to.

    ``names`` is in depth order, input first. It starts as module registration order and is
    replaced by the reverse of the order in which layers received gradients in the first
    backward pass (see ``GradGuard``), which is the true depth for models whose
    ``__init__`` registers modules out of order.
    """

    names: list[str]
    params: list[torch.Tensor]
    param_layer: list[int]
    param_names: list[str]
    modules: dict[str, nn.Module] = field(default_factory=dict)
    depth_from_backward: bool = False

    @property
    def num_layers(self) -> int:
        return len(self.names)

    def reorder(self, names_in_depth_order: list[str]) -> None:
        """Put layers in a new order (a permutation of ``names``), remapping every index."""
        if sorted(names_in_depth_order) != sorted(self.names):
            raise ValueError("reorder needs a permutation of the layer names")
        position = {name: i for i, name in enumerate(names_in_depth_order)}
        self.param_layer = [position[self.names[i]] for i in self.param_layer]
        self.names = list(names_in_depth_order)


def _optimizer_params(optimizer: torch.optim.Optimizer) -> Iterable[torch.Tensor]:
    for group in optimizer.param_groups:
        yield from group["params"]


def discover_layers(model: nn.Module, optimizer: torch.optim.Optimizer) -> LayerLayout:
    """Modules that own trainable parameters the optimizer holds, by qualified name."""
    if not isinstance(model, nn.Module):
        raise ConfigurationError.bad_value("model", model, "expected a torch.nn.Module")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ConfigurationError.bad_value(
            "optimizer", optimizer, "expected a torch.optim.Optimizer"
        )
    held = {id(p) for p in _optimizer_params(optimizer)}
    seen: set[int] = set()
    names: list[str] = []
    params: list[torch.Tensor] = []
    param_layer: list[int] = []
    param_names: list[str] = []
    modules: dict[str, nn.Module] = {}
    for module_name, module in model.named_modules():
        layer_name = module_name or ROOT_LAYER
        owned = [
            (pname, p)
            for pname, p in module.named_parameters(recurse=False)
            if p.requires_grad and id(p) in held and id(p) not in seen
        ]
        if not owned:
            continue
        index = len(names)
        names.append(layer_name)
        modules[layer_name] = module
        for pname, p in owned:
            seen.add(id(p))
            params.append(p)
            param_layer.append(index)
            param_names.append(f"{module_name}.{pname}" if module_name else pname)
    if not params:
        raise ConfigurationError(
            f"optimizer={type(optimizer).__name__} holds none of the trainable parameters of "
            f"model={type(model).__name__}: pass the model whose parameters the optimizer updates "
            "(and make sure they require grad)"
        )
    return LayerLayout(names, params, param_layer, param_names, modules)
