"""The per-step packet: one small device vector per optimizer step, read on the host
without ever stalling it.

The packet is ``[total, layer_0, ..., layer_L-1, extra_0, ...]``: the norms' head (see
``_norms.py``) followed by the named extras the step needs (clip threshold and
coefficient, the skip flag, the device-side spike z-score, the scaler's overflow flag),
decided once per layout by ``PacketSpec``. In the default configuration there is no
extra, and the packet IS the norms' head.

``HostMirror`` copies each packet with ``non_blocking=True`` into pinned host memory and
records a CUDA event behind the copy; the host reads a packet only once its event has
completed, normally at the next step, so a warning arrives at most about one step late and
the host never waits for the device. On the CPU the packet is read at once.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

__all__ = ["HostMirror", "PacketSpec", "UnpackedPacket"]

# A device more than this many steps behind the host is waited for (rare; see push()).
MAX_IN_FLIGHT = 8

UnpackedPacket = tuple[float, list[float], dict[str, float]]


class PacketSpec:
    """Where each value sits in a packet: the head, then ``extras`` in order."""

    def __init__(self, num_layers: int, extras: Sequence[str] = ()) -> None:
        self.num_layers = num_layers
        self.extras = tuple(extras)

    def pack(self, head: torch.Tensor, extras: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """One vector in ``head``'s dtype (``stack``/``cat`` promote bools and floats)."""
        if not self.extras:
            return head
        return torch.cat([head, torch.stack([extras[name] for name in self.extras])])

    def unpack(self, values: list[float]) -> UnpackedPacket:
        """``(total, per-layer norms, extras by name)``."""
        head = 1 + self.num_layers
        extras = dict(zip(self.extras, values[head:]))
        return values[0], values[1:head], extras


class HostMirror:
    """Delivers ``(step, values, note)`` to ``on_ready`` for every packet pushed, in order.

    ``note`` is whatever the host already knew about that step when it pushed the packet
    (e.g. a skip decided on the host); it travels beside the packet untouched.
    """

    def __init__(
        self,
        on_ready: Callable[[int, list[float], Any], None],
        on_settled: Callable[[], object] | None = None,
    ) -> None:
        """``on_ready`` gets each packet in step order; ``on_settled`` is called after a
        blocking drain, once every packet so far was delivered."""
        self._on_ready = on_ready
        self._on_settled = on_settled
        self._in_flight: deque[tuple[int, Any, torch.Tensor, Any]] = deque()
        self._free: list[torch.Tensor] = []

    def push(self, step: int, packet: torch.Tensor, note: Any = None) -> None:
        if packet.is_cpu:
            # On the CPU the "copy" is immediate; .tolist() never syncs an accelerator.
            self._on_ready(step, packet.tolist(), note)
            return
        buffer = self._free.pop() if self._free else None
        if buffer is None or buffer.numel() != packet.numel() or buffer.dtype != packet.dtype:
            buffer = torch.empty(packet.numel(), dtype=packet.dtype, pin_memory=True)
        # Only CUDA gets an event to say when the copy is done; elsewhere copy synchronously.
        buffer.copy_(packet, non_blocking=packet.device.type == "cuda")
        event: Any = None
        if packet.device.type == "cuda":
            event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            event.record()
        self._in_flight.append((step, event, buffer, note))
        oldest_event = self._in_flight[0][1]
        if len(self._in_flight) > MAX_IN_FLIGHT and oldest_event is not None:
            # Deliberate host sync, rare: the device is far behind the host.
            oldest_event.synchronize()

    def drain(self, *, block: bool) -> None:
        """Deliver every packet whose copy is done (all of them when ``block``)."""
        while self._in_flight:
            step, event, buffer, note = self._in_flight[0]
            if event is not None and not block and not event.query():
                break
            if event is not None and block:
                event.synchronize()  # Deliberate host sync: asked for (logging step, detach).
            self._in_flight.popleft()
            values = buffer.tolist()
            self._free.append(buffer)
            self._on_ready(step, values, note)
        if block and self._on_settled is not None:
            self._on_settled()

    def clear(self) -> None:
        """Forget packets still in flight (after a rollback or a layout change)."""
        self._in_flight.clear()
