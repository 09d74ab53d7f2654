"""Sync-free reading of small per-step flags: copy to pinned host memory, read when ready.

Each step's flag packet (total norm, z-score, NaN/spike/skip flags, per-layer norms) is
copied with ``non_blocking=True`` into a pinned buffer and a CUDA event is recorded behind
the copy. The host reads a packet only once its event has completed, normally at the next
step, so a warning arrives at most about one step late and the host never waits for the
device. On the CPU the copy is immediate and the packet is read at once.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["HostMirror"]

# A device more than this many steps behind the host is waited for (rare; see push()).
MAX_IN_FLIGHT = 8


class HostMirror:
    """Delivers ``(step, values)`` to ``on_ready`` for every packet pushed, in step order."""

    def __init__(self, on_ready: Callable[[int, list[float]], None]) -> None:
        self._on_ready = on_ready
        self._in_flight: deque[tuple[int, Any, torch.Tensor]] = deque()
        self._free: list[torch.Tensor] = []

    def push(self, step: int, packet: torch.Tensor) -> None:
        if packet.device.type == "cpu":
            # On the CPU the "copy" is immediate; .tolist() never syncs an accelerator.
            self._on_ready(step, packet.tolist())
            return
        buffer = self._free.pop() if self._free else None
        if buffer is None or buffer.numel() != packet.numel():
            buffer = torch.empty(packet.numel(), dtype=torch.float32, pin_memory=True)
        # Only CUDA gets an event to say when the copy is done; elsewhere copy synchronously.
        buffer.copy_(packet, non_blocking=packet.device.type == "cuda")
        event: Any = None
        if packet.device.type == "cuda":
            event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            event.record()
        self._in_flight.append((step, event, buffer))
        oldest_event = self._in_flight[0][1]
        if len(self._in_flight) > MAX_IN_FLIGHT and oldest_event is not None:
            # Deliberate host sync, rare: the device is far behind the host.
            oldest_event.synchronize()

    def drain(self, *, block: bool) -> None:
        """Deliver every packet whose copy is done (all of them when ``block``)."""
        while self._in_flight:
            step, event, buffer = self._in_flight[0]
            if event is not None and not block and not event.query():
                break
            if event is not None and block:
                event.synchronize()  # Deliberate host sync: asked for (logging step, detach).
            self._in_flight.popleft()
            values = buffer.tolist()
            self._free.append(buffer)
            self._on_ready(step, values)
