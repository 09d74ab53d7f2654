"""Lightning ``Trainer(strategy="ddp", accelerator="cpu", devices=2)`` with GradGuardCallback.

The two processes are started the way ``torchrun`` starts them (RANK, LOCAL_RANK,
WORLD_SIZE, MASTER_ADDR/PORT set): Lightning then joins them into one DDP group instead of
re-launching the test script, which it cannot do from inside pytest.
"""

from __future__ import annotations

import csv
import importlib.util
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import gradguard as gg
from tests.distributed._common import batch, events_of, flat_params, guard_warnings, make_mlp
from tests.distributed._launch import run_workers


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ImportError:  # a parent package is missing
        return False


pytestmark = [
    pytest.mark.distributed,
    pytest.mark.timeout(180),
    pytest.mark.skipif(not _importable("lightning"), reason="lightning is not installed"),
    pytest.mark.skipif(
        not _importable("gradguard.integrations.lightning"),
        reason="gradguard.integrations.lightning is not written yet",
    ),
]

MAX_STEPS = 6
NAN_STEP = 3
LOG_EVERY = 2


def lightning_ddp(rank: int, world_size: int, root: str) -> dict[str, Any]:
    import lightning.pytorch as pl
    from gradguard.integrations.lightning import GradGuardCallback
    from lightning.pytorch.loggers import CSVLogger

    class Classifier(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = make_mlp()
            self.param_gap = float("nan")

        def training_step(self, data: Any, batch_idx: int) -> torch.Tensor:
            x, y = data
            if self.global_step == NAN_STEP and self.global_rank == 1:
                x = x.clone()
                x[0, 0] = float("nan")  # rank 1's batch only
            return F.cross_entropy(self.net(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adam(self.parameters(), lr=1e-2)

        def on_train_end(self) -> None:
            params = flat_params(self.net)
            gathered = self.all_gather(params)
            self.param_gap = float((gathered - params).abs().max())
            self.params_finite = bool(torch.isfinite(params).all())

    parts = [batch(r, step) for step in range(MAX_STEPS) for r in range(world_size)]
    dataset = TensorDataset(torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts]))
    sink = gg.MemorySink()
    callback = GradGuardCallback(
        clip=gg.AutoClip(percentile=50.0), on_nonfinite="skip", sinks=[sink]
    )
    trainer = pl.Trainer(
        strategy="ddp",
        accelerator="cpu",
        devices=world_size,
        max_steps=MAX_STEPS,
        log_every_n_steps=LOG_EVERY,
        logger=CSVLogger(root, name="run", version=0),
        callbacks=[callback],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    module = Classifier()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, DataLoader(dataset, batch_size=8))
    guard = callback.guard
    return {
        "world_size": trainer.world_size,
        "global_step": trainer.global_step,
        "guard_step": guard.step,
        "skipped": guard.skipped_steps,
        "param_gap": module.param_gap,
        "params_finite": module.params_finite,
        "events": events_of(guard.events),
        "sink_steps": [step for step, _ in sink.scalars.get("gradguard/grad_norm_total", [])],
        "sink_events": events_of(sink.events),
        "warnings": guard_warnings(caught),
        "report": callback.report(),
    }


def test_lightning_ddp_two_processes_decide_alike_and_log_once(tmp_path: Path) -> None:
    root = tmp_path / "logs"
    rank0, rank1 = run_workers(
        lightning_ddp, tmp_path, init_process_group=False, timeout=150.0, root=str(root)
    )
    for r in (rank0, rank1):
        assert r["world_size"] == 2
        assert r["guard_step"] == MAX_STEPS
        # DDP spread rank 1's NaN to both: both skipped that step, and stayed identical.
        assert r["skipped"] == 1
        assert r["param_gap"] == 0.0 and r["params_finite"]
        assert [(e["kind"], e["step"]) for e in r["events"] if e["kind"] == "nonfinite"] == [
            ("nonfinite", NAN_STEP)
        ]
        assert r["report"]
    # Rank 0 wrote each logging step once; rank 1 wrote nothing and did not warn.
    assert rank0["sink_steps"] == list(range(0, MAX_STEPS, LOG_EVERY))
    assert [e["kind"] for e in rank0["sink_events"]].count("nonfinite") == 1
    assert rank0["warnings"]
    assert rank1["sink_steps"] == [] and rank1["sink_events"] == [] and rank1["warnings"] == []
    # The Trainer's own logger got gradguard's metrics once per logging step.
    with open(root / "run" / "version_0" / "metrics.csv", newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("gradguard/grad_norm_total")]
    assert [int(row["step"]) for row in rows] == list(range(0, MAX_STEPS, LOG_EVERY))
