"""Resuming from every kind of state: good ones round-trip through ``weights_only``
loading, bad ones raise ``ConfigurationError`` at ``load_state_dict`` and change nothing."""

from __future__ import annotations

import copy
import io
from collections.abc import Callable
from typing import Any

import pytest
import torch

import gradguard as gg
from tests.faults._kit import backward, bit_equal, poison, tiny

CLIPS: dict[str, Callable[[], Any]] = {
    "none": lambda: None,
    "NormClip": lambda: gg.NormClip(1.0),
    "NormClip(per_layer)": lambda: gg.NormClip(1.0, per_layer=True),
    "ValueClip": lambda: gg.ValueClip(0.5),
    "AutoClip": lambda: gg.AutoClip(history=50),
    "AutoClip(per_layer)": lambda: gg.AutoClip(history=50, per_layer=True),
    "ZClip": lambda: gg.ZClip(warmup_steps=3),
    "AGC": gg.AGC,
}


def _guard(clip: str = "AutoClip", **options: Any) -> gg.GradGuard:
    options.setdefault("warn", False)
    return gg.GradGuard(
        clip=CLIPS[clip](),
        on_nonfinite="skip",
        activations=gg.ActivationMonitor(every_n_steps=2, window=1),
        log_every_n_steps=2,
        **options,
    )


def _trained(clip: str = "AutoClip", steps: int = 8) -> tuple[gg.GradGuard, torch.nn.Module]:
    model = tiny(act=torch.nn.ReLU)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    guard = _guard(clip).attach(model, opt)
    for step in range(steps):
        backward(model, opt)
        if step == 3:
            poison(model[0].weight)  # an episode for the debouncer to remember
        opt.step()
    return guard, model


def _fresh(clip: str = "AutoClip", attached: bool = True) -> gg.GradGuard:
    guard = _guard(clip)
    if attached:
        model = tiny(act=torch.nn.ReLU)
        guard.attach(model, torch.optim.Adam(model.parameters(), lr=1e-2))
    return guard


@pytest.mark.parametrize("clip", list(CLIPS))
def test_every_state_round_trips_through_weights_only(clip: str) -> None:
    guard, _ = _trained(clip)
    saved = guard.state_dict()
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    for attached in (True, False):
        other = _fresh(clip, attached)
        other.load_state_dict(loaded)
        if not attached:
            model = tiny(act=torch.nn.ReLU)
            other.attach(model, torch.optim.Adam(model.parameters(), lr=1e-2))
        assert bit_equal(other.state_dict(), saved)
        assert other.step == 8 and other.skipped_steps == 1


# Malformed states: each breaks one part. ``where`` says which part's check catches it.
BAD: dict[str, Callable[[dict[str, Any]], None]] = {
    "debouncer episode": lambda s: s["debouncer"]["episodes"]["nonfinite"].update(start="x"),
    "debouncer not a mapping": lambda s: s.update(debouncer=5),
    "warnings": lambda s: s.update(warnings={"last": "x"}),
    "layer_order": lambda s: s.update(layer_order=5),
    "counter": lambda s: s.update(skipped_steps=-1),
    "spike": lambda s: s["detectors"].update(spike={"mean": "x"}),
    "AutoClip history": lambda s: s["clip"].update(ring=torch.zeros(3, 7)),
    "custom detectors": lambda s: s["detectors"].update(custom=5),
    "activations": lambda s: s["detectors"].update(activations={"healthy": {"0": ["a", 1]}}),
    "AutoClip steps": lambda s: s["clip"].update(steps="x"),
}
UNCHECKED: dict[str, str] = {}  # parts whose check_state misses a problem (none now)


def _bad(name: str) -> dict[str, Any]:
    guard, _ = _trained()
    state = copy.deepcopy(guard.state_dict())
    BAD[name](state)
    return state


@pytest.mark.parametrize("name", list(BAD))
def test_a_bad_state_changes_nothing_in_an_attached_guard(name: str) -> None:
    guard, model = _trained(steps=4)
    before = copy.deepcopy(guard.state_dict())
    with pytest.raises(gg.ConfigurationError):
        guard.load_state_dict(_bad(name))
    assert bit_equal(guard.state_dict(), before)
    assert guard.step == 4 and guard.skipped_steps == 1  # counters untouched
    opt = guard._binding.optimizer  # type: ignore[union-attr]
    backward(model, opt)
    opt.step()  # and the guard still works
    assert guard.step == 5


def _before_attach_params() -> list[Any]:
    out = []
    for name in BAD:
        marks = []
        if name in UNCHECKED:
            marks.append(pytest.mark.xfail(strict=True, reason=UNCHECKED[name]))
        out.append(pytest.param(name, marks=marks, id=name))
    return out


@pytest.mark.parametrize("name", _before_attach_params())
def test_a_bad_state_raises_at_load_time_before_attach(name: str) -> None:
    guard = _fresh(attached=False)
    with pytest.raises(gg.ConfigurationError):
        guard.load_state_dict(_bad(name))
    assert guard.step == 0
    model = tiny(act=torch.nn.ReLU)
    guard.attach(model, torch.optim.Adam(model.parameters(), lr=1e-2))  # attach never fails
    assert guard.step == 0 and guard.skipped_steps == 0


@pytest.mark.parametrize("version", [0, -1, "2", 2.0, True, None])
def test_versions_that_do_not_exist_are_refused(version: Any) -> None:
    guard, _ = _trained(steps=2)
    state = copy.deepcopy(guard.state_dict())
    state["version"] = version
    with pytest.raises(gg.ConfigurationError, match=r"state\['version'\]"):
        gg.GradGuard().load_state_dict(state)


def test_a_newer_version_asks_for_an_upgrade() -> None:
    guard, _ = _trained(steps=2)
    state = {**guard.state_dict(), "version": 99}
    with pytest.raises(gg.ConfigurationError, match=r"newer than this gradguard.*upgrade"):
        gg.GradGuard().load_state_dict(state)


@pytest.mark.parametrize("attached", [True, False])
def test_a_per_layer_autoclip_state_into_a_global_one_is_refused(attached: bool) -> None:
    guard, _ = _trained("AutoClip(per_layer)", steps=3)
    other = _fresh("AutoClip", attached)
    with pytest.raises(gg.ConfigurationError, match=r"per_layer=False.*per_layer=True"):
        other.load_state_dict(guard.state_dict())
    assert other.step == 0
