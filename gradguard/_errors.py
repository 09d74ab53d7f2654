"""The error tree and the warning class users can catch."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

__all__ = [
    "ConfigurationError",
    "GradGuardError",
    "GradGuardWarning",
    "GradientAlarmError",
    "MissingDependencyError",
]

# Frames of these packages are never "the user's line": a warning raised from inside an
# optimizer hook points past torch's (and the training framework's) wrappers.
_LIBRARY_MODULES = (
    "gradguard",
    "torch",
    "lightning",
    "lightning_fabric",
    "pytorch_lightning",
    "deepspeed",
    "peft",
    "trl",
    "transformers",
    "accelerate",
    "contextlib",
    "functools",
)


def user_stacklevel() -> int:
    """The ``stacklevel`` for ``warnings.warn`` called by the caller of this function that
    points at the first frame outside gradguard, torch and the training frameworks (the
    user's ``optimizer.step()`` or ``trainer.fit()`` line), wherever the warning is raised."""
    frame = sys._getframe(1)  # the function that will call warnings.warn
    level = 1
    while frame is not None:
        name = str(frame.f_globals.get("__name__", ""))
        if name.split(".", 1)[0] not in _LIBRARY_MODULES:
            return level
        frame = frame.f_back  # type: ignore[assignment]
        level += 1
    return 1


class GradGuardError(Exception):
    """Root of every error gradguard raises."""


class ConfigurationError(GradGuardError, ValueError):
    """A bad argument, raised at construction."""

    @classmethod
    def bad_value(cls, name: str, value: Any, allowed: str) -> ConfigurationError:
        """The error for argument ``name`` given ``value``; ``allowed`` says what is valid."""
        return cls(f"{name}={value!r} is not valid: {allowed}")

    @classmethod
    def not_one_of(cls, name: str, value: Any, choices: Iterable[Any]) -> ConfigurationError:
        """The error for argument ``name`` given ``value`` outside ``choices``."""
        listed = ", ".join(repr(c) for c in choices)
        return cls(f"{name}={value!r} is not valid: expected one of {listed}")


class MissingDependencyError(GradGuardError, ImportError):
    """An optional integration was used without its extra installed."""

    def __init__(self, package: str, extra: str) -> None:
        super().__init__(
            f"this feature needs the '{package}' package, which is not installed: "
            f"pip install 'gradguard[{extra}]'"
        )
        self.package = package
        self.extra = extra


class GradientAlarmError(GradGuardError, RuntimeError):
    """Raised by ``on_nonfinite="raise"`` (and ``on_spike`` policies that raise)."""

    def __init__(self, message: str, *, step: int, layers: tuple[str, ...]) -> None:
        super().__init__(message)
        self.step = step
        self.layers = layers


class GradGuardWarning(UserWarning):
    """Every warning gradguard emits (rank zero only, rate-limited per kind)."""


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ConfigurationError.not_one_of(name, value, choices)


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigurationError.bad_value(name, value, "expected True or False")
    return value


def check_positive_int(name: str, value: Any, *, allow_zero: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigurationError.bad_value(name, value, "expected an integer")
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else ">= 1"
        raise ConfigurationError.bad_value(name, value, f"expected an integer {bound}")
    return value


def check_number(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """Validate a real number inside an interval and return it as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigurationError.bad_value(name, value, "expected a number")
    number = float(value)
    if number != number or number in (float("inf"), float("-inf")):
        raise ConfigurationError.bad_value(name, value, "expected a finite number")
    too_low = low is not None and (number <= low if low_open else number < low)
    too_high = high is not None and (number >= high if high_open else number > high)
    if too_low or too_high:
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        lo = "-inf" if low is None else f"{low:g}"
        hi = "inf" if high is None else f"{high:g}"
        raise ConfigurationError.bad_value(
            name, value, f"expected a number in {left}{lo}, {hi}{right}"
        )
    return number


def check_number_lists(state: Any, keys: Iterable[str]) -> None:
    """Refuse a saved state whose ``keys`` (absent = empty) are not lists of numbers."""
    for key in keys:
        values = state.get(key, [])
        if not isinstance(values, list) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in values
        ):
            raise ConfigurationError.bad_value(
                f"state[{key!r}]", values, "expected a list of numbers"
            )
