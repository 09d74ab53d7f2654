"""DistributedDataParallel: two gloo processes take the same decisions, step by step.

After DDP's all-reduce every rank holds the same gradients, so every rank computes the same
norms, clip threshold and skip decision with no communication of gradguard's own; only
rank 0 writes to sinks and warns.
"""

from __future__ import annotations

import math
import warnings
from contextlib import nullcontext
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import gradguard as gg
from tests.distributed._common import (
    batch,
    events_of,
    flat_params,
    guard_warnings,
    make_mlp,
    max_gap_across_ranks,
    shared_state,
)
from tests.distributed._launch import run_workers

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(120)]

STEPS = 6
NAN_STEP = 3


# ---------------------------------------------------------------- workers (run in each rank)
def nan_on_rank_one(rank: int, world_size: int) -> dict[str, Any]:
    """AutoClip + on_nonfinite="skip" under DDP; rank 1's batch holds a NaN at NAN_STEP.

    Run twice in the same process group: with Adam's foreach path (the skip reads one flag
    on the host) and with fused Adam (the skip goes through ``found_inf``, sync-free).
    """
    out: dict[str, Any] = {}
    for fused in (False, True):
        model = make_mlp()
        ddp = DDP(model)
        opt = torch.optim.Adam(ddp.parameters(), lr=1e-2, fused=fused)
        sink = gg.MemorySink()
        moved = []
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            guard = gg.attach(
                ddp,
                opt,
                clip=gg.AutoClip(percentile=50.0),
                on_nonfinite="skip",
                log_every_n_steps=2,
                sinks=[sink],
            )
            for step in range(STEPS):
                x, y = batch(rank, step)
                if rank == 1 and step == NAN_STEP:
                    x[0, 0] = float("nan")
                before = flat_params(model)
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(ddp(x), y).backward()
                opt.step()
                moved.append(not torch.equal(before, flat_params(model)))
            report = guard.report()
            guard.detach()
        params = flat_params(model)
        out["fused" if fused else "foreach"] = {
            "moved": moved,
            "step": guard.step,
            "skipped": guard.skipped_steps,
            "params_finite": bool(torch.isfinite(params).all()),
            "param_gap": max_gap_across_ranks(params),
            "state": shared_state(guard),
            "events": events_of(guard.events),
            "sink_scalars": {k: v for k, v in sink.scalars.items()},
            "sink_events": events_of(sink.events),
            "warnings": guard_warnings(caught),
            "report": report,
        }
    return out


MICRO = 3


def accumulation_with_no_sync(rank: int, world_size: int) -> dict[str, Any]:
    """Three micro-batches per optimizer step, the first two under ``ddp.no_sync()``.

    Rank 1's first micro-batch of step NAN_STEP holds a NaN: it stays local (no all-reduce)
    until the last micro-batch's backward spreads it, and gradguard decides at the step.
    """
    model = make_mlp()
    ddp = DDP(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    sink = gg.MemorySink()
    guard = gg.attach(
        ddp, opt, on_nonfinite="skip", log_every_n_steps=1, sinks=[sink], activations=False
    )
    guard_step_after_micro: list[int] = []
    local_nan_mid_accumulation = False
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        for step in range(STEPS):
            opt.zero_grad(set_to_none=True)
            for micro in range(MICRO):
                x, y = batch(rank, step, micro)
                if rank == 1 and step == NAN_STEP and micro == 0:
                    x[0, 0] = float("nan")
                sync = ddp.no_sync() if micro < MICRO - 1 else nullcontext()
                with sync:
                    (F.cross_entropy(ddp(x), y) / MICRO).backward()
                guard_step_after_micro.append(guard.step)
                if step == NAN_STEP and micro == MICRO - 2:
                    local_nan_mid_accumulation = any(
                        not bool(torch.isfinite(p.grad).all()) for p in model.parameters()
                    )
            opt.step()
        guard.detach()
    params = flat_params(model)
    return {
        "guard_step_after_micro": guard_step_after_micro,
        "local_nan_mid_accumulation": local_nan_mid_accumulation,
        "step": guard.step,
        "skipped": guard.skipped_steps,
        "totals": sink.scalars.get("gradguard/grad_norm_total", []),
        "params": params,
        "param_gap": max_gap_across_ranks(params),
    }


# ---------------------------------------------------------------- references (one process)
def reference_accumulation(world_size: int) -> tuple[list[float], torch.Tensor]:
    """The same training in one process: DDP's gradient is the mean over ranks of each
    rank's accumulated gradient; a step whose gradient is not finite is skipped."""
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    totals = []
    for step in range(STEPS):
        opt.zero_grad(set_to_none=True)
        for rank in range(world_size):
            for micro in range(MICRO):
                x, y = batch(rank, step, micro)
                if rank == 1 and step == NAN_STEP and micro == 0:
                    x[0, 0] = float("nan")
                (F.cross_entropy(model(x), y) / MICRO).backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        for grad in grads:
            grad /= world_size
        total = float(torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in grads])))
        totals.append(total)
        if math.isfinite(total):
            opt.step()
    return totals, flat_params(model)


def ddp_scenarios(rank: int, world_size: int) -> dict[str, Any]:
    """Every scenario of this file in one launch: starting processes is the slow part."""
    return {
        "nan": nan_on_rank_one(rank, world_size),
        "accumulation": accumulation_with_no_sync(rank, world_size),
    }


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return run_workers(ddp_scenarios, tmp_path_factory.mktemp("ddp"))


# ---------------------------------------------------------------- tests
def test_nan_on_one_rank_is_skipped_on_both_and_only_rank_zero_reports(
    ranks: list[dict[str, Any]],
) -> None:
    rank0, rank1 = (r["nan"] for r in ranks)
    for variant in ("foreach", "fused"):
        r0, r1 = rank0[variant], rank1[variant]
        for r in (r0, r1):
            # DDP averaged the NaN into every rank's gradient: both skipped that step only.
            assert r["moved"] == [step != NAN_STEP for step in range(STEPS)], variant
            assert r["skipped"] == 1 and r["step"] == STEPS
            assert r["params_finite"]
            # The replicas did not drift apart.
            assert r["param_gap"] == 0.0
        # Clip history, spike EMA and counters are the same on both ranks.
        assert r0["state"] == r1["state"], variant
        # Every rank knows what happened (report() works everywhere)...
        for r in (r0, r1):
            nonfinite = [e for e in r["events"] if e["kind"] == "nonfinite"]
            assert [(e["step"], e["skipped"]) for e in nonfinite] == [(NAN_STEP, True)]
            assert "NaN" in r["report"] or "non-finite" in r["report"].lower()
        # ...but only rank 0 writes to sinks and warns.
        assert r0["sink_scalars"]["gradguard/skipped_steps"][-1] == [4, 1.0]
        assert [e["kind"] for e in r0["sink_events"]].count("nonfinite") == 1
        assert any("NaN" in w or "non-finite" in w.lower() for w in r0["warnings"])
        assert r1["sink_scalars"] == {} and r1["sink_events"] == []
        assert r1["warnings"] == []


def test_no_sync_accumulation_decides_at_the_optimizer_step(ranks: list[dict[str, Any]]) -> None:
    rank0, rank1 = (r["accumulation"] for r in ranks)
    for r in (rank0, rank1):
        # gradguard counts optimizer steps, not micro-batches...
        assert r["step"] == STEPS
        assert r["guard_step_after_micro"] == [s for s in range(STEPS) for _ in range(MICRO)]
        assert r["skipped"] == 1
        assert r["param_gap"] == 0.0
    # ...and did not touch rank 1's NaN gradient while it was still being accumulated.
    assert rank1["local_nan_mid_accumulation"] is True
    assert rank0["local_nan_mid_accumulation"] is False

    # The norms gradguard logged are those of the all-reduced, accumulated gradient.
    expected_totals, expected_params = reference_accumulation(world_size=2)
    logged = dict((int(step), value) for step, value in rank0["totals"])
    assert sorted(logged) == list(range(STEPS))
    for step, expected in enumerate(expected_totals):
        if step == NAN_STEP:
            assert logged[step] == "nan" or not math.isfinite(float(logged[step]))
        else:
            assert logged[step] == pytest.approx(expected, rel=1e-5)
    assert torch.allclose(torch.tensor(rank0["params"]), expected_params, rtol=1e-5, atol=1e-6)
