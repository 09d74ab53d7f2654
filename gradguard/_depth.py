"""Depth order: the order in which the layers first run in a training forward pass.

"Input first" must mean the data's path, not the order in which ``__init__`` registered
the modules (often different: heads declared first, shared blocks, ModuleDicts). The
first forward pass after attach is watched with forward pre-hooks on the
parameter-owning modules; the order in which each first runs is the depth order. The
hooks come off at the end of that pass (or at the first optimizer step, when the model's
own forward is never called, as in a LightningModule whose ``training_step`` calls its
submodules), so later passes pay nothing. A model compiled with ``torch.compile`` is not
hooked (hooks added after compilation are ignored by compiled code): it keeps
registration order, and the guard's ``depth_source`` says so.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn
from torch.utils.hooks import RemovableHandle

from ._layers import LayerLayout, merge_depth_order

__all__ = ["DepthRecorder"]


class DepthRecorder:
    """Watches the first forward pass; ``finish()`` hands back the order seen."""

    def __init__(self, model: nn.Module, layout: LayerLayout) -> None:
        self._seen: dict[str, None] = {}  # insertion-ordered set
        self._handles: list[RemovableHandle] = []
        for name, module in layout.modules.items():
            self._handles.append(module.register_forward_pre_hook(self._pre_hook(name)))
        self._handles.append(model.register_forward_hook(self._done, always_call=True))

    def _pre_hook(self, name: str) -> Callable[[nn.Module, Any], None]:
        def pre_hook(module: nn.Module, args: Any) -> None:
            if name not in self._seen:
                self._seen[name] = None

        return pre_hook

    def _done(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._seen:
            self.remove()  # one whole pass seen: nothing more to learn

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
