"""gg.attach on the wrappers of a real Lightning Fabric (CPU, one device): names, norms,
precision plugins, NaN skip, and a user's fabric.clip_gradients noticed."""

from __future__ import annotations

import math
import runpy
import sys
import warnings
from pathlib import Path

import pytest
import torch
from lightning.fabric import Fabric
from torch import nn

import gradguard as gg

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

# Third-party noise: Lightning 2.6 trips a torch pytree deprecation (FutureWarning).
pytestmark = pytest.mark.filterwarnings("ignore:.*isinstance.treespec, LeafSpec.*:FutureWarning")


def build() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1)
    )


def total_norm(model: nn.Module) -> float:
    grads = [p.grad.detach().double() for p in model.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))


def batches(count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [
        (torch.randn(16, 8, generator=gen), torch.randn(16, 1, generator=gen)) for _ in range(count)
    ]


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_attach_to_fabric_wrappers_sees_the_users_layers_and_gradients(precision: str) -> None:
    fabric = Fabric(accelerator="cpu", devices=1, precision=precision)  # type: ignore[arg-type]
    model = build()
    fabric_model, fabric_opt = fabric.setup(model, torch.optim.AdamW(model.parameters(), lr=1e-2))
    sink = gg.MemorySink()
    seen: list[float] = []
    with gg.attach(fabric_model, fabric_opt, sinks=[sink], log_every_n_steps=1) as guard:
        assert guard.layers == ["0", "2", "4"]  # not "_forward_module.0"
        for x, y in batches(5):
            loss = nn.functional.mse_loss(fabric_model(x).float(), y)
            fabric.backward(loss)
            seen.append(total_norm(model))
            fabric_opt.step()
            fabric_opt.zero_grad()
        assert guard.step == 5
    logged = [value for _, value in sink.scalars["gradguard/grad_norm_total"]]
    assert logged == pytest.approx(seen, rel=1e-5)
    assert "gradguard/grad_norm/2" in sink.scalars


def test_nan_step_is_skipped_under_fabric() -> None:
    fabric = Fabric(accelerator="cpu", devices=1)
    model = build()
    fabric_model, fabric_opt = fabric.setup(model, torch.optim.AdamW(model.parameters(), lr=1e-2))
    guard = gg.attach(fabric_model, fabric_opt, on_nonfinite="skip", warn=False)
    for step, (x, y) in enumerate(batches(4)):
        before = [p.detach().clone() for p in model.parameters()]
        loss = nn.functional.mse_loss(fabric_model(x * (math.nan if step == 2 else 1.0)), y)
        fabric.backward(loss)
        fabric_opt.step()
        fabric_opt.zero_grad()
        changed = [not torch.equal(a, b) for a, b in zip(before, model.parameters())]
        assert not any(changed) if step == 2 else all(changed)
    assert guard.skipped_steps == 1
    guard.close()


def test_fabric_clip_gradients_before_the_step_is_noticed() -> None:
    fabric = Fabric(accelerator="cpu", devices=1)
    model = build()
    fabric_model, fabric_opt = fabric.setup(model, torch.optim.AdamW(model.parameters(), lr=1e-2))
    sink = gg.MemorySink()
    guard = gg.attach(fabric_model, fabric_opt, sinks=[sink], warn=False)
    for x, y in batches(12):
        fabric.backward(nn.functional.mse_loss(fabric_model(x), y) * 100)
        fabric.clip_gradients(fabric_model, fabric_opt, max_norm=0.5)
        fabric_opt.step()
        fabric_opt.zero_grad()
    guard.close()
    (event,) = sink.events
    assert event.kind == "clipped_elsewhere" and event.step == 7  # the 8th pinned step
    assert "sat at 0.5 on 8 of the last 8 steps" in event.message
    assert "clip=gg.NormClip(0.5)" in event.advice


@pytest.mark.parametrize("fabric_clip", [None, "0.5"])
def test_example_runs_and_notices_fabrics_clip(
    fabric_clip: str | None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--steps", "40"] + (["--fabric-clip", fabric_clip] if fabric_clip else [])
    monkeypatch.setattr(sys, "argv", ["fabric_loop.py", *args])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runpy.run_path(str(EXAMPLES / "fabric_loop.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "layers: 0, 2, 4" in out and "optimizer steps: 40" in out
    expected = ["clipped_elsewhere"] if fabric_clip else []
    assert f"Events: {expected}" in out
    assert len([w for w in caught if issubclass(w.category, gg.GradGuardWarning)]) == len(expected)
