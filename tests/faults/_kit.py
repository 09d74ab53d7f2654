"""Shared pieces of the fault-injection suite: tiny models, snapshots, bitwise comparison."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

X = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))
Y = torch.randn(16, 3, generator=torch.Generator().manual_seed(2))


def tiny(seed: int = 0, *, bias: bool = True, act: type[nn.Module] = nn.Tanh) -> nn.Sequential:
    """Three Linear layers (named 0, 2, 4), 4 -> 8 -> 8 -> 3."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(4, 8, bias=bias),
        act(),
        nn.Linear(8, 8, bias=bias),
        act(),
        nn.Linear(8, 3, bias=bias),
    )


def loss_of(model: nn.Module, x: torch.Tensor = X, y: torch.Tensor = Y) -> torch.Tensor:
    return nn.functional.mse_loss(model(x), y)


def backward(model: nn.Module, opt: torch.optim.Optimizer) -> torch.Tensor:
    opt.zero_grad(set_to_none=True)
    loss = loss_of(model)
    loss.backward()
    return loss


def poison(param: torch.Tensor, value: float = float("nan"), index: int = 0) -> None:
    """Write ``value`` into one element of ``param.grad`` (dense or sparse)."""
    grad = param.grad
    assert grad is not None
    target = grad._values() if grad.is_sparse else grad
    with torch.no_grad():
        target.view(-1)[index % target.numel()] = value


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a dense tensor (NaN compares equal to the same NaN)."""
    data = tensor.detach().contiguous().reshape(-1)
    return data.view(torch.uint8) if data.dtype != torch.bool else data


def bit_equal(a: Any, b: Any) -> bool:
    """Recursive bitwise equality of tensors, numbers, lists and dicts."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return False
        if a.dtype != b.dtype or a.shape != b.shape:
            return False
        if a.is_sparse or b.is_sparse:
            return bit_equal(a.coalesce().indices(), b.coalesce().indices()) and bit_equal(
                a.coalesce().values(), b.coalesce().values()
            )
        return torch.equal(bits(a), bits(b))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(bit_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(bit_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float) and a != a and b != b:
        return True
    return bool(a == b)


class Snapshot:
    """Weights and optimizer state, deep-copied, to compare across a step."""

    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer) -> None:
        self.params = {n: p.detach().clone() for n, p in model.named_parameters()}
        self.state = copy.deepcopy(opt.state_dict())

    def weights_equal(self, model: nn.Module) -> bool:
        return all(bit_equal(p, self.params[n]) for n, p in model.named_parameters())

    def state_equal(self, opt: torch.optim.Optimizer, *, ignore: tuple[str, ...] = ()) -> bool:
        """Bit-identical state, except that state a fused kernel creates at its initial
        value (step 0, zero moments) for a parameter that had none counts as unchanged:
        the next real step would create exactly that (see ``fresh_state``)."""
        now = _drop(opt.state_dict(), ignore)
        then = _drop(self.state, ignore)
        created = set(now["state"]) - set(then["state"])
        if not all(fresh_state(now["state"][k]) for k in created):
            return False
        now["state"] = {k: v for k, v in now["state"].items() if k not in created}
        return bit_equal(now, then)

    def changed(self, model: nn.Module) -> list[str]:
        return [n for n, p in model.named_parameters() if not bit_equal(p, self.params[n])]


def fresh_state(entry: Mapping[str, Any]) -> bool:
    """Every tensor of an optimizer state entry is zero: the state of a step never taken."""
    return all(not isinstance(v, torch.Tensor) or bool((v == 0).all()) for v in entry.values())


def _drop(state: Mapping[str, Any], ignore: tuple[str, ...]) -> dict[str, Any]:
    out = dict(state)
    out["state"] = {
        k: {name: v for name, v in entry.items() if name not in ignore}
        for k, entry in state["state"].items()
    }
    return out


def nonfinite_events(guard: Any) -> list[Any]:
    return [e for e in guard.events if e.kind == "nonfinite"]
