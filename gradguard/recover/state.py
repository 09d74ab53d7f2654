"""Checking a saved recovery-ladder state before anything is loaded (all or nothing)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .._errors import ConfigurationError

__all__ = ["check_ladder_state"]


def check_ladder_state(state: Mapping[str, Any], ints: Sequence[str]) -> None:
    """Raise ``ConfigurationError`` naming the first entry of ``state`` that is wrong."""
    for key in ints:
        value = state.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < -1:
            raise ConfigurationError.bad_value(
                f"state['recovery'][{key!r}]", value, "expected an integer >= -1"
            )
    for key in ("lr_low", "factor"):
        value = state.get(key, 1.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
            raise ConfigurationError.bad_value(
                f"state['recovery'][{key!r}]", value, "expected a number in (0, 1]"
            )
    if not isinstance(state.get("exhausted", False), bool):
        raise ConfigurationError.bad_value(
            "state['recovery']['exhausted']", state["exhausted"], "expected True or False"
        )
    incidents = state.get("incidents", [])
    if not isinstance(incidents, list) or not all(
        isinstance(i, (list, tuple))
        and len(i) == 2
        and isinstance(i[0], int)
        and isinstance(i[1], str)
        for i in incidents
    ):
        raise ConfigurationError.bad_value(
            "state['recovery']['incidents']", incidents, "expected a list of [step, reason]"
        )
    pending = state.get("pending", {})
    if not isinstance(pending, Mapping) or (
        pending and not {"count", "reasons", "step"} <= set(pending)
    ):
        raise ConfigurationError.bad_value(
            "state['recovery']['pending']", pending, "expected {} or {count, reasons, step}"
        )
    history = state.get("history", [])
    if not isinstance(history, list) or not all(isinstance(h, Mapping) for h in history):
        raise ConfigurationError.bad_value(
            "state['recovery']['history']", history, "expected a list of mappings"
        )
