"""The pathology zoo under default GradGuard settings.

Every broken model must raise the Event kind of its pathology, naming the right layers;
every healthy model must raise no Event and no warning at all. The confusion table (case x
Event kind) is printed (``pytest -s``) and asserted on.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import torch

import gradguard as gg
from gradguard._events import EVENT_KINDS
from tests.zoo import BROKEN, CASES, HEALTHY, run_case


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


def confusion_table(results: dict[str, ZooResult]) -> str:
    """Rows: cases; columns: Event kinds (counts); last column: whether the row is right."""
    kinds = list(EVENT_KINDS)
    head = f"{'case':<24} {'expected':<11}" + "".join(f"{k:>11}" for k in kinds) + "  verdict"
    lines = [head, "-" * len(head)]
    for name, result in results.items():
        case = CASES[name]
        counts: Counter[str] = Counter(event.kind for event in result.sink.events)
        if case.expected is None:
            right = not counts and not result.warnings
        else:
            right = counts[case.expected] > 0
        cells = "".join(f"{counts[k] if counts[k] else '.':>11}" for k in kinds)
        expected = case.expected or "healthy"
        lines.append(f"{name:<24} {expected:<11}{cells}  {'ok' if right else 'WRONG'}")
    return "\n".join(lines)


def test_confusion_table(zoo: dict[str, ZooResult]) -> None:
    table = confusion_table(zoo)
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


@pytest.mark.parametrize("name", HEALTHY)
def test_healthy_model_stays_silent_when_checked_five_times_as_often(
    single_thread: None, name: str
) -> None:
    # Same thresholds, 5x more logging steps: the "sustained" rules get 5x more chances to
    # misfire (and see a 5x shorter stretch of training per streak).
    result = _run(name, log_every_n_steps=10)
    assert result.sink.events == [], [str(e) for e in result.sink.events]
    assert result.warnings == []
