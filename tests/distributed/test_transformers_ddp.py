"""A Hugging Face ``Trainer`` on two CPU processes (DDP, gloo) with GradGuardCallback.

The processes are started the way ``torchrun`` starts them; accelerate joins them into one
process group. A NaN on rank 1 only reaches both ranks through DDP's all-reduce: both must
skip that step and stay identical, and only rank 0 may warn, log and write checkpoints.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradguard as gg
from tests.distributed._common import batch, events_of, flat_params, guard_warnings, make_mlp
from tests.distributed._launch import run_workers

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.timeout(240),
    pytest.mark.skipif(
        importlib.util.find_spec("transformers") is None, reason="transformers is not installed"
    ),
]

MAX_STEPS = 4
NAN_STEP = 2


class Classifier(nn.Module):
    """The shared tiny MLP, returning the loss the way a transformers model does."""

    def __init__(self, nan_on_call: int | None) -> None:
        super().__init__()
        self.net = make_mlp()
        self.calls, self.nan_on_call = 0, nan_on_call

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.training:
            if self.calls == self.nan_on_call:
                x = x.clone()
                x[0, 0] = float("nan")
            self.calls += 1
        logits = self.net(x)
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


class Batches(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    def __init__(self, world_size: int) -> None:
        parts = [batch(r, step) for step in range(MAX_STEPS) for r in range(world_size)]
        self.x = torch.cat([x for x, _ in parts])
        self.y = torch.cat([y for _, y in parts])

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[index], "labels": self.y[index]}


def trainer_ddp(rank: int, world_size: int, root: str) -> dict[str, Any]:
    from gradguard.integrations.transformers import GradGuardCallback
    from transformers import Trainer, TrainingArguments

    from tests.distributed._common import max_gap_across_ranks

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = Classifier(nan_on_call=NAN_STEP if rank == 1 else None)
    sink = gg.MemorySink()
    callback = GradGuardCallback(clip=gg.ZClip(), on_nonfinite="skip", sinks=[sink])
    trainer = Trainer(
        model=model,
        args=TrainingArguments(
            output_dir=root,
            per_device_train_batch_size=8,
            max_steps=MAX_STEPS,
            logging_steps=2,
            save_strategy="steps",
            save_steps=2,
            report_to=[],
            use_cpu=True,
            ddp_backend="gloo",
            disable_tqdm=True,
            dataloader_num_workers=0,
        ),
        train_dataset=Batches(world_size),
        callbacks=[callback],
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    params = flat_params(model.net)
    return {
        "world_size": trainer.args.world_size,
        "guard_step": callback.guard.step,
        "skipped": callback.guard.skipped_steps,
        "param_gap": max_gap_across_ranks(params),
        "params_finite": bool(torch.isfinite(params).all()),
        "events": events_of(callback.guard.events),
        "sink_steps": [step for step, _ in sink.scalars.get("gradguard/grad_norm_total", [])],
        "warnings": guard_warnings(caught),
    }


def test_trainer_ddp_two_processes_skip_alike_and_rank_zero_speaks(tmp_path: Path) -> None:
    root = tmp_path / "out"
    rank0, rank1 = run_workers(
        trainer_ddp, tmp_path, init_process_group=False, timeout=200.0, root=str(root)
    )
    for r in (rank0, rank1):
        assert r["world_size"] == 2 and r["guard_step"] == MAX_STEPS
        assert r["skipped"] == 1  # rank 1's NaN reached both through the all-reduce
        assert r["param_gap"] == 0.0 and r["params_finite"]
        assert [(e["kind"], e["step"]) for e in r["events"]] == [("nonfinite", NAN_STEP + 1)]
    assert rank0["sink_steps"] == [1, 2, 4] and rank1["sink_steps"] == []
    assert any("NaN/Inf" in w for w in rank0["warnings"]) and rank1["warnings"] == []
    for step in (2, 4):
        saved = torch.load(root / f"checkpoint-{step}" / "gradguard.pt", weights_only=True)
        assert saved["guard"]["step"] == step
