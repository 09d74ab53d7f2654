"""The clip strategies and sinks gradguard ships, found by looking, not by a hand-kept list.

Tests that need tuned variants keep their own factories, and ``assert_covers`` makes them
fail when a strategy is missing from them (a new strategy cannot be forgotten silently).
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Callable, Iterable
from typing import Any

import gradguard.integrations

import gradguard as gg

# Arguments a strategy cannot do without (everything else has a default).
REQUIRED_ARGS: dict[str, dict[str, Any]] = {
    "NormClip": {"max_norm": 1.0},
    "ValueClip": {"value": 0.01},
}


def clip_classes() -> list[type[gg.ClipStrategy]]:
    """Every concrete clip strategy in ``gradguard.__all__``."""
    found = []
    for name in gg.__all__:
        obj = getattr(gg, name)
        if (
            isinstance(obj, type)
            and issubclass(obj, gg.ClipStrategy)
            and not inspect.isabstract(obj)
        ):
            found.append(obj)
    return found


def sample(cls: type[gg.ClipStrategy]) -> gg.ClipStrategy:
    """A strategy of class ``cls`` with its defaults (and the arguments it requires)."""
    try:
        return cls(**REQUIRED_ARGS.get(cls.__name__, {}))
    except TypeError as error:  # a new strategy with a required argument
        raise AssertionError(f"add {cls.__name__}'s required arguments to REQUIRED_ARGS") from error


def assert_covers(factories: Iterable[Callable[[], gg.ClipStrategy]]) -> None:
    """Every shipped strategy appears among ``factories`` at least once."""
    covered = {type(make()) for make in factories}
    missing = [cls.__name__ for cls in clip_classes() if cls not in covered]
    assert not missing, f"add {missing} to this test's strategies"


def sink_classes() -> list[type[Any]]:
    """Every sink class gradguard ships: the core's and each integration module's."""
    modules: list[Any] = [gg]
    for info in pkgutil.iter_modules(gradguard.integrations.__path__):
        if not info.name.startswith("_"):
            modules.append(importlib.import_module(f"gradguard.integrations.{info.name}"))
    found: list[type[Any]] = []
    for module in modules:
        for name in getattr(module, "__all__", ()):
            obj = getattr(module, name)
            if (
                isinstance(obj, type)
                and obj is not gg.Sink
                and all(
                    callable(getattr(obj, m, None))
                    for m in gg.Sink.__dict__
                    if m.startswith("log_")
                )
                and callable(getattr(obj, "close", None))
            ):
                found.append(obj)
    return found
