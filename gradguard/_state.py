"""The guard's ``state_dict``: what it holds, how an old one is read, and why loading is
all-or-nothing.

A state holds only tensors, numbers, strings, lists and dicts (Lightning loads checkpoints
with ``weights_only=True``). ``check`` validates a whole state (version, types, the
guard's own parts by loading them into throwaway copies, and each clip's and detector's
own ``check_state``) before ``apply`` changes anything, so a state that cannot be loaded
raises ``ConfigurationError`` and leaves the guard as it was; ``load_state_dict`` before
``attach`` raises then, not at attach. ``apply`` is all-or-nothing too: should a part's
``load_state_dict`` fail where its ``check_state`` did not foresee it, everything already
applied is put back before the ``ConfigurationError``.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from ._debounce import Debouncer
from ._errors import ConfigurationError, GradGuardWarning, user_stacklevel
from ._ratelimit import RateLimiter

if TYPE_CHECKING:
    from ._guard import GradGuard
    from .detect.base import Detector

__all__ = ["STATE_VERSION", "StateSchema"]

STATE_VERSION = 2
_COUNTERS = ("step", "skipped_steps", "nonfinite_steps", "clipped_steps")


def _named_detectors(guard: GradGuard) -> dict[str, Detector]:
    named: dict[str, Detector] = {"nonfinite": guard._nonfinite, "spike": guard.config.spike}
    if guard.config.activations is not None:
        named["activations"] = guard.config.activations
    return named


def _number(value: Any) -> float:
    """A number from a float, an int or a 0-d tensor (what version 1 saved)."""
    return float(torch.as_tensor(value)) if isinstance(value, torch.Tensor) else float(value)


def _upgrade_v1(state: Mapping[str, Any]) -> dict[str, Any]:
    """Version 1 (gradguard 0.1.0.dev0's first landing) to version 2."""
    spike = state.get("spike", {})
    return {
        "version": STATE_VERSION,
        "step": int(state["step"]),
        "skipped_steps": int(state.get("skipped_steps", 0)),
        "nonfinite_steps": int(state.get("nonfinite_steps", 0)),
        "clipped_steps": int(_number(state.get("clipped_steps", 0))),
        "layer_order": list(state.get("layer_order", [])),
        "depth_source": "saved",
        "clip_type": state.get("clip_type", ""),
        "clip": dict(state.get("clip", {})),
        "debouncer": {},
        "warnings": {},
        "detectors": {
            "spike": {k: _number(spike[k]) for k in ("mean", "var", "weight") if k in spike},
            "activations": {"healthy": dict(state.get("activations", {}).get("healthy", {}))},
            "custom": [{"type": "", "state": dict(s)} for s in state.get("detectors", []) if s],
        },
    }


class StateSchema:
    """Save, check and apply a guard's state (see the module docstring)."""

    @staticmethod
    def save(guard: GradGuard) -> dict[str, Any]:
        binding = guard._binding
        clip = guard.config.clip
        return {
            "version": STATE_VERSION,
            "step": guard._step,
            "skipped_steps": guard._skipped_steps,
            "nonfinite_steps": guard._nonfinite_steps,
            "clipped_steps": guard._clipped_steps,
            "layer_order": list(binding.layout.names) if binding is not None else [],
            "depth_source": guard._depth_source,
            "clip_type": type(clip).__name__ if clip is not None else "",
            "clip": clip.state_dict() if clip is not None else {},
            **guard._announcer.state_dict(),
            # The recovery ladder's own state (its snapshots are memory only: not saved).
            "recovery": guard._ladder.state_dict() if guard._ladder is not None else {},
            "detectors": {
                **{name: d.state_dict() for name, d in _named_detectors(guard).items()},
                "custom": [
                    {"type": type(d).__name__, "state": d.state_dict()}
                    for d in guard.config.detectors
                ],
            },
        }

    @staticmethod
    def check(guard: GradGuard, state: Any) -> dict[str, Any]:
        """The state, upgraded to the current version and validated; raises if it cannot
        be loaded into ``guard``."""
        if not isinstance(state, Mapping) or "version" not in state:
            raise ConfigurationError.bad_value(
                "state", type(state).__name__, "expected a GradGuard state_dict (a mapping)"
            )
        version = state["version"]
        if isinstance(version, bool) or not isinstance(version, int):
            raise ConfigurationError.bad_value("state['version']", version, "expected an integer")
        if version > STATE_VERSION:
            raise ConfigurationError(
                f"state version {version} is newer than this gradguard understands "
                f"({STATE_VERSION}); upgrade gradguard"
            )
        if version < 1:
            raise ConfigurationError.bad_value(
                "state['version']", version, f"expected 1..{STATE_VERSION}"
            )
        try:
            checked = _upgrade_v1(state) if version == 1 else dict(state)
            for counter in _COUNTERS:
                value = checked[counter]
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise ConfigurationError.bad_value(
                        f"state[{counter!r}]", value, "expected an integer >= 0"
                    )
            order = checked.get("layer_order", [])
            if not isinstance(order, (list, tuple)) or not all(isinstance(n, str) for n in order):
                raise ConfigurationError.bad_value(
                    "state['layer_order']", order, "expected a list of layer names"
                )
            for key in ("depth_source", "clip_type"):
                if not isinstance(checked.get(key, ""), str):
                    raise ConfigurationError.bad_value(
                        f"state[{key!r}]", checked[key], "expected a string"
                    )
            if not isinstance(checked.get("clip", {}), Mapping):
                raise ConfigurationError.bad_value(
                    "state['clip']", checked["clip"], "expected a mapping"
                )
            # The guard's own host-side parts: loading into throwaway ones checks them whole.
            Debouncer().load_state_dict(checked.get("debouncer", {}))
            RateLimiter(1).load_state_dict(checked.get("warnings", {}))
            detectors = checked["detectors"]
            if not isinstance(detectors, Mapping):
                raise ConfigurationError.bad_value(
                    "state['detectors']", detectors, "expected a mapping"
                )
            clip = guard.config.clip
            if clip is not None and checked["clip"] and checked["clip_type"] == type(clip).__name__:
                clip.check_state(dict(checked["clip"]))
            recovery = checked.get("recovery", {})
            if not isinstance(recovery, Mapping):
                raise ConfigurationError.bad_value(
                    "state['recovery']", recovery, "expected a mapping"
                )
            if recovery and guard._ladder is not None:
                guard._ladder.check_state(recovery)
            for name, detector in _named_detectors(guard).items():
                if detectors.get(name):
                    detector.check_state(detectors[name])
            for detector, saved in zip(guard.config.detectors, detectors.get("custom", [])):
                if saved.get("type") in ("", type(detector).__name__):
                    detector.check_state(saved.get("state", {}))
        except ConfigurationError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as error:
            raise ConfigurationError(
                f"this GradGuard state cannot be loaded ({type(error).__name__}: {error}); "
                "nothing was changed"
            ) from error
        return checked

    @staticmethod
    def apply(guard: GradGuard, state: dict[str, Any]) -> None:
        """Load a checked state into an attached guard, all or nothing.

        A part whose ``load_state_dict`` raises although its ``check_state`` passed (a
        custom detector's, or a malformed entry no check foresaw) must not leave the guard
        half-loaded: the state held before (a deep copy, so in-place loads cannot touch
        it) is put back and the error is a ``ConfigurationError``.
        """
        before = copy.deepcopy(StateSchema.save(guard))
        try:
            StateSchema._apply(guard, state)
        except Exception as error:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", GradGuardWarning)
                StateSchema._apply(guard, before)
            raise ConfigurationError(
                f"this GradGuard state cannot be loaded ({type(error).__name__}: {error}); "
                "nothing was changed"
            ) from error

    @staticmethod
    def _apply(guard: GradGuard, state: dict[str, Any]) -> None:
        binding = guard._binding
        assert binding is not None
        layout = binding.layout
        order = [str(n) for n in state.get("layer_order", [])]
        if order and sorted(order) == sorted(layout.names):
            if binding.depth is not None:
                binding.depth.remove()
                binding.depth = None
            if order != layout.names:
                layout.reorder(order)
                binding.relayout(guard.config)
            layout.depth_known = True
            # Where the saved run learnt it ("forward"), so a report reads the same after resume.
            guard._depth_source = str(state.get("depth_source") or "saved")
        elif order:
            warnings.warn(
                "the GradGuard state was saved for other layers; per-layer state starts fresh",
                GradGuardWarning,
                stacklevel=user_stacklevel(),
            )
        guard._step = state["step"]
        guard._skipped_steps = state["skipped_steps"]
        guard._nonfinite_steps = state["nonfinite_steps"]
        guard._clipped_steps = state["clipped_steps"]
        clip = guard.config.clip
        saved_type = str(state.get("clip_type", ""))
        if clip is not None and state.get("clip"):
            if saved_type and saved_type != type(clip).__name__:
                warnings.warn(
                    f"the GradGuard state was saved with clip={saved_type}, this guard clips with "
                    f"{type(clip).__name__}: its clip state starts fresh",
                    GradGuardWarning,
                    stacklevel=user_stacklevel(),
                )
            else:
                clip.load_state_dict(dict(state["clip"]))
        detectors = state["detectors"]
        for name, detector in _named_detectors(guard).items():
            if detectors.get(name):
                detector.load_state_dict(detectors[name])
        for detector, saved in zip(guard.config.detectors, detectors.get("custom", [])):
            if saved.get("type") in ("", type(detector).__name__):
                detector.load_state_dict(saved.get("state", {}))
        guard._announcer.load_state_dict(state)
        if guard._ladder is not None and state.get("recovery"):
            guard._ladder.load_state_dict(state["recovery"])
