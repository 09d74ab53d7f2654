"""The optimizer step hooks ``attach`` registers: gradguard runs right before the update.

An optimizer step pre-hook may return new ``(args, kwargs)``. When ``step(closure)`` is
called (LBFGS, and Lightning's automatic optimisation) the pre-hook runs BEFORE the closure
computes the gradients, so the closure is wrapped and gradguard runs right after its first
call (LBFGS calls it again later; one decision per step). The hook's positional ``args``
start with the optimizer itself; the closure is ``args[1]`` or ``kwargs["closure"]``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

__all__ = ["register_step_hooks"]


def register_step_hooks(
    optimizer: torch.optim.Optimizer,
    before: Callable[[], Any],
    after: Callable[[], Any],
) -> list[RemovableHandle]:
    """Call ``before`` right before ``optimizer`` updates (after the closure, if any) and
    ``after`` right after; returns the handles that remove both hooks."""

    def pre_hook(
        opt: torch.optim.Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        closure, where = _find_closure(opt, args, kwargs)
        if closure is None:
            before()
            return None
        called = False

        def guarded_closure() -> Any:
            nonlocal called
            loss = closure()
            if not called:
                called = True
                before()
            return loss

        new_args, new_kwargs = list(args), dict(kwargs)
        if isinstance(where, int):
            new_args[where] = guarded_closure
        else:
            new_kwargs["closure"] = guarded_closure
        return tuple(new_args), new_kwargs

    def post_hook(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        after()

    pre = optimizer.register_step_pre_hook(pre_hook)
    try:
        post = optimizer.register_step_post_hook(post_hook)
    except BaseException:
        pre.remove()
        raise
    return [pre, post]


def _find_closure(
    optimizer: torch.optim.Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[Callable[[], Any] | None, int | str]:
    if kwargs.get("closure") is not None:
        return kwargs["closure"], "kwargs"
    # The pre-hook's positional args may start with the optimizer itself.
    start = 1 if args and args[0] is optimizer else 0
    if len(args) > start and callable(args[start]):
        return args[start], start
    return None, -1
