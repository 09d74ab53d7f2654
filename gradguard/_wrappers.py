"""The model and optimizer beneath the wrappers frameworks put around them.

Layers are named as the user's model names them (``encoder.layers.0``), not as a wrapper
does (``module.encoder.layers.0`` under DDP, ``_forward_module.`` under Fabric,
``_orig_mod.`` under ``torch.compile``), and the optimizer gradguard hooks is the torch
optimizer that really steps: ``accelerate``'s ``AcceleratedOptimizer`` cannot take step
hooks, and Fabric's and Lightning's wrappers forward to the inner one anyway.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["compile_wrapper", "unwrap_model", "unwrap_optimizer"]

# Wrapper class name -> the attribute holding the wrapped module.
_MODEL_WRAPPERS = {
    "DistributedDataParallel": "module",
    "DataParallel": "module",
    "_FabricModule": "module",
    "OptimizedModule": "_orig_mod",
}


def _wrapper_chain(model: nn.Module) -> list[nn.Module]:
    """``model`` and every module it wraps, outermost first (wrappers nest: Fabric around a
    compiled model around DDP...)."""
    chain = [model]
    for _ in range(8):
        attribute = _MODEL_WRAPPERS.get(type(chain[-1]).__name__)
        inner = getattr(chain[-1], attribute, None) if attribute else None
        if not isinstance(inner, nn.Module):
            break
        chain.append(inner)
    return chain


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's module under DDP, DataParallel, Fabric and ``torch.compile`` wrappers."""
    return _wrapper_chain(model)[-1]


def compile_wrapper(model: nn.Module) -> nn.Module | None:
    """The ``torch.compile`` wrapper (``OptimizedModule``) among the wrappers, if any."""
    return next((m for m in _wrapper_chain(model) if type(m).__name__ == "OptimizedModule"), None)


def unwrap_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The torch optimizer under ``AcceleratedOptimizer``, ``_FabricOptimizer`` and
    ``LightningOptimizer`` (each keeps it as ``.optimizer`` and calls its ``step``)."""
    for _ in range(8):
        inner = getattr(optimizer, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer) or inner is optimizer:
            return optimizer
        optimizer = inner
    return optimizer
