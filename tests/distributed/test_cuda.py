"""FSDP2 on a GPU with NCCL: the sharded pipeline stays free of host syncs.

Skipped without CUDA (CI has none). One process (one GPU is enough): the gradients are
still DTensors and gradguard still runs its all-reduce, so this checks with
``torch.cuda.set_sync_debug_mode("error")`` that the sharded path — the all-reduce of
squared norms, AutoClip, and a sync-free skip through a fused optimizer — never waits for
the device on a step that does not log.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import gradguard as gg
from tests.distributed._common import regression_batch, regression_mlp
from tests.distributed._launch import run_workers

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.timeout(180),
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

STEPS = 6
NAN_STEP = 4


def fsdp_cuda_sync_free(rank: int, world_size: int) -> dict[str, Any]:
    from torch.distributed.fsdp import fully_shard

    torch.cuda.set_device(rank)
    model = regression_mlp().cuda()
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    guard = gg.attach(
        model,
        opt,
        clip=gg.AutoClip(percentile=50.0),
        on_nonfinite="skip",
        log_every_n_steps=1000,
        activations=False,
    )
    errors: list[str] = []
    moved: list[bool] = []
    for step in range(STEPS):
        x, y = (t.cuda() for t in regression_batch(rank, step))
        opt.zero_grad(set_to_none=True)
        F.mse_loss(model(x), y).backward()
        if step == NAN_STEP:
            model[2].weight.grad.to_local()[0, 0] = float("nan")
        before = [p.to_local().detach().clone() for p in model.parameters()]
        torch.cuda.synchronize()
        if step > 0:  # step 0 logs: its one bulk copy is allowed
            torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step()
        except RuntimeError as exc:
            errors.append(f"step {step}: {exc}")
        finally:
            torch.cuda.set_sync_debug_mode(0)
        after = [p.to_local().detach() for p in model.parameters()]
        moved.append(any(not torch.equal(a, b) for a, b in zip(before, after)))
    guard.detach()
    return {
        "errors": errors,
        "moved": moved,
        "skipped": guard.skipped_steps,
        "sharded": bool(guard._computer is not None and guard._computer.sharded),
    }


def test_fsdp2_on_cuda_measures_and_skips_without_host_syncs(tmp_path: Path) -> None:
    (run,) = run_workers(fsdp_cuda_sync_free, tmp_path, world_size=1, backend="nccl")
    assert run["errors"] == []
    assert run["sharded"]
    # The NaN step was skipped through the fused kernel's found_inf, the others stepped.
    assert run["moved"] == [step != NAN_STEP for step in range(STEPS)]
    assert run["skipped"] == 1
