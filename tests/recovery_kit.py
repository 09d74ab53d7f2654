"""A tiny regression task with scripted bad batches, and the reference runs the recovery
tests compare against (same seeds, same batches, minus the ones the ladder undid)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

import gradguard as gg

__all__ = ["STEPS", "batches", "equal_states", "make", "run_guarded", "run_reference"]

STEPS = 30


def batches(steps: int = STEPS, micro: int = 1) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """``steps`` optimizer steps of ``micro`` micro-batches each, the same on every call."""
    gen = torch.Generator().manual_seed(1)
    return [
        [
            (torch.randn(16, 4, generator=gen), torch.randn(16, 1, generator=gen))
            for _ in range(micro)
        ]
        for _ in range(steps)
    ]


def make(
    optimizer: str, lr: float | torch.Tensor = 1e-2
) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    params = model.parameters()
    makers: dict[str, Callable[[], torch.optim.Optimizer]] = {
        "adam": lambda: torch.optim.Adam(params, lr=lr),
        "adam_fused": lambda: torch.optim.Adam(params, lr=lr, fused=True),
        "adamw_fused": lambda: torch.optim.AdamW(params, lr=lr, fused=True),
        "adamw_foreach": lambda: torch.optim.AdamW(params, lr=lr, foreach=True),
        "sgd_momentum": lambda: torch.optim.SGD(params, lr=lr, momentum=0.9),
        "sgd_momentum_fused": lambda: torch.optim.SGD(params, lr=lr, momentum=0.9, fused=True),
        "sgd": lambda: torch.optim.SGD(params, lr=lr),
    }
    return model, makers[optimizer]()


def _micro_step(
    model: nn.Module, data: list[tuple[torch.Tensor, torch.Tensor]], poison: str | None
) -> list[torch.Tensor]:
    losses = []
    for x, y in data:
        if poison == "nan":
            x = x * float("nan")
        elif poison == "loud":
            y = y * 100.0  # a loss spike far above the running median, and a gradient spike
        loss = nn.functional.mse_loss(model(x), y)
        (loss / len(data)).backward()
        losses.append(loss.detach())
    return losses


def run_guarded(
    optimizer: str,
    recover: gg.Recover,
    poison: dict[int, str],
    *,
    micro: int = 1,
    observe_loss: bool = False,
    scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
    scaler: Any = None,
    **guard_kwargs: Any,
) -> tuple[nn.Module, torch.optim.Optimizer, gg.GradGuard, list[float]]:
    """Train STEPS steps under the ladder; returns the lr each step used (seen in a
    pre-hook registered after the guard's, i.e. what the optimizer's update used)."""
    model, opt = make(optimizer)
    guard_kwargs.setdefault("activations", False)
    guard_kwargs.setdefault("on_spike", "ignore")
    guard = gg.attach(model, opt, on_instability=recover, **guard_kwargs)
    seen: list[float] = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append(float(o.param_groups[0]["lr"])))
    sched = scheduler(opt) if scheduler is not None else None
    for step, data in enumerate(batches(micro=micro)):
        opt.zero_grad(set_to_none=True)
        if scaler is None:
            losses = _micro_step(model, data, poison.get(step))
        else:
            losses = []
            for x, y in data:
                if poison.get(step) == "loud":
                    y = y * 100.0
                loss = nn.functional.mse_loss(model(x), y)
                scaler.scale(loss / len(data)).backward()
                losses.append(loss.detach())
        if observe_loss:
            for loss in losses:
                guard.observe_loss(loss)
        if scaler is None:
            opt.step()
        else:
            scaler.step(opt)
            scaler.update()
        if sched is not None:
            sched.step()
    return model, opt, guard, seen


def run_reference(
    optimizer: str,
    kept: Iterable[int],
    *,
    micro: int = 1,
    lr_at: Callable[[int], float] | None = None,
) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The run that never saw the undone batches: only the steps in ``kept``, each with
    ``lr_at(step)`` as its learning rate when given."""
    model, opt = make(optimizer)
    data = batches(micro=micro)
    for step in sorted(kept):
        if lr_at is not None:
            opt.param_groups[0]["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        _micro_step(model, data[step], None)
        opt.step()
    return model, opt


def equal_states(
    a: tuple[nn.Module, torch.optim.Optimizer], b: tuple[nn.Module, torch.optim.Optimizer]
) -> bool:
    """Bit-for-bit: every parameter, buffer and optimizer state tensor."""
    (ma, oa), (mb, ob) = a, b
    sa, sb = ma.state_dict(), mb.state_dict()
    if sa.keys() != sb.keys() or not all(torch.equal(sa[k], sb[k]) for k in sa):
        return False
    qa, qb = oa.state_dict()["state"], ob.state_dict()["state"]
    if qa.keys() != qb.keys():
        return False
    for key in qa:
        if qa[key].keys() != qb[key].keys():
            return False
        for name, value in qa[key].items():
            other = qb[key][name]
            if isinstance(value, torch.Tensor):
                if not torch.equal(value.cpu(), other.cpu()):
                    return False
            elif value != other:
                return False
    return True
