"""Compiled models (``torch.compile`` with the ``aot_eager`` backend: no C++ compiler).

``torch.compile(model)``: the first pass after attach runs eagerly (the compiler's
``force_eager`` stance, set from the wrapper's own pre-hook), so the depth order is the
data's path whatever order the modules were registered in, with no recompilation. A module
compiled in place (``model.compile()``) keeps registration order, and says so.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import pytest
import torch
from torch import nn

import gradguard as gg

DEPTH = 8


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> Iterator[None]:
    """Compiled code of one test must not count against another's recompile limit."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class SigmoidStack(nn.Module):
    """``DEPTH`` Linear+sigmoid blocks, the data flowing l0 -> l1 -> ...; the modules are
    registered in that order, or the reverse one."""

    def __init__(self, reverse: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        blocks = [nn.Linear(16, 16) for _ in range(DEPTH)]
        for i in reversed(range(DEPTH)) if reverse else range(DEPTH):
            self.add_module(f"l{i}", blocks[i])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(DEPTH):
            x = torch.sigmoid(getattr(self, f"l{i}")(x))
        return x


def _train(reverse: bool) -> gg.GradGuard:
    model = SigmoidStack(reverse)
    compiled = torch.compile(model, backend="aot_eager")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        # The one warning that activations are not sampled under compile (asserted below).
        warnings.simplefilter("ignore", gg.GradGuardWarning)
        guard = gg.attach(compiled, opt, log_every_n_steps=10, warn=False)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 16, generator=gen), torch.rand(32, 16, generator=gen)
    for _ in range(120):
        opt.zero_grad(set_to_none=True)
        nn.functional.mse_loss(compiled(x), y).backward()
        opt.step()
    return guard


def test_a_compiled_sigmoid_stack_is_reported_as_vanishing() -> None:
    guard = _train(reverse=False)
    assert guard.depth_source == "forward"
    assert guard.layers == [f"l{i}" for i in range(DEPTH)]
    kinds = [e.kind for e in guard.events]
    assert "vanishing" in kinds and "exploding" not in kinds
    (event,) = [e for e in guard.events if e.kind == "vanishing"]
    assert "l0" in event.layers and f"l{DEPTH - 1}" not in event.layers  # the input side
    spots = guard.blind_spots()
    assert any("torch.compile" in s and "activations are not sampled" in s for s in spots)
    assert not any("registration order" in s for s in spots)


def test_the_eager_first_pass_costs_no_recompilation_and_leaves_the_stance() -> None:
    model = SigmoidStack(reverse=True)
    compiled = torch.compile(model, backend="aot_eager")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gg.GradGuardWarning)
        guard = gg.attach(compiled, opt, log_every_n_steps=10, warn=False)
    x, y = torch.randn(4, 16), torch.rand(4, 16)
    torch._dynamo.utils.counters.clear()
    for _ in range(5):
        opt.zero_grad()
        nn.functional.mse_loss(compiled(x), y).backward()
        opt.step()
    assert guard.layers == [f"l{i}" for i in range(DEPTH)]  # the data's order
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert frames == 1, torch._dynamo.utils.counters  # compiled once, after the eager pass
    # The stance is back to default: a fresh compiled function still compiles.
    fn = torch.compile(lambda t: t * 2, backend="aot_eager")
    fn(x)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2
    guard.detach()


def test_a_module_compiled_in_place_keeps_registration_order_and_says_so() -> None:
    model = SigmoidStack(reverse=True)
    model.compile(backend="aot_eager")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gg.GradGuardWarning)
        guard = gg.attach(model, opt, log_every_n_steps=10, warn=False)
    x, y = torch.randn(4, 16), torch.rand(4, 16)
    for _ in range(3):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    assert guard.depth_source == "registration"
    assert any("registration order" in s for s in guard.blind_spots())
    guard.detach()


def test_a_compiled_stack_registered_output_first_is_still_vanishing() -> None:
    guard = _train(reverse=True)
    kinds = [e.kind for e in guard.events]
    assert "vanishing" in kinds and "exploding" not in kinds
