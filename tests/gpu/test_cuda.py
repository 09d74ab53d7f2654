"""Checks that need a CUDA device: skipped on CPU-only machines (CI), run on a lent GPU.

``torch.cuda.set_sync_debug_mode("error")`` makes every synchronising call raise, so these
tests prove on real hardware what tests/unit/test_no_sync.py proves with a counter on CPU,
and they also catch ``.tolist()``/``.cpu()`` reads that the CPU counter cannot see.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import pytest
import torch
from torch import nn

import gradguard as gg
from tests.strategies import clip_classes, sample

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@contextlib.contextmanager
def sync_errors() -> Iterator[None]:
    torch.cuda.synchronize()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Synchronization debug mode is a prototype")
        torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 10)
    ).cuda()


def _clip_strategies() -> list[object]:
    found: list[object] = [None, 1.0, gg.NormClip(0.5, per_layer=True)]
    return found + [sample(cls) for cls in clip_classes()]


def _step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    model(x).square().mean().backward()
    opt.step()


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("clip", _clip_strategies(), ids=repr)
def test_non_logging_steps_never_sync(clip: object, fused: bool) -> None:
    model = _model()
    # capturable keeps torch's own Adam from reading its step counter on the host.
    opt = torch.optim.Adam(model.parameters(), fused=fused, capturable=not fused)
    guard = gg.attach(
        model,
        opt,
        clip=clip,
        log_every_n_steps=1000,  # type: ignore[arg-type]
        activations=gg.ActivationMonitor(every_n_steps=3, window=1),
    )
    x = torch.randn(32, 64, device="cuda")
    for _ in range(2):
        _step(model, opt, x)  # step 0 logs
    with sync_errors():
        for _ in range(6):  # includes a sampled activation window (step 3)
            _step(model, opt, x)
    guard.detach()


def test_fused_skip_is_sync_free_and_keeps_weights() -> None:
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), fused=True)
    guard = gg.attach(model, opt, on_nonfinite="skip", on_spike="skip", log_every_n_steps=1000)
    x = torch.randn(32, 64, device="cuda")
    for _ in range(2):
        _step(model, opt, x)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt.zero_grad()
    model(x).square().mean().backward()
    model[0].weight.grad[0, 0] = float("nan")  # (writing a Python float is itself a sync)
    with sync_errors():
        opt.step()
    with pytest.warns(gg.GradGuardWarning, match="NaN/Inf"):
        assert guard.skipped_steps == 1  # reading the counter drains the pending flags
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_nonfinite_warning_arrives_at_most_one_step_late() -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    guard = gg.attach(model, opt, log_every_n_steps=1000)
    x = torch.randn(32, 64, device="cuda")
    _step(model, opt, x)
    opt.zero_grad()
    model(x).square().mean().backward()
    model[2].weight.grad[0, 0] = float("inf")
    opt.step()
    torch.cuda.synchronize()
    with pytest.warns(gg.GradGuardWarning, match="'2'"):
        _step(model, opt, x)
    assert [e.kind for e in guard.events] == ["nonfinite"]
    assert guard.events[0].step == 1


@pytest.mark.parametrize("fused", [False, True])
def test_fp16_gradscaler_norms_are_unscaled(fused: bool) -> None:
    model = _model()
    opt = torch.optim.Adam(model.parameters(), fused=fused)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**16)
    sink = gg.MemorySink()
    guard = gg.attach(model, opt, sinks=[sink], log_every_n_steps=1, activations=False)
    x = torch.randn(32, 64, device="cuda")
    reference = _model()
    reference.load_state_dict(model.state_dict())
    with torch.autocast("cuda", dtype=torch.float16):
        ref_loss = reference(x).float().square().mean()
    ref_loss.backward()
    expected = torch.linalg.vector_norm(
        torch.stack([p.grad.float().norm() for p in reference.parameters()])
    ).item()
    opt.zero_grad()
    with torch.autocast("cuda", dtype=torch.float16):
        loss = model(x).float().square().mean()
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    assert sink.latest("gradguard/grad_norm_total") == pytest.approx(expected, rel=1e-2)
    assert guard.events == type(guard.events)(maxlen=guard.events.maxlen)


def test_fused_gradscaler_overflow_is_not_gradguards_business() -> None:
    model = _model()
    opt = torch.optim.Adam(model.parameters(), fused=True)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**16)
    guard = gg.attach(model, opt, on_nonfinite="skip", log_every_n_steps=1)
    x = torch.randn(32, 64, device="cuda")
    opt.zero_grad()
    with torch.autocast("cuda", dtype=torch.float16):
        loss = model(x).float().square().mean()
    scaler.scale(loss).backward()
    model[0].weight.grad[0, 0] = float("inf")  # what an fp16 overflow looks like
    scale_before = scaler.get_scale()
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() < scale_before  # the scaler saw its overflow and backed off
    assert guard.skipped_steps == 0
    assert [e.kind for e in guard.events] == []


def test_histograms_count_on_the_device_without_a_sync() -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    histograms = gg.Histograms(log="all", bins=32, log10_range=(-10.0, 2.0))
    guard = gg.attach(model, opt, histograms=histograms, log_every_n_steps=1, activations=False)
    x = torch.randn(32, 64, device="cuda")
    for _ in range(2):
        _step(model, opt, x)
    with sync_errors():  # the device half of a logging step's histograms: no host read
        found = histograms.metrics()
    rows = found["grad_histogram"]
    assert isinstance(rows, torch.Tensor) and rows.is_cuda
    first = model[0]
    entries = torch.cat([first.weight.grad.reshape(-1), first.bias.grad.reshape(-1)]).cpu()
    logs = entries.abs().log10()
    binned = logs[torch.isfinite(logs)].clamp(-10.0, 2.0)
    expected = torch.histc(binned, bins=32, min=-10.0, max=2.0).double()
    counts = rows[0, 2:34].cpu()
    assert counts.sum() == expected.sum() == entries.numel() - int((entries == 0).sum())
    assert (counts - expected).abs().sum() <= 2  # float32 log10 may differ on a bin edge
    guard.detach()
