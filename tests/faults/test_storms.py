"""NaN/Inf storms at random steps and layers, across every torch optimizer and its
implementations (for-loop, foreach, fused), with ``on_nonfinite="skip"`` and ``"raise"``.

A skipped step must leave the weights AND the optimizer state bit-identical (including
state an optimizer creates lazily on its first step: the NaN is often on step 0), a
healthy step must update every weight, ``skipped_steps`` must count exactly the poisoned
steps, and a storm is one episode: one Event.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import nn

import gradguard as gg
from tests.faults._kit import Snapshot, X, Y, bit_equal, nonfinite_events, poison, tiny

STEPS = 10


@dataclass(frozen=True)
class Case:
    """One optimizer configuration of the storm."""

    name: str
    make: Callable[[Any], torch.optim.Optimizer]
    sparse: bool = False
    bias: bool = True
    closure: bool = False
    # State entries that are not training state: LBFGS's count of closure evaluations.
    ignore: tuple[str, ...] = field(default=())


def _variants(cls_name: str, impls: tuple[str, ...], **kwargs: Any) -> list[Case]:
    cls = getattr(torch.optim, cls_name)
    label = ",".join(f"{k}={v}" for k, v in kwargs.items())
    out = []
    for impl in impls:
        extra = {} if impl == "default" else {impl: True}
        if impl == "forloop":
            extra = {"foreach": False}
        name = f"{cls_name}[{label + ',' if label else ''}{impl}]"

        def make(params: Any, cls: Any = cls, extra: dict[str, Any] = extra) -> Any:
            return cls(params, **kwargs, **extra)

        out.append(Case(name, make))
    return out


ALL_IMPLS = ("forloop", "foreach", "fused")
LOOP_IMPLS = ("forloop", "foreach")

CASES: list[Case] = [
    *_variants("SGD", ALL_IMPLS, lr=0.05),
    *_variants("SGD", ALL_IMPLS, lr=0.05, momentum=0.9),
    *_variants("SGD", ALL_IMPLS, lr=0.05, momentum=0.9, nesterov=True),
    *_variants("Adam", ALL_IMPLS, lr=1e-2),
    *_variants("Adam", ("fused",), lr=1e-2, amsgrad=True),
    *_variants("AdamW", ALL_IMPLS, lr=1e-2),
    *_variants("Adagrad", ALL_IMPLS, lr=1e-2),
    *_variants("Adamax", LOOP_IMPLS, lr=1e-2),
    *_variants("NAdam", LOOP_IMPLS, lr=1e-2),
    *_variants("RAdam", LOOP_IMPLS, lr=1e-2),
    *_variants("Adadelta", LOOP_IMPLS),
    *_variants("RMSprop", LOOP_IMPLS, lr=1e-2),
    *_variants("RMSprop", ("foreach",), lr=1e-2, momentum=0.9, centered=True),
    *_variants("Rprop", LOOP_IMPLS),
    *_variants("ASGD", LOOP_IMPLS, lr=1e-2),
    *_variants("Adafactor", LOOP_IMPLS, lr=1e-2),
    Case("Muon", lambda p: torch.optim.Muon(p, lr=1e-2), bias=False),
    Case(
        "LBFGS",
        lambda p: torch.optim.LBFGS(p, lr=0.5, max_iter=3),
        closure=True,
        ignore=("func_evals",),
    ),
    Case("SparseAdam", lambda p: torch.optim.SparseAdam(p, lr=1e-2), sparse=True),
]


class SparseNet(nn.Module):
    """Two sparse embeddings: every gradient is a sparse COO tensor."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.words = nn.Embedding(12, 3, sparse=True)
        self.tags = nn.Embedding(5, 3, sparse=True)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.words(idx) + self.tags(idx % 5)


SPARSE_IDX = torch.tensor([[1, 2, 3, 1], [4, 5, 6, 7]])


def _loss(model: nn.Module, sparse: bool) -> torch.Tensor:
    if sparse:
        return model(SPARSE_IDX).pow(2).mean()
    return nn.functional.mse_loss(model(X), Y)


def _plan(name: str) -> tuple[set[int], random.Random]:
    """Poisoned steps: always step 0 (before any optimizer state exists) and three more."""
    rng = random.Random(zlib.crc32(name.encode()))
    return {0, *rng.sample(range(1, STEPS), 3)}, rng


def _closure(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    sparse: bool,
    target: torch.Tensor | None,
    value: float,
    index: int,
) -> Callable[[], torch.Tensor]:
    """Forward and backward, poisoning ``target``'s gradient on the first call only (LBFGS
    evaluates its closure several times per step)."""
    calls: list[int] = []

    def closure() -> torch.Tensor:
        calls.append(1)
        opt.zero_grad(set_to_none=True)
        loss = _loss(model, sparse)
        loss.backward()
        if target is not None and len(calls) == 1:
            poison(target, value, index)
        return loss

    return closure


def _storm(case: Case, policy: str | None) -> tuple[gg.GradGuard | None, list[str], Snapshot]:
    """Run the storm; ``policy=None`` is the reference run: no guard, poisoned steps
    simply not taken. Returns the guard, what went wrong, and the final weights and state."""
    model: nn.Module = SparseNet() if case.sparse else tiny(bias=case.bias)
    opt = case.make(model.parameters())
    guard = None
    if policy is not None:
        guard = gg.attach(model, opt, on_nonfinite=policy, activations=False, warn=False)  # type: ignore[arg-type]
    bad, rng = _plan(case.name)
    params = list(model.parameters())
    problems: list[str] = []
    for step in range(STEPS):
        target = rng.choice(params) if step in bad else None
        value = rng.choice([float("nan"), float("inf"), -float("inf")])
        index = rng.randrange(64)
        closure = _closure(model, opt, case.sparse, target, value, index)
        if not case.closure:
            closure()
        before = Snapshot(model, opt)
        if guard is None and step in bad:
            continue  # the reference: the poisoned step is not taken
        try:
            opt.step(closure) if case.closure else opt.step()
        except gg.GradientAlarmError:
            if policy != "raise" or step not in bad:
                raise
        else:
            if policy == "raise" and step in bad:
                problems.append(f"step {step}: no GradientAlarmError")
        if step in bad:
            if not before.weights_equal(model):
                problems.append(f"step {step}: weights changed {before.changed(model)}")
            if not before.state_equal(opt, ignore=case.ignore):
                problems.append(f"step {step}: optimizer state changed")
        else:
            unchanged = set(dict(model.named_parameters())) - set(before.changed(model))
            if unchanged:
                problems.append(f"step {step}: healthy step left {sorted(unchanged)} unchanged")
    return guard, problems, Snapshot(model, opt)


def _same_as_reference(case: Case, final: Snapshot) -> bool:
    _, _, reference = _storm(case, None)
    weights = all(bit_equal(final.params[n], reference.params[n]) for n in reference.params)
    state = bit_equal(_without(final.state, case.ignore), _without(reference.state, case.ignore))
    return weights and state


def _without(state: dict[str, Any], ignore: tuple[str, ...]) -> dict[str, Any]:
    entries = {
        k: {n: v for n, v in e.items() if n not in ignore} for k, e in state["state"].items()
    }
    return {**state, "state": entries}


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_a_storm_is_skipped_bit_identically(case: Case) -> None:
    guard, problems, final = _storm(case, "skip")
    assert guard is not None
    assert problems == []
    bad, _ = _plan(case.name)
    assert guard.skipped_steps == len(bad)
    assert guard.nonfinite_steps == len(bad)
    assert guard.step == STEPS
    (event,) = nonfinite_events(guard)  # one episode: the NaN steps are close together
    assert event.step == 0 and event.details["skipped"] is True
    # The whole run ends bit-identical to one that never took the poisoned steps.
    assert _same_as_reference(case, final)


RAISE_CASES = (
    "SGD[lr=0.05,momentum=0.9,fused]",
    "Adam[lr=0.01,fused]",
    "Adam[lr=0.01,foreach]",
    "LBFGS",
    "SparseAdam",
)


@pytest.mark.parametrize("case", [c for c in CASES if c.name in RAISE_CASES], ids=lambda c: c.name)
def test_a_storm_raises_before_anything_changes(case: Case) -> None:
    guard, problems, final = _storm(case, "raise")
    assert guard is not None
    assert problems == []
    bad, _ = _plan(case.name)
    assert guard.skipped_steps == 0
    assert guard.nonfinite_steps == len(bad)
    assert guard.step == STEPS  # a raised step still counts: the next one is step + 1
    assert _same_as_reference(case, final)
