"""Counting host-device synchronisations on the CPU.

``aten._local_scalar_dense`` is what ``.item()``, ``bool(t)``, ``float(t)`` and ``if t:``
dispatch to. A ``TorchDispatchMode`` sees it on CPU tensors too, so a CPU test can prove a
code path makes no such read. It does not see ``.tolist()``/``.cpu()``: those are kept off
non-logging steps by review, and a GPU's ``torch.cuda.set_sync_debug_mode("error")`` catches
them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class SyncCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


@contextmanager
def count_syncs() -> Iterator[SyncCounter]:
    counter = SyncCounter()
    with counter:
        yield counter
