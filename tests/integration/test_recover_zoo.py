"""The healthy zoo with the recovery ladder on: no Event, no warning, and training exactly
as without it (its snapshots and its per-step bookkeeping change nothing)."""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import pytest
import torch

import gradguard as gg
from tests.zoo import CASES, HEALTHY, build


@pytest.fixture(scope="module", autouse=True)
def single_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _train(name: str, recover: gg.Recover | None) -> tuple[list[torch.Tensor], gg.GradGuard]:
    work = build(name)
    sink = gg.MemorySink()
    guard = gg.attach(work.model, work.optimizer, sinks=[sink], on_instability=recover)
    work.model.train()
    for _ in range(CASES[name].steps):
        work.optimizer.zero_grad(set_to_none=True)
        loss = work.loss()
        guard.observe_loss(loss)
        loss.backward()
        work.optimizer.step()
    guard.detach()
    return [p.detach().clone() for p in work.model.parameters()], guard


@pytest.mark.parametrize("name", HEALTHY)
def test_healthy_model_is_silent_and_unaffected_with_the_ladder_on(name: str) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        guarded, guard = _train(name, gg.Recover())
    assert list(guard.events) == []
    assert [str(w.message) for w in caught if issubclass(w.category, gg.GradGuardWarning)] == []
    assert guard.skipped_steps == 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain, _ = _train(name, None)
    assert all(torch.equal(a, b) for a, b in zip(guarded, plain))
