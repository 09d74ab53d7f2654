"""The healthy zoo stays silent with the stability detectors fed the loss.

``tests/integration/test_zoo.py`` trains the zoo without ``guard.observe_loss``, so the
loss-aware detectors see nothing there. Here every healthy case trains on three seeds with
the loss handed over each step and the per-step update-spike detector switched on (the
opt-in variant): no Event and no warning may come out. Broken cases still get their own
Event kind with the loss fed.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import pytest
import torch

import gradguard as gg
from gradguard.detect.updates import UpdateSpikeDetector
from tests.zoo import BROKEN, CASES, HEALTHY, build


@pytest.fixture(scope="module", autouse=True)
def single_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _detectors() -> list[gg.Detector]:
    found = [d for d in gg.default_detectors() if not isinstance(d, UpdateSpikeDetector)]
    return [*found, UpdateSpikeDetector(every_n_steps=1)]


def run_with_loss(name: str, seed: int) -> tuple[gg.GradGuard, list[str]]:
    case = CASES[name]
    work = build(name, seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        guard = gg.attach(work.model, work.optimizer, detectors=_detectors())
        work.model.train()
        for _ in range(case.steps):
            work.optimizer.zero_grad(set_to_none=True)
            loss = work.loss()
            guard.observe_loss(loss)
            loss.backward()
            work.optimizer.step()
        guard.detach()
    return guard, [str(w.message) for w in caught]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("name", HEALTHY)
def test_healthy_models_stay_silent_with_the_loss_fed(name: str, seed: int) -> None:
    guard, caught = run_with_loss(name, seed)
    assert [(e.kind, e.step, e.message) for e in guard.events] == []
    assert caught == []


@pytest.mark.parametrize("name", BROKEN)
def test_broken_models_keep_their_diagnosis_with_the_loss_fed(name: str) -> None:
    guard, _ = run_with_loss(name, 0)
    kinds = [e.kind for e in guard.events]
    assert CASES[name].expected in kinds
