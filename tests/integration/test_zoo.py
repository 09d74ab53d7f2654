"""The pathology zoo under default GradGuard settings.

Every broken model must raise the Event kind of its pathology, naming the right layers;
every healthy model must raise no Event and no warning at all, with the loss handed over
(as the Lightning callback does) or not (a plain loop), and when checked five times as
often. The confusion table (case x Event kind) is printed (``pytest -s``, or
``python -m tests.zoo``) and asserted on.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import torch

import gradguard as gg
from gradguard._events import EVENT_KINDS
from tests.zoo import BROKEN, CASES, HEALTHY, confusion_table, run_case


@dataclass
class ZooResult:
    guard: gg.GradGuard
    sink: gg.MemorySink
    warnings: list[str]
    report: str


@pytest.fixture(scope="module")
def single_thread() -> Iterator[None]:
    # Tiny models run faster on one thread, and the CI machine has two shared cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _run(name: str, **guard_kwargs: object) -> ZooResult:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        guard, sink = run_case(name, **guard_kwargs)  # type: ignore[arg-type]
        report = guard.report()
        guard.detach()
    return ZooResult(guard, sink, [f"{w.category.__name__}: {w.message}" for w in caught], report)


@pytest.fixture(scope="module")
def zoo(single_thread: None) -> dict[str, ZooResult]:
    """Every case trained once with default settings (only a MemorySink added)."""
    return {name: _run(name) for name in CASES}


def test_confusion_table(zoo: dict[str, ZooResult]) -> None:
    table = confusion_table(
        {name: [e.kind for e in r.sink.events] for name, r in zoo.items()},
        {name: bool(r.warnings) for name, r in zoo.items()},
    )
    print("\n" + table)
    rows = table.splitlines()[2:]
    assert len(rows) == len(CASES)
    assert all(row.endswith("  ok") for row in rows), table
    for name in HEALTHY:
        row = next(r for r in rows if r.startswith(name))
        assert row.split()[2:-1] == ["."] * len(EVENT_KINDS), table


@pytest.mark.parametrize("name", BROKEN)
def test_broken_model_raises_its_event_on_the_right_layers(
    zoo: dict[str, ZooResult], name: str
) -> None:
    case = CASES[name]
    assert case.expected is not None
    result = zoo[name]
    found = [e for e in result.sink.events if e.kind == case.expected]
    assert found, (
        f"{name}: expected a {case.expected} Event, got {[e.kind for e in result.sink.events]}"
    )
    event = found[0]
    watched = set(result.guard.layers)
    assert event.layers and set(event.layers) <= watched
    assert set(case.layers) <= set(event.layers), (event.layers, event.message)
    if case.first:
        assert event.layers[0] in case.first, (event.layers, event.message)
    # The message states the evidence with numbers; the advice is a remedy, not a shrug.
    assert any(ch.isdigit() for ch in event.message)
    assert len(event.advice) > 40
    # A persisting condition is one Event, not one per logging step.
    assert len(found) == 1, [e.message for e in found]
    # The user saw it as a warning too, and report() names it.
    assert any("GradGuardWarning" in w for w in result.warnings)
    assert case.expected in result.report


def test_vanishing_advice_fits_a_sigmoid_stack(zoo: dict[str, ZooResult]) -> None:
    event = next(e for e in zoo["deep_sigmoid"].sink.events if e.kind == "vanishing")
    assert "Sigmoid" in event.advice and "ReLU" in event.advice and "He" in event.advice
    assert event.value >= 1e4  # output side / input side, measured ~10^6.7


def test_exploding_advice_fits_the_evidence(zoo: dict[str, ZooResult]) -> None:
    linear = next(e for e in zoo["deep_linear_large_init"].sink.events if e.kind == "exploding")
    assert "too large" in linear.advice and "Xavier/He" in linear.advice
    assert "AutoClip" in linear.advice
    rnn = next(e for e in zoo["rnn_large_recurrent"].sink.events if e.kind == "exploding")
    assert "recurrent" in rnn.advice and "LSTM or GRU" in rnn.advice
    assert set(rnn.layers) == {"inp", "rnn"}  # not the head, whose gradient is normal


@pytest.mark.parametrize("name", HEALTHY)
def test_healthy_model_raises_nothing(zoo: dict[str, ZooResult], name: str) -> None:
    result = zoo[name]
    assert result.sink.events == [], [str(e) for e in result.sink.events]
    assert result.warnings == []
    assert "Verdict: HEALTHY" in result.report


def test_symmetric_units_name_the_constant_layers_and_the_init(zoo: dict[str, ZooResult]) -> None:
    events = zoo["constant_init"].sink.events
    symmetric = next(e for e in events if e.kind == "symmetric_units")
    assert "He (nn.init.kaiming_normal_)" in symmetric.advice and "constant" in symmetric.advice
    # Its units die together; the dead-unit advice names the cause, not the learning rate.
    dead = next(e for e in events if e.kind == "dead_units")
    assert "identical copies" in dead.advice and "learning rate" not in dead.advice


def test_badly_scaled_inputs_get_standardise(zoo: dict[str, ZooResult]) -> None:
    raw = next(e for e in zoo["raw_pixels"].sink.events if e.kind == "input_scale")
    assert "RMS 1" in raw.message and "standardise the inputs" in raw.advice
    mixed = next(e for e in zoo["mixed_feature_scales"].sink.events if e.kind == "input_scale")
    assert "64 features whose scales differ" in mixed.message


def test_a_learning_rate_too_high_is_named_and_the_symptoms_point_to_it(
    zoo: dict[str, ZooResult],
) -> None:
    events = zoo["tanh_adam_high_lr"].sink.events
    lr = next(e for e in events if e.kind == "lr_too_high")
    assert lr.step == 50  # before the saturation and vanishing it causes
    assert "weights grew" in lr.message and "the usual ~1e-3" in lr.message
    assert "lower the learning rate" in lr.advice and "warm" in lr.advice
    for event in events:
        assert "sigmoid's slope" not in event.advice  # tanh's slope is at most 1
        assert "re-initialise" not in event.advice  # the weights grew; they did not start large
        if event.kind in ("vanishing", "saturation"):
            assert "the learning rate is too high" in event.advice


@pytest.mark.parametrize("name", HEALTHY)
def test_healthy_model_stays_silent_without_the_loss(single_thread: None, name: str) -> None:
    # A plain loop that never calls guard.observe_loss: the other default.
    result = _run(name, observe_loss=False)
    assert result.sink.events == [], [str(e) for e in result.sink.events]
    assert result.warnings == []


@pytest.mark.parametrize("name", HEALTHY)
def test_healthy_model_stays_silent_when_checked_five_times_as_often(
    single_thread: None, name: str
) -> None:
    # Same thresholds, 5x more logging steps: the "sustained" rules get 5x more chances to
    # misfire (and see a 5x shorter stretch of training per streak).
    result = _run(name, log_every_n_steps=10)
    assert result.sink.events == [], [str(e) for e in result.sink.events]
    assert result.warnings == []
