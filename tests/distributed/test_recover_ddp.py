"""The recovery ladder under DDP, two gloo processes: every rank takes the same action at
the same step, including when only one rank's batch is bad or only one rank's loss spikes."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import gradguard as gg
from tests.distributed._common import batch, flat_params, make_mlp, max_gap_across_ranks
from tests.distributed._launch import run_workers

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(120)]

STEPS = 26
# Rank 1 only: DDP's all-reduce spreads the NaN to both ranks' gradients.
NAN_STEPS = (8, 9, 10, 12, 13, 14)
LOUD_STEPS = (18, 19)  # rank 1 only: its own loss x50 (the loss is per rank)


def recover_on_two_ranks(rank: int, world_size: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for fused in (False, True):
        model = make_mlp()
        ddp = DDP(model)
        opt = torch.optim.Adam(ddp.parameters(), lr=1e-2, fused=fused)
        recover = gg.Recover(
            skip_budget=3, window=10, lr_factor=0.5, lr_recovery_steps=4, snapshot_every=4
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            guard = gg.attach(
                ddp,
                opt,
                on_instability=recover,
                on_spike="ignore",
                activations=False,
                log_every_n_steps=1,
            )
            lrs: list[float] = []
            opt.register_step_pre_hook(
                lambda o, a, k, seen=lrs: seen.append(o.param_groups[0]["lr"])
            )
            for step in range(STEPS):
                x, y = batch(rank, step)
                if rank == 1 and step in NAN_STEPS:
                    x[0, 0] = float("nan")
                opt.zero_grad(set_to_none=True)
                loss = F.cross_entropy(ddp(x), y)
                if rank == 1 and step in LOUD_STEPS:
                    loss = loss * 50.0
                guard.observe_loss(loss)
                loss.backward()
                opt.step()
            guard.detach()
        params = flat_params(model)
        out["fused" if fused else "foreach"] = {
            "recovery": [
                [e.step, e.details["action"], e.details["snapshot_step"]]
                for e in guard.events
                if e.kind == "recovery"
            ],
            "loss_spikes": [e.step for e in guard.events if e.kind == "loss_spike"],
            "lrs": lrs,
            "skipped": guard.skipped_steps,
            "recovery_state": guard.state_dict()["recovery"]["rollbacks"],
            "param_gap": max_gap_across_ranks(params),
            "finite": bool(torch.isfinite(params).all()),
        }
    return out


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return run_workers(recover_on_two_ranks, tmp_path_factory.mktemp("recover"))


@pytest.mark.parametrize("path", ["foreach", "fused"])
def test_every_rank_takes_the_same_action_at_the_same_step(
    ranks: list[dict[str, Any]], path: str
) -> None:
    zero, one = ranks[0][path], ranks[1][path]
    # NaN at 8-10 (rank 1's batch, every rank's gradient): LR back-off at 11; NaN again at
    # 12-14: rollback at 15 to step 4's snapshot (step 8's was discarded: 8 was bad).
    assert zero["recovery"][:2] == [[11, "lr_backoff", 4], [15, "rollback", 4]]
    assert zero["recovery"] == one["recovery"]
    assert zero["lrs"] == one["lrs"]
    assert zero["skipped"] == one["skipped"] == 7  # six NaN steps and the rollback step
    assert zero["param_gap"] == one["param_gap"] == 0.0
    assert zero["finite"] and one["finite"]


def test_a_loss_spike_on_one_rank_is_reported_there_and_triggers_nothing(
    ranks: list[dict[str, Any]],
) -> None:
    # The loss is per rank: rank 1 sees its spikes, rank 0 does not. Acting on them would
    # make the ranks diverge, so under a process group loss findings do not trigger.
    for path in ("foreach", "fused"):
        assert ranks[1][path]["loss_spikes"] and not ranks[0][path]["loss_spikes"]
        assert [a for _, a, _ in ranks[0][path]["recovery"]] == [
            "lr_backoff",
            "rollback",
            "recovered",
        ]
        assert ranks[0][path]["recovery_state"] == ranks[1][path]["recovery_state"] == 1
