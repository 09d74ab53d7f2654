"""Progress bars for the demo: tqdm when installed, a plain line otherwise, none when off."""

from __future__ import annotations

import sys
from typing import Protocol, TextIO

__all__ = ["Progress", "make_progress"]


class Progress(Protocol):
    def update(self, loss: float | None) -> None: ...

    def write(self, text: str) -> None: ...

    def close(self) -> None: ...


class _NoProgress:
    def __init__(self, out: TextIO) -> None:
        self._out = out

    def update(self, loss: float | None) -> None:
        pass

    def write(self, text: str) -> None:
        print(text, file=self._out)

    def close(self) -> None:
        pass


class _SimpleProgress:
    """A one-line bar on stderr for when tqdm is not installed."""

    def __init__(self, total: int, label: str) -> None:
        self.total, self.label, self.done = total, label, 0
        self._last_drawn = -1

    def update(self, loss: float | None) -> None:
        self.done += 1
        tick = self.done * 40 // self.total
        if tick != self._last_drawn or self.done == self.total:
            self._last_drawn = tick
            bar = "#" * tick + "." * (40 - tick)
            tail = f" loss {loss:.3f}" if loss is not None else ""
            sys.stderr.write(f"\r{self.label} [{bar}] {self.done}/{self.total}{tail}")
            sys.stderr.flush()

    def write(self, text: str) -> None:
        sys.stderr.write("\r" + " " * 100 + "\r")
        print(text, file=sys.stderr)

    def close(self) -> None:
        sys.stderr.write("\n")
        sys.stderr.flush()


class _TqdmProgress:
    def __init__(self, total: int, label: str) -> None:
        from tqdm import tqdm

        self._bar = tqdm(total=total, desc=label, unit="step", leave=True, dynamic_ncols=True)

    def update(self, loss: float | None) -> None:
        if loss is not None:
            self._bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
        self._bar.update(1)

    def write(self, text: str) -> None:
        self._bar.write(text, file=sys.stderr)

    def close(self) -> None:
        self._bar.close()


def make_progress(total: int, label: str, enabled: bool, out: TextIO) -> Progress:
    if not enabled:
        return _NoProgress(out)
    try:
        return _TqdmProgress(total, label)
    except ImportError:
        return _SimpleProgress(total, label)
