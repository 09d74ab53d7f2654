"""Gradient accumulation and mixed precision: one decision per optimizer step, however
many micro-batches; a ``GradScaler`` keeps its own overflow steps; CPU autocast runs."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import gradguard as gg
from tests.faults._kit import Snapshot, X, Y, nonfinite_events, poison, tiny

MICRO = 4


def test_accumulation_takes_one_decision_per_optimizer_step() -> None:
    model = tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sink = gg.MemorySink()
    guard = gg.attach(model, opt, on_nonfinite="skip", sinks=[sink], log_every_n_steps=1,
                      warn=False)  # fmt: skip
    chunks = list(zip(X.chunk(MICRO), Y.chunk(MICRO)))
    for step in range(6):
        opt.zero_grad(set_to_none=True)
        for micro, (x, y) in enumerate(chunks):
            loss = nn.functional.mse_loss(model(x), y) / MICRO
            loss.backward()
            guard.observe_loss(loss * MICRO)
            if step == 3 and micro == 1:
                poison(model[0].weight)  # one bad micro-batch poisons the whole step
        before = Snapshot(model, opt)
        opt.step()
        assert guard.step == step + 1  # one decision per optimizer step, not per micro-batch
        if step == 3:
            assert before.weights_equal(model) and before.state_equal(opt)
        else:
            assert len(before.changed(model)) == 6
    assert guard.skipped_steps == 1
    assert len(nonfinite_events(guard)) == 1
    assert [s for s, _ in sink.scalars["gradguard/grad_norm_total"]] == list(range(6))


def test_fused_adam_with_a_cpu_grad_scaler() -> None:
    model = tiny()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    sink = gg.MemorySink()
    guard = gg.attach(model, opt, on_nonfinite="skip", sinks=[sink], log_every_n_steps=1,
                      warn=False)  # fmt: skip
    for step in range(6):
        opt.zero_grad(set_to_none=True)
        scale = scaler.get_scale()
        scaler.scale(nn.functional.mse_loss(model(X), Y)).backward()
        unscaled = math.sqrt(
            sum(float((p.grad / scale).double().pow(2).sum()) for p in model.parameters())
        )
        if step == 2:
            poison(model[4].bias, float("inf"))  # an fp16-style overflow: the scaler's business
        before = Snapshot(model, opt)
        scaler.step(opt)
        scaler.update()
        if step == 2:
            assert before.weights_equal(model) and before.state_equal(opt)
            assert scaler.get_scale() == scale / 2  # the scaler saw it and backed off
        else:
            assert len(before.changed(model)) == 6
            # Fused optimizers see scaled gradients: the guard reports unscaled norms.
            assert sink.latest("gradguard/grad_norm_total") == pytest.approx(unscaled, rel=1e-5)
        assert "found_inf" not in opt.__dict__ and "grad_scale" not in opt.__dict__
    # The scaler's own overflow step is neither gradguard's skip nor a NaN/Inf alarm.
    assert guard.skipped_steps == 0 and guard.nonfinite_steps == 0
    assert nonfinite_events(guard) == []


def test_cpu_autocast_bf16_runs_and_is_measured() -> None:
    model = tiny(act=nn.ReLU)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sink = gg.MemorySink()
    monitor = gg.ActivationMonitor(every_n_steps=2, window=1)
    guard = gg.attach(model, opt, activations=monitor, sinks=[sink], log_every_n_steps=1)
    for _ in range(4):
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(X)
        nn.functional.mse_loss(out.float(), Y).backward()
        assert all(p.grad.dtype == torch.float32 for p in model.parameters())
        opt.step()
    assert guard.step == 4 and list(guard.events) == []
    assert math.isfinite(sink.latest("gradguard/grad_norm_total"))
    assert "gradguard/dead_fraction/0" in sink.scalars  # bf16 activations are sampled
