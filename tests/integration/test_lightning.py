"""GradGuardCallback in a real Lightning Trainer on CPU: loggers, accumulation, skip, clipping.

Resume, manual optimisation, several optimizers, precision and construction are in
test_lightning_modes.py.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from gradguard.integrations.lightning import GradGuardCallback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import gradguard as gg
from tests.integration.lightning_kit import (
    DigitsModule,
    GradProbe,
    StepSnapshot,
    digits_loader,
    params_of,
    trainer,
)

# Third-party noise: Lightning 2.6 trips a torch pytree deprecation (FutureWarning) at fit.
pytestmark = pytest.mark.filterwarnings("ignore:.*isinstance.treespec, LeafSpec.*:FutureWarning")

LAYERS = ("net.0", "net.2")


def _tensorboard_scalars(log_dir: str) -> dict[str, list[tuple[int, float]]]:
    accumulator = EventAccumulator(log_dir, size_guidance={"scalars": 0})
    accumulator.Reload()
    return {
        tag: [(event.step, event.value) for event in accumulator.Scalars(tag)]
        for tag in accumulator.Tags()["scalars"]
    }


def test_tensorboard_logger_gets_design_keys_at_global_steps(tmp_path: Path) -> None:
    logger = TensorBoardLogger(save_dir=str(tmp_path), name="tb")
    probe = GradProbe()
    callback = GradGuardCallback(clip=5.0)  # log_every_n_steps follows the Trainer's (2)
    run = trainer(
        tmp_path, max_steps=6, log_every_n_steps=2, logger=logger, callbacks=[probe, callback]
    )
    run.fit(DigitsModule(), digits_loader())

    scalars = _tensorboard_scalars(logger.log_dir)
    expected = {
        "gradguard/grad_norm_total",
        "gradguard/clip/threshold",
        "gradguard/clip/coef",
        "gradguard/skipped_steps",
    }
    for layer in LAYERS:
        expected |= {
            f"gradguard/{kind}/{layer}" for kind in ("grad_norm", "param_norm", "update_ratio")
        }
    assert expected <= set(scalars), sorted(expected - set(scalars))
    for key in expected:
        assert [step for step, _ in scalars[key]] == [0, 2, 4], key
    # The values are the gradients Lightning handed to the optimizer hook, before the clip.
    for step, value in scalars["gradguard/grad_norm_total"]:
        assert value == pytest.approx(probe.norms[step], rel=1e-4)
    assert all(value == pytest.approx(5.0) for _, value in scalars["gradguard/clip/threshold"])
    assert [value for _, value in scalars["gradguard/skipped_steps"]] == [0.0, 0.0, 0.0]
    # Activation sampling works through Lightning's training_step too: the window of steps
    # 0-3 is read on the next logging step, for the Linear that feeds the ReLU.
    assert [step for step, _ in scalars["gradguard/dead_fraction/net.0"]] == [4]
    assert callback.guard.step == 6
    assert not callback.guard.attached  # detached at the end of fit


def test_accumulation_logs_one_point_per_optimizer_step(tmp_path: Path) -> None:
    logger = TensorBoardLogger(save_dir=str(tmp_path), name="tb")
    probe = GradProbe()
    callback = GradGuardCallback(log_every_n_steps=1)
    run = trainer(
        tmp_path, max_steps=3, accumulate_grad_batches=2, logger=logger, callbacks=[probe, callback]
    )
    run.fit(DigitsModule(), digits_loader())

    assert run.global_step == 3 and probe.calls == 3  # 6 micro-batches, 3 optimizer steps
    assert callback.guard.step == 3
    scalars = _tensorboard_scalars(logger.log_dir)
    points = scalars["gradguard/grad_norm_total"]
    assert [step for step, _ in points] == [0, 1, 2]
    # Each point is the norm of the gradient accumulated over both micro-batches.
    for step, value in points:
        assert value == pytest.approx(probe.norms[step], rel=1e-4)


def test_csv_logger_metrics_file_has_the_keys(tmp_path: Path) -> None:
    logger = CSVLogger(save_dir=str(tmp_path), name="csv")
    run = trainer(
        tmp_path, max_steps=4, log_every_n_steps=2, logger=logger, callbacks=[GradGuardCallback()]
    )
    run.fit(DigitsModule(), digits_loader())

    with open(Path(logger.log_dir) / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    columns = set(rows[0])
    for key in (
        "gradguard/grad_norm_total",
        "gradguard/grad_norm/net.0",
        "gradguard/param_norm/net.2",
        "gradguard/skipped_steps",
    ):
        assert key in columns, key
    logged = [row for row in rows if row["gradguard/grad_norm_total"]]
    assert [int(row["step"]) for row in logged] == [0, 2]
    assert all(math.isfinite(float(row["gradguard/grad_norm_total"])) for row in logged)


@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
def test_nan_step_is_skipped_and_training_finishes(tmp_path: Path, fused: bool) -> None:
    logger = CSVLogger(save_dir=str(tmp_path), name="csv")
    snapshot = StepSnapshot(at=3)
    memory = gg.MemorySink()
    callback = GradGuardCallback(on_nonfinite="skip", log_every_n_steps=1, sinks=[memory])
    module = DigitsModule(nan_at=3, fused=fused)
    run = trainer(tmp_path, max_steps=6, logger=logger, callbacks=[snapshot, callback])
    with pytest.warns(gg.GradGuardWarning, match="NaN"):
        run.fit(module, digits_loader())

    assert run.global_step == 6  # training went on after the bad batch
    assert snapshot.unchanged()  # weights, Adam moments and step counters
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert callback.guard.skipped_steps == 1
    assert [(e.kind, e.step) for e in callback.events] == [("nonfinite", 3)]
    # The skip reaches the Trainer's logger, keyed by the global step.
    with open(Path(logger.log_dir) / "metrics.csv", newline="") as handle:
        skipped = {
            int(row["step"]): float(row["gradguard/skipped_steps"])
            for row in csv.DictReader(handle)
            if row["gradguard/skipped_steps"]
        }
    assert skipped == {0: 0.0, 1: 0.0, 2: 0.0, 3: 1.0, 4: 1.0, 5: 1.0}
    assert memory.scalars["gradguard/skipped_steps"][3] == (3, 1.0)


class _FirstStepSpy(pl.Callback):
    def __init__(self) -> None:
        self.batches = 0

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.batches += 1


def test_gradient_clip_val_with_gradguard_clip_is_refused_before_the_first_step(
    tmp_path: Path,
) -> None:
    spy = _FirstStepSpy()
    module = DigitsModule()
    initial = params_of(module)
    run = trainer(
        tmp_path, gradient_clip_val=0.5, callbacks=[spy, GradGuardCallback(clip=gg.NormClip(1.0))]
    )
    with pytest.raises(
        gg.ConfigurationError, match=r"gradient_clip_val=0\.5.*clip the gradients twice"
    ):
        run.fit(module, digits_loader())
    assert spy.batches == 0
    assert all(torch.equal(initial[name], p) for name, p in module.named_parameters())


def test_observing_only_leaves_lightning_clipping_working(tmp_path: Path) -> None:
    memory = gg.MemorySink()
    module = DigitsModule(optimizer="sgd", lr=1.0)
    initial = params_of(module)
    run = trainer(
        tmp_path, max_steps=1, gradient_clip_val=1e-3, callbacks=[GradGuardCallback(sinks=[memory])]
    )
    run.fit(module, digits_loader())

    ((step, grad_norm),) = memory.scalars["gradguard/grad_norm_total"]
    assert step == 0 and grad_norm > 0.1  # gradguard logs the norm before Lightning's clip
    deltas = [p.detach() - initial[name] for name, p in module.named_parameters()]
    update = float(
        torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(d) for d in deltas]))
    )
    assert update == pytest.approx(1e-3, rel=1e-3)  # SGD lr=1: the update is the clipped gradient


@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
def test_spike_skip_leaves_the_step_untaken(tmp_path: Path, fused: bool) -> None:
    snapshot = StepSnapshot(at=5)
    callback = GradGuardCallback(on_spike="skip", spike=gg.SpikeDetector(warmup_steps=3))
    run = trainer(tmp_path, max_steps=7, callbacks=[snapshot, callback])
    with pytest.warns(gg.GradGuardWarning) as record:
        run.fit(DigitsModule(spike_at=5, fused=fused), digits_loader())
    assert snapshot.unchanged()
    assert callback.guard.skipped_steps == 1
    # The callback hands over the loss, so the spiked batch is a loss spike too.
    assert [(e.kind, e.step) for e in callback.events] == [("spike", 5), ("loss_spike", 5)]
    ours = [str(w.message) for w in record if issubclass(w.category, gg.GradGuardWarning)]
    assert "spiked" in ours[0] and "skipped this step" in ours[1] and len(ours) == 2
