"""gg.attach in a plain accelerate loop: the AcceleratedOptimizer, accumulation, a user's
accelerator.clip_grad_norm_ noticed, and a failed attach that leaves nothing behind."""

from __future__ import annotations

import runpy
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from torch import nn

import gradguard as gg

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture(autouse=True)
def fresh_accelerate_state() -> Iterator[None]:
    # accelerate keeps process-wide singletons: leave them as a Trainer test expects them.
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def build() -> tuple[nn.Sequential, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1)
    )
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def data(count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [
        (torch.randn(4, 8, generator=gen), torch.randn(4, 1, generator=gen)) for _ in range(count)
    ]


def total_norm(model: nn.Module) -> float:
    grads = [p.grad.detach().double() for p in model.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))


def test_attach_to_a_prepared_optimizer_decides_once_per_accumulated_step() -> None:
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=4)
    model, optimizer = build()
    model, optimizer = accelerator.prepare(model, optimizer)
    sink = gg.MemorySink()
    synced: list[float] = []
    with gg.attach(model, optimizer, sinks=[sink], log_every_n_steps=1) as guard:
        for x, y in data(12):
            with accelerator.accumulate(model):
                accelerator.backward(nn.functional.mse_loss(model(x), y))
                if accelerator.sync_gradients:
                    synced.append(total_norm(model))
                optimizer.step()
                optimizer.zero_grad()
        assert guard.step == 3  # 12 micro-batches, 3 optimizer steps
    logged = [value for _, value in sink.scalars["gradguard/grad_norm_total"]]
    assert logged == pytest.approx(synced, rel=1e-5)


def test_accelerator_clip_grad_norm_before_the_step_is_noticed() -> None:
    accelerator = Accelerator(cpu=True)
    model, optimizer = build()
    model, optimizer = accelerator.prepare(model, optimizer)
    with pytest.warns(gg.GradGuardWarning, match=r"sat at 0\.1 on 8 of the last 8 steps") as caught:
        guard = gg.attach(model, optimizer)
        for x, y in data(20):
            accelerator.backward(nn.functional.mse_loss(model(x), y) * 100)
            accelerator.clip_grad_norm_(model.parameters(), 0.1)
            optimizer.step()
            optimizer.zero_grad()
        guard.close()
    assert len(caught) == 1  # said once
    assert "clip=gg.NormClip(0.1)" in str(caught[0].message)


class BrokenDetector(gg.Detector):
    def bind(self, context: gg.GuardContext) -> None:
        raise RuntimeError("this detector cannot bind")


def _hooks(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[int, ...]:
    inner = optimizer.optimizer  # type: ignore[attr-defined]
    return (
        len(inner._optimizer_step_pre_hooks),
        len(inner._optimizer_step_post_hooks),
        sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()),
        sum(len(p._post_accumulate_grad_hooks or {}) for p in model.parameters()),
    )


def test_a_failed_attach_leaves_nothing_behind() -> None:
    accelerator = Accelerator(cpu=True)
    model, optimizer = build()
    model, optimizer = accelerator.prepare(model, optimizer)
    before = _hooks(model, optimizer)
    with pytest.raises(RuntimeError, match="cannot bind"):
        gg.attach(model, optimizer, detectors=[BrokenDetector()])
    assert _hooks(model, optimizer) == before
    # The optimizer is free again: a retry is not "already watched by another GradGuard".
    guard = gg.attach(model, optimizer)
    assert _hooks(model, optimizer) != before
    guard.detach()
    assert _hooks(model, optimizer) == before


@pytest.mark.parametrize("accelerator_clip", [None, "0.5"])
def test_example_runs_and_notices_accelerates_clip(
    accelerator_clip: str | None,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = ["--epochs", "1"] + (
        ["--accelerator-clip", accelerator_clip] if accelerator_clip else []
    )
    monkeypatch.setattr(sys, "argv", ["accelerate_loop.py", *args])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runpy.run_path(str(EXAMPLES / "accelerate_loop.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "micro-batches: 128; optimizer steps seen by gradguard: 32" in out
    expected = ["clipped_elsewhere"] if accelerator_clip else []
    assert f"Events: {expected}" in out
    assert len([w for w in caught if issubclass(w.category, gg.GradGuardWarning)]) == len(expected)
