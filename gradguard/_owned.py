"""One guard per stateful part: a clip strategy or a detector keeps the state of one
model's gradients, so binding it to a second live guard is refused with a clear message."""

from __future__ import annotations

import weakref
from typing import Any

from ._errors import ConfigurationError

__all__ = ["OwnedByOneGuard"]


class OwnedByOneGuard:
    """Mixin: ``claim(guard)`` at attach, ``release(guard)`` at detach."""

    _owner: weakref.ref[Any] | None = None
    _role = "part"  # what the error calls this object ("clip", "detector", ...)

    def claim(self, owner: object) -> None:
        """Reserve this object for ``owner``; refuse a second live owner."""
        current = self._owner() if self._owner is not None else None
        if current is not None and current is not owner:
            name = type(self).__name__
            raise ConfigurationError(
                f"{self._role}={self!r} already serves another GradGuard (another model or "
                f"optimizer): it keeps the state of one model's gradients, so give each guard "
                f"its own, e.g. {name}(...) twice, or copy.deepcopy() of it"
            )
        self._owner = weakref.ref(owner)

    def release(self, owner: object) -> None:
        if self._owner is not None and self._owner() is owner:
            self._owner = None

    def __getstate__(self) -> dict[str, Any]:
        # The owner is a live guard, not part of the configuration (deepcopy, pickling).
        state = dict(self.__dict__)
        state.pop("_owner", None)
        return state
