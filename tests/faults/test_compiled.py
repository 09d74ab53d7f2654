"""Compiled models (``torch.compile`` with the ``aot_eager`` backend: no C++ compiler).

Under compile the depth order is the modules' registration order (forward hooks added
after compilation never run), so a textbook vanishing-gradient sigmoid stack is diagnosed
right when its modules are registered input first, as ``nn.Sequential`` does, and wrongly
when they are not.
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
    assert guard.depth_source == "registration"
    assert guard.layers == [f"l{i}" for i in range(DEPTH)]
    kinds = [e.kind for e in guard.events]
    assert "vanishing" in kinds and "exploding" not in kinds
    (event,) = [e for e in guard.events if e.kind == "vanishing"]
    assert "l0" in event.layers and f"l{DEPTH - 1}" not in event.layers  # the input side
    spots = guard.blind_spots()
    assert any("torch.compile" in s and "activations are not sampled" in s for s in spots)
    assert any("registration order" in s for s in spots)


@pytest.mark.xfail(
    strict=True,
    reason="_binding.py Binding.create installs no DepthRecorder on compiled models, so "
    "their depth order is registration order; registered output first, the vanishing "
    "stack reads as exploding. Dynamo traces forward hooks present at its first "
    "compilation: recording on compiled models too (hooks removed at the first step, one "
    "recompilation) would learn the data's order when attach precedes the first forward",
)
def test_a_compiled_stack_registered_output_first_is_still_vanishing() -> None:
    guard = _train(reverse=True)
    kinds = [e.kind for e in guard.events]
    assert "vanishing" in kinds and "exploding" not in kinds
