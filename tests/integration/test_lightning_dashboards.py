"""GradGuardCallback attaches the dashboard sinks to a TensorBoard or W&B logger by itself."""

from __future__ import annotations

from pathlib import Path

import pytest
from gradguard.integrations.lightning import GradGuardCallback
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import gradguard as gg
from tests.integration.lightning_kit import DigitsModule, digits_loader, trainer

# Third-party noise: Lightning 2.6 trips a torch pytree deprecation (FutureWarning) at fit.
pytestmark = pytest.mark.filterwarnings("ignore:.*isinstance.treespec, LeafSpec.*:FutureWarning")


def test_tensorboard_logger_gets_figures_and_event_text_without_wiring(tmp_path: Path) -> None:
    logger = TensorBoardLogger(save_dir=str(tmp_path), name="tb")
    callback = GradGuardCallback(on_nonfinite="skip")
    run = trainer(tmp_path, max_steps=4, log_every_n_steps=2, logger=logger, callbacks=[callback])
    with pytest.warns(gg.GradGuardWarning, match="NaN"):
        run.fit(DigitsModule(nan_at=1), digits_loader())

    accumulator = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0, "images": 0})
    accumulator.Reload()
    tags = accumulator.Tags()
    assert "gradguard/gradient_flow" in tags["images"]
    assert any(tag.startswith("gradguard/events/nonfinite") for tag in tags["tensors"])
    # One writer for the scalars (the dashboard sink replaces plain log_metrics): no doubles.
    points = [event.step for event in accumulator.Scalars("gradguard/grad_norm_total")]
    assert points == [0, 2]


def test_wandb_logger_gets_metrics_and_an_alert_without_wiring(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import wandb

    from tests import wandb_reader

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="gradguard-tests")
    callback = GradGuardCallback(on_nonfinite="skip")
    run = trainer(tmp_path, max_steps=4, log_every_n_steps=2, logger=logger, callbacks=[callback])
    try:
        with pytest.warns(gg.GradGuardWarning, match="NaN"):
            run.fit(DigitsModule(nan_at=1), digits_loader())
        experiment = logger.experiment
        run_file = Path(experiment.dir).parent / f"run-{experiment.id}.wandb"
    finally:
        logger.experiment.finish()
        # finish() can return before the service wrote the file out; teardown waits for it.
        wandb.teardown()

    rows = [row for row in wandb_reader.history(run_file) if "gradguard/grad_norm_total" in row]
    assert [row["gradguard/step"] for row in rows] == [0, 2]
    assert rows[-1]["gradguard/skipped_steps"] == 1.0
    (alert,) = wandb_reader.alerts(run_file)
    assert "NaN" in alert.title or "NaN" in alert.text
