"""Which parameters gradguard watches, grouped into named layers in depth order.

A layer is a module that owns, directly, parameters that the optimizer holds and that
require grad; it is named by its qualified name (``root`` for the root module's own).
``WatchedSet`` notices when that set changes during training (a layer unfrozen, a param
group added) at the cost of a few attribute reads per step, so the guard re-resolves its
layout then, and only then.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from ._errors import ConfigurationError

__all__ = [
    "NORMALISATION_LAYERS",
    "ROOT_LAYER",
    "LayerLayout",
    "WatchedSet",
    "discover_layers",
    "merge_depth_order",
]

# Modules that normalise what they read (RMSNorm where this torch has it).
NORMALISATION_LAYERS: tuple[type[nn.Module], ...] = tuple(
    t
    for t in (
        nn.modules.batchnorm._NormBase,
        nn.LayerNorm,
        nn.GroupNorm,
        nn.LocalResponseNorm,
        getattr(nn, "RMSNorm", None),
    )
    if isinstance(t, type)
)

ROOT_LAYER = "root"


@dataclass
class LayerLayout:
    """The watched parameters and the layer each belongs to.

    ``names`` is in depth order, input first: module registration order at first, then the
    order in which the layers first ran in a training forward pass (see ``_depth.py``).
    """

    names: list[str]
    params: list[torch.Tensor]
    param_layer: list[int]
    param_names: list[str]
    modules: dict[str, nn.Module] = field(default_factory=dict)
    depth_known: bool = False

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


def _held(optimizer: torch.optim.Optimizer) -> Iterable[torch.Tensor]:
    for group in optimizer.param_groups:
        yield from group["params"]


def discover_layers(model: nn.Module, optimizer: torch.optim.Optimizer) -> LayerLayout:
    """Modules that own trainable parameters the optimizer holds, by qualified name."""
    if not isinstance(model, nn.Module):
        raise ConfigurationError.bad_value("model", model, "expected a torch.nn.Module")
    if not isinstance(optimizer, torch.optim.Optimizer):
        hint = ""
        if hasattr(optimizer, "optimizer") and isinstance(
            optimizer.optimizer, torch.optim.Optimizer
        ):
            hint = (
                f"; {type(optimizer).__name__} wraps a torch optimizer: pass "
                "optimizer.optimizer (the wrapper calls its step)"
            )
        raise ConfigurationError.bad_value(
            "optimizer", optimizer, "expected a torch.optim.Optimizer" + hint
        )
    held = {id(p) for p in _held(optimizer)}
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
        model_params = {id(p) for p in model.parameters()}
        if any(id(p) in model_params for p in _held(optimizer)):
            # Gradual unfreezing that starts with everything frozen: say so, and what works.
            raise ConfigurationError(
                f"every parameter of model={type(model).__name__} that "
                f"optimizer={type(optimizer).__name__} holds is frozen (requires_grad=False): "
                "gradguard needs at least one trainable parameter at attach. Attach once the "
                "first layer is unfrozen; layers unfrozen after that are picked up on their own"
            )
        raise ConfigurationError(
            f"optimizer={type(optimizer).__name__} holds none of the trainable parameters of "
            f"model={type(model).__name__}: pass the model whose parameters the optimizer updates "
            "(and make sure they require grad)"
        )
    return LayerLayout(names, params, param_layer, param_names, modules)


def merge_depth_order(known: list[str], names: list[str]) -> list[str]:
    """``names`` ordered as ``known`` where known, the others kept next to their
    registration-order neighbours (used when layers join after the depth was learnt)."""
    rank = {name: i for i, name in enumerate(known)}
    ordered: list[str] = [name for name in known if name in set(names)]
    for index, name in enumerate(names):
        if name in rank:
            continue
        # Insert right after the nearest earlier registration neighbour already placed.
        after = next((n for n in reversed(names[:index]) if n in ordered), None)
        ordered.insert(ordered.index(after) + 1 if after is not None else 0, name)
    return ordered


class WatchedSet:
    """Notices, cheaply, when the optimizer's trainable parameters are no longer the
    layout's: a param group added or changed, or a held parameter that was frozen at
    attach now receiving gradients.

    ``changed()`` costs one pass over the param groups and over the idle parameters (held
    but frozen), with no device work.
    """

    def __init__(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, layout: LayerLayout
    ) -> None:
        watched = {id(p) for p in layout.params}
        owned = {id(p) for p in model.parameters()}
        self._optimizer = optimizer
        self._lengths = [len(g["params"]) for g in optimizer.param_groups]
        self.idle = [p for p in _held(optimizer) if id(p) not in watched and id(p) in owned]
        self.unowned = sum(1 for p in _held(optimizer) if id(p) not in owned)

    def changed(self) -> bool:
        groups = self._optimizer.param_groups
        if len(groups) != len(self._lengths):
            return True
        for group, length in zip(groups, self._lengths):
            if len(group["params"]) != length:
                return True
        for param in self.idle:  # noqa: SIM110 - a plain loop: this runs every step
            if param.grad is not None:
                return True
        return False
