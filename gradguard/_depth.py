"""Depth order: the order in which the layers first run in a training forward pass.

"Input first" must mean the data's path, not the order in which ``__init__`` registered
the modules (often different: heads declared first, shared blocks, ModuleDicts). The
first forward pass after attach is watched with forward pre-hooks on the
parameter-owning modules; the order in which each first runs is the depth order. The
hooks come off at the end of that pass (or at the first optimizer step, when the model's
own forward is never called, as in a LightningModule whose ``training_step`` calls its
submodules), so later passes pay nothing.

A model wrapped by ``torch.compile(model)`` runs compiled code that ignores hooks added
after compilation (and would trace, then guard on, hooks present at compilation). Its
first pass after attach is therefore run eagerly instead: a forward pre-hook on the
``OptimizedModule`` wrapper (which runs in Python, outside the compiled frame) sets the
compiler's ``force_eager`` stance for that one call, so the inner modules' hooks fire; the
stance is restored when the call ends (or at the first optimizer step, or on detach, if
the pass was interrupted), and the next pass compiles with no hook present: no
recompilation. A module compiled in place (``model.compile()``) has no such outer call:
it keeps registration order, and the guard's ``depth_source`` says so.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ._layers import LayerLayout, merge_depth_order

__all__ = ["DepthRecorder"]

# The force_eager stance a recorder set and has not taken back yet (at most one at a time).
_entered: Any = None


class DepthRecorder:
    """Watches the first forward pass; ``finish()`` hands back the order seen."""

    def __init__(
        self, model: nn.Module, layout: LayerLayout, eager_through: nn.Module | None = None
    ) -> None:
        """``eager_through``: the ``torch.compile`` wrapper whose first call after attach
        runs eagerly, so that the inner modules' hooks fire (see the module docstring)."""
        self._seen: dict[str, None] = {}  # insertion-ordered set
        self._handles: list[RemovableHandle] = []
        self._stance: Any = None  # the force_eager stance while the first pass runs
        for name, module in layout.modules.items():
            self._handles.append(module.register_forward_pre_hook(self._pre_hook(name)))
        self._handles.append(model.register_forward_hook(self._done, always_call=True))
        if eager_through is not None:
            self._handles.append(eager_through.register_forward_pre_hook(self._go_eager))
            self._handles.append(eager_through.register_forward_hook(self._done, always_call=True))

    def _go_eager(self, module: nn.Module, args: Any) -> None:
        global _entered
        if self._stance is None:
            if _entered is not None:
                # A stance another recorder set and never took back (its first pass was
                # interrupted by Ctrl-C and its guard abandoned): put the original back first,
                # or this one would save "force_eager" as the stance to return to.
                _entered.__exit__(None, None, None)
            # set_stance takes effect when made; its __exit__ puts the previous one back.
            self._stance = _entered = torch.compiler.set_stance("force_eager")

    def _pre_hook(self, name: str) -> Callable[[nn.Module, Any], None]:
        def pre_hook(module: nn.Module, args: Any) -> None:
            if name not in self._seen:
                self._seen[name] = None

        return pre_hook

    def _done(self, module: nn.Module, args: Any, output: Any) -> None:
        self._leave_eager()  # the eager call is over, whatever it saw (or if it raised)
        if self._seen:
            self.remove()  # one whole pass seen: nothing more to learn

    def _leave_eager(self) -> None:
        global _entered
        stance, self._stance = self._stance, None
        if stance is not None:
            stance.__exit__(None, None, None)
            if _entered is stance:
                _entered = None

    @property
    def seen_any(self) -> bool:
        """Whether a watched layer has run since attach (a host flag: no sync)."""
        return bool(self._seen)

    def finish(self, layout: LayerLayout) -> list[str] | None:
        """The depth order learnt so far (None if no forward was seen: keep watching)."""
        if not self._seen:
            return None
        self.remove()
        seen = [name for name in self._seen if name in layout.modules]
        return merge_depth_order(seen, layout.names)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._leave_eager()
