"""MlflowSink against a real local MLflow tracking store (SQLite), read back with MlflowClient."""

from __future__ import annotations

import io
import json
import math
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pytest
import torch
from gradguard.integrations.mlflow import EVENTS_ARTIFACT, MlflowSink, event_record, metric_key
from mlflow import MlflowClient
from PIL import Image
from torch import nn

import gradguard as gg
from tests.models import mlp, separable_data, step_metrics

LAYERS = ["0", "2", "4"]
RED = np.array([0xC0, 0x39, 0x2B])
# MLflow's SQL stores keep +-Inf as the largest float (SQL has no Inf).
FLOAT_MAX = sys.float_info.max


@dataclass
class Store:
    uri: str
    client: Any
    experiment_id: str
    downloads: Path


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    """One SQLite tracking store for the module (creating its tables takes a second or two),
    with its artifacts under the same temporary folder; each test makes its own runs."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        # The fluent API (mlflow.start_run, active_run) reads the store from here.
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        client = MlflowClient(uri)
        experiment_id = client.create_experiment(
            "gradguard-tests", artifact_location=str(root / "artifacts")
        )
        yield Store(uri, client, experiment_id, root / "downloads")
    assert mlflow.active_run() is None  # every test ended the runs it started


def _train(guard_kwargs: dict[str, Any], steps: int, poison: tuple[int, ...] = ()) -> gg.GradGuard:
    """A small classifier; the input of each step in ``poison`` carries a NaN (a bad record)."""
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
    return guard


def _history(store: Store, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in store.client.get_metric_history(run_id, key)]


def _download(store: Store, run_id: str, path: str) -> Path:
    target = store.downloads / run_id
    target.mkdir(parents=True, exist_ok=True)
    return Path(store.client.download_artifacts(run_id, path, str(target)))


def _images(store: Store, run_id: str, key: str = "gradguard/gradient_flow") -> dict[int, str]:
    """Time-stepped images of ``key``: step -> artifact path of the full-size PNG."""
    head = "images/" + key.replace("/", "~") + "+step+"
    found = {}
    for info in store.client.list_artifacts(run_id, "images"):
        match = re.fullmatch(re.escape(head) + r"(\d+)\+timestamp\+\d+\+[-0-9a-f]+\.png", info.path)
        if match:
            found[int(match.group(1))] = info.path
    return found


def _red_pixels(png: bytes) -> int:
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    return int((np.abs(pixels - RED).sum(axis=2) < 30).sum())


@dataclass
class NanRun:
    run_id: str
    memory: gg.MemorySink
    guard: gg.GradGuard
    active_after_close: str | None
    status_after_close: str


@pytest.fixture(scope="module")
def nan_run(store: Store) -> NanRun:
    """26 steps logged every 5 (0, 5, ..., 25) into the active run; step 10 has a NaN
    gradient, skipped. The user logs a metric of their own after gradguard closed."""
    memory = gg.MemorySink()
    with mlflow.start_run(experiment_id=store.experiment_id) as run:
        sink = MlflowSink(figure_every_n_logs=2)
        guard = _train(
            dict(
                log_every_n_steps=5,
                clip=1.0,
                on_nonfinite="skip",
                warn=False,
                sinks=[sink, memory],
            ),
            steps=26,
            poison=(10,),
        )
        active = mlflow.active_run()
        status = store.client.get_run(run.info.run_id).info.status
        sink.log_report(guard.report())  # after guard.close(): the run is still there
        mlflow.log_metric("loss", 0.5, step=26)
    assert not guard.sinks.disabled
    return NanRun(run.info.run_id, memory, guard, active and active.info.run_id, status)


def test_every_metric_has_its_history_at_the_logging_steps(store: Store, nan_run: NanRun) -> None:
    metrics = store.client.get_run(nan_run.run_id).data.metrics
    assert set(metrics) == set(nan_run.memory.scalars) | {"loss"}  # gradguard's keys, as they are
    for layer in LAYERS:
        assert f"gradguard/grad_norm/{layer}" in metrics
    for key, sent in nan_run.memory.scalars.items():
        stored = _history(store, nan_run.run_id, key)
        assert [s for s, _ in stored] == [s for s, _ in sent], key
        for (_, got), (_, want) in zip(stored, sent):
            assert (math.isnan(got) and math.isnan(want)) or got == pytest.approx(want, rel=1e-12)
    total = dict(_history(store, nan_run.run_id, "gradguard/grad_norm_total"))
    assert sorted(total) == [0, 5, 10, 15, 20, 25]
    assert math.isnan(total[10])  # NaN stays visible: stored and read back as NaN
    assert all(math.isfinite(v) for s, v in total.items() if s != 10)
    assert _history(store, nan_run.run_id, "gradguard/skipped_steps")[-1] == (25, 1.0)


def test_the_nan_event_is_a_tag_and_a_line_of_the_events_file(
    store: Store, nan_run: NanRun
) -> None:
    tags = store.client.get_run(nan_run.run_id).data.tags
    (event,) = [e for e in nan_run.guard.events if e.kind == "nonfinite"]
    assert tags["gradguard.status"] == "error"
    found = store.client.search_runs(
        [store.experiment_id], filter_string="tags.\"gradguard.status\" = 'error'"
    )
    assert nan_run.run_id in {run.info.run_id for run in found}  # as the README says
    assert tags["gradguard.last_event.nonfinite"].startswith("step 10 (error): Gradient is NaN")
    assert event.advice in tags["gradguard.last_event.nonfinite"]
    lines = _download(store, nan_run.run_id, EVENTS_ARTIFACT).read_text().splitlines()

    def strict(constant: str) -> Any:
        raise AssertionError(f"not strict JSON: {constant}")

    records = [json.loads(line, parse_constant=strict) for line in lines]
    assert lines == [event_record(e) for e in nan_run.guard.events]
    (nan_record,) = [r for r in records if r["kind"] == "nonfinite"]
    assert nan_record["step"] == 10 and nan_record["severity"] == "error"
    assert nan_record["layers"][0] == "4" and nan_record["value"] == "NaN"
    assert nan_record["message"] == event.message and nan_record["advice"] == event.advice


def test_gradient_flow_images_at_a_modest_rate(store: Store, nan_run: NanRun) -> None:
    images = _images(store, nan_run.run_id)
    # First logging step, every 2nd logging step after it, and the last one at flush.
    assert sorted(images) == [0, 10, 20, 25]
    png = {step: _download(store, nan_run.run_id, p).read_bytes() for step, p in images.items()}
    assert all(data[:8] == b"\x89PNG\r\n\x1a\n" for data in png.values())
    assert _red_pixels(png[10]) > 1000  # the NaN step's bars are red
    assert _red_pixels(png[0]) == 0
    assert store.client.get_run(nan_run.run_id).data.tags["mlflow.loggedImages"] == "True"


def test_heatmap_images_next_to_the_bar_chart(store: Store, nan_run: NanRun) -> None:
    heatmaps = _images(store, nan_run.run_id, "gradguard/gradient_flow_heatmap")
    assert sorted(heatmaps) == [0, 10, 20, 25]
    png = {s: _download(store, nan_run.run_id, p).read_bytes() for s, p in heatmaps.items()}
    assert _red_pixels(png[0]) == 0
    for step in (10, 20, 25):  # the NaN step stays a red column of the run's picture
        assert _red_pixels(png[step]) > 50, step


def test_the_users_run_stays_open_and_gets_the_report(store: Store, nan_run: NanRun) -> None:
    assert nan_run.active_after_close == nan_run.run_id  # guard.close() left it active
    assert nan_run.status_after_close == "RUNNING"
    run = store.client.get_run(nan_run.run_id)
    assert run.info.status == "FINISHED"  # ended by the user's `with mlflow.start_run()`
    assert _history(store, nan_run.run_id, "loss") == [(26, 0.5)]
    report = _download(store, nan_run.run_id, "gradguard/report.txt").read_text()
    assert report == nan_run.guard.report() and "NaN" in report


@pytest.mark.parametrize("how", ["client", "tracking_uri"])
def test_a_run_given_by_id_is_written_and_left_as_it_was(store: Store, how: str) -> None:
    run_id = store.client.create_run(store.experiment_id).info.run_id
    if how == "client":
        sink = MlflowSink(run_id, client=store.client, figure_every_n_logs=0)
    else:
        sink = MlflowSink(run_id, tracking_uri=store.uri, figure_every_n_logs=0)
    memory = gg.MemorySink()
    _train(dict(log_every_n_steps=4, warn=False, sinks=[sink, memory]), steps=9)
    assert mlflow.active_run() is None  # nothing was started
    run = store.client.get_run(run_id)
    assert run.info.status == "RUNNING"  # nor ended
    assert run.data.tags["gradguard.status"] == "ok"
    assert set(run.data.metrics) == set(memory.scalars)
    assert [s for s, _ in _history(store, run_id, "gradguard/grad_norm_total")] == [0, 4, 8]
    store.client.set_terminated(run_id)


def test_lightning_mlflow_logger_run_and_client(store: Store, tmp_path: Path) -> None:
    from lightning.pytorch.loggers import MLFlowLogger

    logger = MLFlowLogger(
        experiment_name="lightning",
        tracking_uri=store.uri,
        artifact_location=str(tmp_path / "artifacts"),
    )
    # The logger's run is not MLflow's active run: the sink is told which run, and how.
    sink = MlflowSink(run_id=logger.run_id, client=logger.experiment, figure_every_n_logs=0)
    torch.manual_seed(0)
    model = mlp([16, 8, 4])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = separable_data()
    with gg.attach(model, optimizer, log_every_n_steps=3, warn=False, sinks=[sink]):
        for step in range(7):
            loss = nn.functional.cross_entropy(model(x[:32]), y[:32])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            logger.log_metrics({"train_loss": loss.item()}, step=step)
    assert store.client.get_run(logger.run_id).info.status == "RUNNING"  # Lightning's to end
    logger.finalize("success")
    assert [s for s, _ in _history(store, logger.run_id, "train_loss")] == list(range(7))
    assert [s for s, _ in _history(store, logger.run_id, "gradguard/grad_norm_total")] == [0, 3, 6]
    assert mlflow.active_run() is None


@pytest.mark.filterwarnings("ignore:.*isinstance.treespec, LeafSpec.*:FutureWarning")
def test_lightning_callback_sends_to_the_mlflow_logger_without_wiring(
    store: Store, tmp_path: Path
) -> None:
    from gradguard.integrations.lightning import GradGuardCallback
    from lightning.pytorch.loggers import MLFlowLogger

    from tests.integration.lightning_kit import DigitsModule, digits_loader, trainer

    logger = MLFlowLogger(
        experiment_name="lightning-auto",
        tracking_uri=store.uri,
        artifact_location=str(tmp_path / "artifacts"),
    )
    callback = GradGuardCallback(on_nonfinite="skip")
    run_trainer = trainer(
        tmp_path, max_steps=5, log_every_n_steps=2, logger=logger, callbacks=[callback]
    )
    with pytest.warns(gg.GradGuardWarning, match="NaN"):
        run_trainer.fit(DigitsModule(nan_at=1), digits_loader())
    run = store.client.get_run(logger.run_id)
    # One route to MLflow (gradguard's sink, not log_metrics too): each logging step once.
    assert [s for s, _ in _history(store, logger.run_id, "gradguard/grad_norm_total")] == [0, 2, 4]
    assert run.data.tags["gradguard.status"] == "error"
    assert "gradguard.last_event.nonfinite" in run.data.tags


def test_no_active_run_says_to_start_one_and_starts_nothing(store: Store) -> None:
    before = len(store.client.search_runs([store.experiment_id]))
    sink = MlflowSink(figure_every_n_logs=0)
    with pytest.warns(gg.GradGuardWarning, match=r"mlflow\.start_run\(\)") as caught:
        guard = _train(dict(log_every_n_steps=2, warn=False, sinks=[sink]), steps=5)
    assert len(caught) == 1 and "MlflowSink" in str(caught[0].message)
    assert guard.step == 5 and guard.sinks.disabled == [sink]
    assert mlflow.active_run() is None
    assert len(store.client.search_runs([store.experiment_id])) == before


def test_a_deleted_run_disables_the_sink_with_one_warning(store: Store) -> None:
    run_id = store.client.create_run(store.experiment_id).info.run_id
    store.client.delete_run(run_id)  # the store now refuses every write to it
    sink = MlflowSink(run_id, client=store.client, figure_every_n_logs=0)
    memory = gg.MemorySink()
    with pytest.warns(gg.GradGuardWarning) as caught:
        guard = _train(
            dict(log_every_n_steps=2, on_nonfinite="skip", warn=False, sinks=[sink, memory]),
            steps=12,
            poison=(3, 4),
        )
    assert guard.step == 12  # training completed
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "MlflowSink" in message and "MLflow refused" in message and run_id in message
    assert guard.sinks.disabled == [sink]
    assert len(memory.scalars["gradguard/grad_norm_total"]) == 6  # the other sink went on


def test_a_server_that_never_answers_does_not_hold_training(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A real socket that accepts connections and never replies: a hung tracking server.
    # MLflow's own timeout is cut to 2 s so its request fails soon after the test.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        uri = f"http://127.0.0.1:{server.getsockname()[1]}"
        sink = MlflowSink(
            "0123456789abcdef", tracking_uri=uri, figure_every_n_logs=1, flush_timeout_s=0.5
        )
        with pytest.warns(gg.GradGuardWarning) as caught:
            guard = _train(dict(log_every_n_steps=2, warn=False, sinks=[sink]), steps=12)
    assert guard.step == 12 and guard.sinks.disabled == [sink]
    (warning,) = caught
    assert "did not take gradguard's writes within 0.5 s" in str(warning.message)
    assert uri in str(warning.message)


def test_writes_piling_up_for_a_hung_server_give_up_with_an_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    scalars = step_metrics(0, {"0": 1.0})
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        uri = f"http://127.0.0.1:{server.getsockname()[1]}"
        sink = MlflowSink("0123456789abcdef", tracking_uri=uri, figure_every_n_logs=1)
        # Each logging step queues a batch and a figure; the first request never returns.
        with pytest.raises(gg.GradGuardError, match="last 1000 writes") as caught:
            for step in range(600):
                sink.log_scalars(scalars, step)
    assert step == 500  # 1000 writes queued behind the hung one, then the error
    assert uri in str(caught.value) and "reachable" in str(caught.value)
    with pytest.raises(gg.GradGuardError, match="closed"):  # given up: says so, queues nothing
        sink.log_scalars(scalars, 601)
    sink.close()


def test_nan_and_inf_values_round_trip_as_mlflow_stores_them(store: Store) -> None:
    with mlflow.start_run(experiment_id=store.experiment_id) as run:
        sink = MlflowSink(figure_every_n_logs=0)
        sink.log_scalars({"a/nan": math.nan, "a/inf": math.inf, "a/ninf": -math.inf}, 3)
        sink.close()
    run_id = run.info.run_id
    ((step, value),) = _history(store, run_id, "a/nan")
    assert step == 3 and math.isnan(value)
    assert _history(store, run_id, "a/inf") == [(3, FLOAT_MAX)]
    assert _history(store, run_id, "a/ninf") == [(3, -FLOAT_MAX)]


def test_keys_mlflow_would_refuse_are_renamed_once(store: Store) -> None:
    long_layer = "block." * 60
    keys = {
        "gradguard/grad_norm/encoder.layers.0.linear1": 1.0,  # fine as it is
        "gradguard/grad_norm/heads:cls+aux": 2.0,
        "gradguard/grad_norm/heads_cls_aux": 3.0,  # what the one above cleans to
        "gradguard/grad_norm/../up": 4.0,
        f"gradguard/grad_norm/{long_layer}": 5.0,
    }
    with mlflow.start_run(experiment_id=store.experiment_id) as run:
        sink = MlflowSink(figure_every_n_logs=0)
        with pytest.warns(gg.GradGuardWarning, match="renamed metric keys") as caught:
            sink.log_scalars(keys, 0)
            sink.log_scalars(keys, 1)  # no second warning
        sink.close()
    assert len(caught) == 1
    stored = store.client.get_run(run.info.run_id).data.metrics
    assert len(stored) == len(keys)
    assert stored["gradguard/grad_norm/encoder.layers.0.linear1"] == 1.0
    assert stored["gradguard/grad_norm/heads_cls_aux"] == 2.0
    assert stored["gradguard/grad_norm/heads_cls_aux_2"] == 3.0
    assert stored["gradguard/grad_norm/__/up"] == 4.0
    (long_key,) = [k for k in stored if stored[k] == 5.0]
    assert len(long_key) == 250 and long_key == metric_key(f"gradguard/grad_norm/{long_layer}")
    assert [s for s, _ in _history(store, run.info.run_id, long_key)] == [0, 1]


def test_a_logging_step_over_the_batch_limit_is_split(store: Store) -> None:
    scalars = {f"gradguard/grad_norm/layer{i}": float(i) for i in range(2500)}
    with mlflow.start_run(experiment_id=store.experiment_id) as run:
        sink = MlflowSink(figure_every_n_logs=0)
        sink.log_scalars(scalars, 7)
        sink.log_event(gg.Event("spike", 7, ("layer3",), 9.5, "warning", "Spiked.", "Lower lr."))
        sink.close()
    data = store.client.get_run(run.info.run_id).data
    assert data.metrics == scalars
    assert data.tags["gradguard.status"] == "warning"
    assert data.tags["gradguard.last_event.spike"] == "step 7 (warning): Spiked. Try: Lower lr."


def test_without_matplotlib_it_says_so_once_and_logs_the_rest(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Simulates an install without matplotlib: a None entry makes `import matplotlib` fail.
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.warns(gg.GradGuardWarning, match=r"gradguard\[mlflow\]") as caught:
        sink = MlflowSink(figure_every_n_logs=1)
    assert len(caught) == 1 and "matplotlib" in str(caught[0].message)
    with mlflow.start_run(experiment_id=store.experiment_id) as run:
        guard = _train(
            dict(log_every_n_steps=3, on_nonfinite="skip", warn=False, sinks=[sink]),
            steps=7,
            poison=(4,),
        )
    assert not guard.sinks.disabled
    run_id = run.info.run_id
    assert [s for s, _ in _history(store, run_id, "gradguard/grad_norm_total")] == [0, 3, 6]
    assert store.client.get_run(run_id).data.tags["gradguard.status"] == "error"
    assert '"kind": "nonfinite"' in _download(store, run_id, EVENTS_ARTIFACT).read_text()
    assert _images(store, run_id) == {}


def test_missing_mlflow_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mlflow", None)
    with pytest.raises(gg.MissingDependencyError, match=r"gradguard\[mlflow\]"):
        MlflowSink()


def test_arguments_are_checked_at_construction() -> None:
    with pytest.raises(gg.ConfigurationError, match="run_id="):
        MlflowSink(tracking_uri="sqlite:///elsewhere.db")
    with pytest.raises(gg.ConfigurationError, match="not both"):
        MlflowSink("abc", client=MlflowClient(), tracking_uri="sqlite:///elsewhere.db")
    with pytest.raises(gg.ConfigurationError, match="figure_every_n_logs"):
        MlflowSink(figure_every_n_logs=-1)


def test_importing_the_module_pulls_no_backend() -> None:
    code = (
        "import sys; import gradguard.integrations.mlflow; "
        "print([m for m in ('mlflow', 'matplotlib') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
