"""WandbSink against real offline W&B runs, read back from the run's .wandb file."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import wandb
from gradguard.integrations.wandb import WandbSink, alert_text
from torch import nn

import gradguard as gg
from tests import wandb_reader
from tests.models import mlp, separable_data

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_CONSOLE", "off")


class Run:
    """A real offline run; ``file`` is its .wandb file once ``finish()`` returned."""

    def __init__(self, directory: Path) -> None:
        self.run: Any = wandb.init(mode="offline", dir=str(directory), project="gradguard-tests")
        self.file = Path(self.run.settings.sync_file)
        self.files_dir = Path(self.run.dir)

    def finish(self) -> None:
        self.run.finish()
        wandb.teardown()  # finish() can return before the service has written the file out


@pytest.fixture
def run(tmp_path: Path) -> Iterator[Run]:
    live = Run(tmp_path)
    yield live
    if not getattr(live.run, "_is_finished", True):
        live.finish()


def _train(
    guard_kwargs: dict[str, Any],
    steps: int,
    poison: range | tuple[int, ...] = (),
    user_log: Any = None,
) -> gg.GradGuard:
    """A small classifier; steps in ``poison`` get a NaN input; ``user_log(step, loss)``
    runs after ``optimizer.step()``, where users log their own metrics."""
    torch.manual_seed(0)
    model = mlp([16, 32, 32, 4])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = separable_data()
    with gg.attach(model, optimizer, **guard_kwargs) as guard:
        for step in range(steps):
            idx = torch.arange(step * 32, step * 32 + 32) % x.shape[0]
            inputs = x[idx].clone()
            if step in poison:
                inputs[0, 0] = float("nan")
            loss = nn.functional.cross_entropy(model(inputs), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if user_log is not None:
                user_log(step, loss.item())
    return guard


def _gradguard_rows(file: Path) -> list[dict[str, Any]]:
    return [row for row in wandb_reader.history(file) if "gradguard/step" in row]


def test_history_holds_every_logging_step_and_the_figure(run: Run) -> None:
    memory = gg.MemorySink()
    sink = WandbSink(figure_every_n_logs=2)  # wandb.run
    _train(
        dict(log_every_n_steps=5, clip=1.0, on_nonfinite="skip", warn=False, sinks=[sink, memory]),
        steps=26,
        poison=(10,),
    )
    run.finish()
    rows = _gradguard_rows(run.file)
    assert [row["gradguard/step"] for row in rows] == [0, 5, 10, 15, 20, 25]
    for row in rows:
        step = row["gradguard/step"]
        sent = {
            key: dict(points)[step]
            for key, points in memory.scalars.items()
            if step in dict(points)
        }
        assert {k for k in row if k.startswith("gradguard/") and "gradient_flow" not in k} == set(
            sent
        ) | {"gradguard/step"}
        for key, want in sent.items():
            if want != want:  # NaN at the poisoned step, written as NaN
                assert row[key] != row[key], key
            else:
                assert row[key] == pytest.approx(want, rel=1e-12), key
    assert rows[2]["gradguard/skipped_steps"] == 1.0
    figures = {row["gradguard/step"]: row for row in rows if "gradguard/gradient_flow/path" in row}
    assert sorted(figures) == [0, 10, 20, 25]  # every 2nd logging step, and the last at detach
    for row in figures.values():
        assert row["gradguard/gradient_flow/_type"] == "image-file"
        assert (run.files_dir / row["gradguard/gradient_flow/path"]).stat().st_size > 5000
    globs = {m.glob_name: m.step_metric for m in wandb_reader.metrics(run.file) if m.glob_name}
    assert globs == {"gradguard/*": "gradguard/step"}  # every gradguard chart vs the training step
    (alert,) = wandb_reader.alerts(run.file)
    assert alert.title == "nonfinite in 4 at step 10" and alert.level == "ERROR"
    assert "NaN/Inf" in alert.text and "What to try:" in alert.text and "Layers" in alert.text
    assert alert.wait_duration == 600_000  # alert_interval, in milliseconds


@pytest.mark.parametrize("with_step", [True, False], ids=["user-step", "auto-step"])
def test_users_own_rows_survive_next_to_gradguards(run: Run, with_step: bool) -> None:
    """gradguard never moves the run's step, so none of the user's rows is dropped."""

    def user_log(step: int, loss: float) -> None:
        if with_step:
            run.run.log({"loss": loss}, step=step)
        else:
            run.run.log({"loss": loss})

    _train(
        dict(log_every_n_steps=4, sinks=[WandbSink(figure_every_n_logs=0)]), 13, user_log=user_log
    )
    run.finish()
    history = wandb_reader.history(run.file)
    losses = [row for row in history if "loss" in row]
    assert len(losses) == 13
    # One row per training step either way: gradguard's values join the user's rows.
    assert [row["_step"] for row in losses] == list(range(13))
    assert len(history) == 13
    assert [row["gradguard/step"] for row in _gradguard_rows(run.file)] == [0, 4, 8, 12]


def test_lightning_wandb_logger_experiment_works(tmp_path: Path) -> None:
    from lightning.pytorch.loggers import WandbLogger

    logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="gradguard-tests")
    experiment = logger.experiment  # Lightning defines "*" against trainer/global_step
    sink = WandbSink(run=experiment, figure_every_n_logs=0)

    def lightning_log(step: int, loss: float) -> None:
        logger.log_metrics({"train_loss": loss}, step=step)

    _train(dict(log_every_n_steps=3, sinks=[sink]), 7, user_log=lightning_log)
    file = Path(experiment.settings.sync_file)
    experiment.finish()
    wandb.teardown()
    history = wandb_reader.history(file)
    assert [row["trainer/global_step"] for row in history if "train_loss" in row] == list(range(7))
    assert [row["gradguard/step"] for row in _gradguard_rows(file)] == [0, 3, 6]


def test_a_nan_storm_gives_one_alert_not_a_hundred(run: Run) -> None:
    sink = WandbSink(figure_every_n_logs=0)
    # repeat_every=1: the guard itself reports every NaN step, so only the sink throttles.
    guard = _train(
        dict(log_every_n_steps=10, on_nonfinite="skip", warn=False, repeat_every=1, sinks=[sink]),
        steps=110,
        poison=range(5, 105),
    )
    run.finish()
    assert guard.skipped_steps == 100
    assert sum(e.kind == "nonfinite" for e in guard.events) == 100
    alerts = wandb_reader.alerts(run.file)
    assert len(alerts) == 1
    assert alerts[0].title == "nonfinite in 4 at step 5"
    assert [a["title"] for a in sink.alerts] == [alerts[0].title]


def test_failing_alerts_turn_off_alerts_but_keep_the_metrics(
    run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Offline W&B cannot fail an alert on its own: replacing run.alert with one that raises
    # stands in for the alerts service being down (the only mock in this file).
    def broken_alert(**_: Any) -> None:
        raise ConnectionError("alerts service unreachable")

    monkeypatch.setattr(run.run, "alert", broken_alert)
    sink = WandbSink(figure_every_n_logs=0)
    with pytest.warns(gg.GradGuardWarning, match="could not send a W&B alert") as record:
        _train(
            dict(log_every_n_steps=10, on_nonfinite="skip", warn=False, sinks=[sink]),
            steps=40,
            poison=(5,),
        )
    run.finish()
    assert len(record) == 1
    steps = [row["gradguard/step"] for row in _gradguard_rows(run.file)]
    assert steps == [0, 10, 20, 30]


def test_alert_interval_holds_back_and_counts(run: Run) -> None:
    now = [0.0]
    sink = WandbSink(alert_on=("warning", "error"), alert_interval=600, clock=lambda: now[0])

    def event(kind: Any, step: int, severity: Any) -> gg.Event:
        return gg.Event(
            kind, step, ("encoder.2",), float("nan"), severity, f"{kind} seen.", "do X."
        )

    for t, kind, step, severity in [
        (0, "nonfinite", 3, "error"),
        (10, "nonfinite", 4, "error"),  # held back
        (20, "nonfinite", 5, "error"),  # held back
        (30, "spike", 6, "warning"),  # another kind: goes out
        (700, "nonfinite", 90, "error"),  # interval over: goes out, with the count
    ]:
        now[0] = t
        sink.log_event(event(kind, step, severity))
    sink.close()
    run.finish()
    alerts = wandb_reader.alerts(run.file)
    assert [(a.title, a.level) for a in alerts] == [
        ("nonfinite in encoder.2 at step 3", "ERROR"),
        ("spike in encoder.2 at step 6", "WARN"),
        ("nonfinite in encoder.2 at step 90", "ERROR"),
    ]
    assert "2 more 'nonfinite' event(s) in the 12 min since the last alert" in alerts[2].text
    assert "held back" not in alerts[0].text and "more" not in alerts[0].text


def test_warnings_are_not_alerted_by_default(run: Run) -> None:
    sink = WandbSink()
    sink.log_event(
        gg.Event("spike", 7, ("fc",), 9.0, "warning", "Gradient norm spiked.", "lower lr.")
    )
    run.finish()
    assert wandb_reader.alerts(run.file) == []


def test_a_finished_run_disables_the_sink_with_one_warning(run: Run) -> None:
    sink = WandbSink(run=run.run, figure_every_n_logs=0)
    run.finish()  # W&B now raises on every call to this run
    memory = gg.MemorySink()
    with pytest.warns(gg.GradGuardWarning) as caught:
        guard = _train(
            dict(log_every_n_steps=2, on_nonfinite="skip", warn=False, sinks=[sink, memory]),
            steps=12,
            poison=(3, 4),
        )
    assert guard.step == 12
    assert len(caught) == 1
    assert "WandbSink" in str(caught[0].message) and "finished" in str(caught[0].message)
    assert guard.sinks.disabled == [sink]
    assert len(memory.scalars["gradguard/grad_norm_total"]) == 6


def test_no_active_run_says_to_call_wandb_init() -> None:
    assert wandb.run is None
    sink = WandbSink()
    with pytest.warns(gg.GradGuardWarning, match=r"wandb\.init"):
        guard = _train(dict(log_every_n_steps=2, sinks=[sink]), steps=3)
    assert guard.step == 3 and guard.sinks.disabled == [sink]


def test_missing_wandb_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    # Simulates an install without the extra: a None entry makes `import wandb` fail.
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(gg.MissingDependencyError, match=r"gradguard\[wandb\]"):
        WandbSink()


def test_alert_text_reads_like_a_colleague_wrote_it() -> None:
    event = gg.Event(
        "nonfinite",
        1200,
        ("decoder.out", "decoder.mid"),
        float("nan"),
        "error",
        "Gradient is NaN/Inf in 2 of 6 layers, first (closest to the loss) 'decoder.out'.",
        "look at the forward pass of 'decoder.out' for an overflow; lower the learning rate.",
    )
    text = alert_text(event, held_back=4, since_s=900)
    assert text.splitlines() == [
        "Step 1200: Gradient is NaN/Inf in 2 of 6 layers, first (closest to the loss) "
        "'decoder.out'.",
        "Layers (worst first): decoder.out, decoder.mid.",
        "Value: NaN.",
        "What to try: look at the forward pass of 'decoder.out' for an overflow; "
        "lower the learning rate.",
        "(4 more 'nonfinite' event(s) in the 15 min since the last alert were not alerted "
        "separately.)",
    ]


def test_example_wandb_alerts_runs_offline_and_alerts_once(tmp_path: Path) -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "wandb_alerts.py"), "--dir", str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "W&B alerts sent: 1" in out and "wandb sync" in out
    (file,) = tmp_path.rglob("run-*.wandb")
    (alert,) = wandb_reader.alerts(file)
    assert alert.level == "ERROR" and "NaN" in alert.text
    assert alert.title in out


def test_heatmap_and_device_histograms_in_the_history(run: Run) -> None:
    sink = WandbSink(figure_every_n_logs=2)
    histograms = gg.Histograms(include=["0", "4"], bins=32)
    _train(
        dict(
            log_every_n_steps=5,
            on_nonfinite="skip",
            warn=False,
            sinks=[sink],
            histograms=histograms,
        ),
        steps=16,
        poison=(5,),
    )
    run.finish()
    rows = {row["gradguard/step"]: row for row in _gradguard_rows(run.file)}
    heatmaps = sorted(s for s, row in rows.items() if "gradguard/gradient_flow_heatmap/path" in row)
    assert heatmaps == [0, 10, 15]  # with the bar chart: every 2nd logging step, and the last
    for step in heatmaps:
        row = rows[step]
        assert row["gradguard/gradient_flow_heatmap/_type"] == "image-file"
        assert (run.files_dir / row["gradguard/gradient_flow_heatmap/path"]).stat().st_size > 5000
    # Histograms on every logging step but step 5, whose NaN gradients were skipped.
    with_histograms = sorted(
        s for s, row in rows.items() if "gradguard/grad_histogram/0/_type" in row
    )
    assert with_histograms == [0, 10, 15]
    row = rows[0]
    assert row["gradguard/grad_histogram/0/_type"] == "histogram"
    counts, edges = row["gradguard/grad_histogram/0/values"], row["gradguard/grad_histogram/0/bins"]
    assert len(edges) == len(counts) + 1 and sum(counts) == 16 * 32 + 32
    assert -12.0 <= edges[0] < edges[-1] <= 4.0  # log10 units, cut to the occupied bins
    assert not any(key.startswith("gradguard/grad_histogram/2") for key in row)


def test_without_matplotlib_it_says_so_once_and_logs_the_rest(
    run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Simulates an install without matplotlib (it IS installed here): a None entry in
    # sys.modules makes `import matplotlib` fail.
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.warns(gg.GradGuardWarning) as caught:
        sink = WandbSink()
    (warning,) = caught
    assert "pip install 'gradguard[wandb]'" in str(warning.message)
    guard = _train(dict(log_every_n_steps=5, sinks=[sink], histograms=True, warn=False), steps=11)
    assert not guard.sinks.disabled
    run.finish()
    rows = _gradguard_rows(run.file)
    assert [row["gradguard/step"] for row in rows] == [0, 5, 10]
    assert all("gradguard/grad_histogram/0/_type" in row for row in rows)
    assert not any("gradient_flow" in key for row in rows for key in row)
