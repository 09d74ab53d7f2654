"""TensorBoardSink against real event files, read back with TensorBoard's own EventAccumulator."""

from __future__ import annotations

import errno
import io
import math
import re
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from gradguard.integrations._figures import GradientFlow, save_gradient_flow_png
from gradguard.integrations.tensorboard import LAYOUT_TAG, TensorBoardSink, custom_scalars_layout
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from torch import nn
from torch.utils.tensorboard import SummaryWriter

import gradguard as gg
from tests.models import mlp, separable_data, step_metrics

LAYERS = ["0", "2", "4"]
RED = np.array([0xC0, 0x39, 0x2B])


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


def _accumulator(log_dir: Path) -> EventAccumulator:
    acc = EventAccumulator(
        str(log_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0, "histograms": 0}
    )
    acc.Reload()
    return acc


def _red_pixels(png: bytes) -> int:
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    return int((np.abs(pixels - RED).sum(axis=2) < 30).sum())


@pytest.fixture(scope="module")
def nan_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, gg.MemorySink, gg.GradGuard]:
    """26 steps logged every 5 (0, 5, ..., 25); step 10 has a NaN gradient, skipped.
    Device histograms of layers 0 and 4 on every 2nd logging step (0, 10, 20)."""
    log_dir = tmp_path_factory.mktemp("tb")
    memory = gg.MemorySink()
    sink = TensorBoardSink(str(log_dir), figure_every_n_logs=2, histograms=True)
    guard = _train(
        dict(
            log_every_n_steps=5,
            clip=1.0,
            on_nonfinite="skip",
            warn=False,
            sinks=[sink, memory],
            histograms=gg.Histograms(every_n_logs=2, exclude=["2"], log="all"),
        ),
        steps=26,
        poison=(10,),
    )
    assert not guard.sinks.disabled
    return log_dir, memory, guard


def test_scalars_are_in_the_event_file_at_the_logging_steps(nan_run: Any) -> None:
    log_dir, memory, _ = nan_run
    acc = _accumulator(log_dir)
    tags = set(acc.Tags()["scalars"])
    for layer in LAYERS:
        assert {f"gradguard/grad_norm/{layer}", f"gradguard/param_norm/{layer}"} <= tags
    assert {
        "gradguard/grad_norm_total",
        "gradguard/clip/threshold",
        "gradguard/skipped_steps",
    } <= tags
    log10_tags = {f"gradguard/grad_norm_log10/{layer}" for layer in LAYERS}
    assert tags - log10_tags == set(memory.scalars)  # every key the guard sent, as its tag
    assert log10_tags <= tags  # and the sink's own log10 series of the per-layer norms
    for layer in LAYERS:
        norms = dict(memory.scalars[f"gradguard/grad_norm/{layer}"])
        logs = {e.step: e.value for e in acc.Scalars(f"gradguard/grad_norm_log10/{layer}")}
        assert sorted(logs) == [0, 5, 15, 20, 25]  # step 10's NaN has no log
        for step, value in logs.items():
            assert value == pytest.approx(math.log10(norms[step]), abs=1e-6)
    for tag in tags - log10_tags:
        written = [(e.step, e.value) for e in acc.Scalars(tag)]
        sent = memory.scalars[tag]
        assert [s for s, _ in written] == [s for s, _ in sent], tag
        for (_, got), (_, want) in zip(written, sent):
            assert (math.isnan(got) and math.isnan(want)) or got == pytest.approx(want, rel=1e-6)
    total = dict((e.step, e.value) for e in acc.Scalars("gradguard/grad_norm_total"))
    assert sorted(total) == [0, 5, 10, 15, 20, 25]
    assert math.isnan(total[10]) and all(math.isfinite(v) for s, v in total.items() if s != 10)
    skipped = [(e.step, e.value) for e in acc.Scalars("gradguard/skipped_steps")]
    assert skipped[-1] == (25, 1.0)  # the NaN step was skipped, and the chart says so


def test_custom_scalars_layout_arranges_the_gradguard_panels(nan_run: Any) -> None:
    log_dir, memory, _ = nan_run
    acc = _accumulator(log_dir)
    assert acc.Tags()["tensors"].count(LAYOUT_TAG) == 1
    assert acc.SummaryMetadata(LAYOUT_TAG).plugin_data.plugin_name == "custom_scalars"
    events = acc.Tensors(LAYOUT_TAG)
    assert len(events) == 1  # written once
    layout = layout_pb2.Layout()
    layout.ParseFromString(events[0].tensor_proto.string_val[0])
    (category,) = layout.category
    assert category.title == "gradguard"
    charts = {chart.title: list(chart.multiline.tag) for chart in category.chart}

    def matched(chart_words: str) -> set[str]:
        (title,) = [t for t in charts if t.startswith(chart_words)]
        return {tag for tag in memory.scalars if any(re.search(rx, tag) for rx in charts[title])}

    total = {"gradguard/grad_norm_total", "gradguard/clip/threshold"}
    assert matched("gradient norm: total") == total
    # The log10 chart comes before the linear one: the vanishing layer is seen first.
    titles = list(charts)
    (log10_title,) = [t for t in titles if t.startswith("log10 gradient norm per layer")]
    assert titles.index(log10_title) < titles.index("gradient norm per layer")
    scalar_tags = acc.Tags()["scalars"]
    assert {
        tag for tag in scalar_tags if any(re.search(rx, tag) for rx in charts[log10_title])
    } == {f"gradguard/grad_norm_log10/{n}" for n in LAYERS}
    assert matched("gradient norm per layer") == {f"gradguard/grad_norm/{n}" for n in LAYERS}
    assert "gradguard/skipped_steps" in matched("skipped steps")
    assert matched("dead units") == {k for k in memory.scalars if "/dead_fraction/" in k}
    assert matched("dead units")  # the ReLU layers' dead fractions were logged and charted
    assert any("saturated" in t for t in charts)
    assert matched("clip coefficient") == {"gradguard/clip/coef"}
    assert matched("gradient-norm spike z-score") == {"gradguard/spike/zscore"}


def test_gradient_flow_figure_is_an_image_at_a_modest_rate(nan_run: Any, tmp_path: Path) -> None:
    log_dir, _, _ = nan_run
    acc = _accumulator(log_dir)
    images = {e.step: e for e in acc.Images("gradguard/gradient_flow")}
    # First logging step, every 2nd logging step after it, and the last one at flush.
    assert sorted(images) == [0, 10, 20, 25]
    for step, image in images.items():
        png = image.encoded_image_string
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and image.width > 400 and image.height > 250
        (tmp_path / f"flow_{step}.png").write_bytes(png)
    # Step 10 had NaN gradients: its bars are red; a healthy step has no red at all.
    assert _red_pixels(images[10].encoded_image_string) > 1000
    assert _red_pixels(images[0].encoded_image_string) == 0
    histogram_steps = [e.step for e in acc.Histograms("gradguard/grad_norm_log10_across_layers")]
    assert histogram_steps[0] == 0 and set(histogram_steps) <= set(images)
    # The heatmap of the run so far, next to each bar chart; from step 10 on it keeps the
    # NaN step's red column.
    heatmaps = {e.step: e for e in acc.Images("gradguard/gradient_flow_heatmap")}
    assert sorted(heatmaps) == sorted(images)
    assert _red_pixels(heatmaps[0].encoded_image_string) == 0
    for step in (10, 20, 25):
        assert _red_pixels(heatmaps[step].encoded_image_string) > 50, step
        (tmp_path / f"heatmap_{step}.png").write_bytes(heatmaps[step].encoded_image_string)


def test_device_histograms_land_in_the_histograms_tab(nan_run: Any) -> None:
    log_dir, memory, _ = nan_run
    acc = _accumulator(log_dir)
    tags = set(acc.Tags()["histograms"])
    assert {"gradguard/grad_histogram/0", "gradguard/grad_histogram/4"} <= tags
    assert {"gradguard/param_histogram/0", "gradguard/param_histogram/4"} <= tags
    assert not any(tag.endswith("_histogram/2") for tag in tags)  # exclude=["2"]
    # Every 2nd logging step; step 10 was skipped (NaN): its gradients were dropped.
    assert [e.step for e in acc.Histograms("gradguard/grad_histogram/0")] == [0, 20]
    assert [e.step for e in acc.Histograms("gradguard/param_histogram/0")] == [0, 10, 20]
    norms = dict(memory.scalars["gradguard/grad_norm/0"])
    for event in acc.Histograms("gradguard/grad_histogram/0"):
        value = event.histogram_value
        assert value.num == 16 * 32 + 32  # every entry of layer 0 (weight and bias)
        # No entry is larger than the layer's gradient norm (clipping only shrinks them).
        assert value.max <= math.log10(norms[event.step]) + 0.3  # up to one bin's width
        assert value.min < value.max


def test_events_are_text_summaries_at_their_step(nan_run: Any) -> None:
    log_dir, _, guard = nan_run
    acc = _accumulator(log_dir)
    (event,) = [e for e in guard.events if e.kind == "nonfinite"]
    tag = "gradguard/events/nonfinite/text_summary"  # torch's add_text appends /text_summary
    (text,) = acc.Tensors(tag)
    assert acc.SummaryMetadata(tag).plugin_data.plugin_name == "text"
    body = text.tensor_proto.string_val[0].decode()
    assert text.step == event.step == 10
    assert "ERROR: nonfinite" in body and "NaN" in body and "**Try:**" in body
    assert event.advice in body and "`4`" in body  # the layer nearest the loss, named


def test_figure_png_for_a_person_to_look_at(nan_run: Any, tmp_path: Path) -> None:
    _, memory, _ = nan_run
    step = 10
    scalars = {
        key: dict(points)[step] for key, points in memory.scalars.items() if step in dict(points)
    }
    norms = tuple(scalars.get(f"gradguard/grad_norm/{name}") for name in LAYERS)
    flow = GradientFlow(step, tuple(LAYERS), norms, scalars["gradguard/grad_norm_total"])
    path = save_gradient_flow_png(flow, tmp_path / "gradient_flow.png")
    assert _red_pixels(path.read_bytes()) > 1000


def test_lightning_tensorboard_logger_writer_is_flushed_not_closed(tmp_path: Path) -> None:
    from lightning.pytorch.loggers import TensorBoardLogger

    logger = TensorBoardLogger(str(tmp_path), name="exp", version=0)
    sink = TensorBoardSink(writer=logger.experiment)
    _train(dict(log_every_n_steps=4, sinks=[sink], warn=False), steps=9)
    # gradguard detached (flush + close on the sink); the logger's writer still works.
    logger.log_metrics({"loss": 0.5}, step=9)
    logger.finalize("success")
    acc = _accumulator(Path(logger.log_dir))
    assert [e.step for e in acc.Scalars("gradguard/grad_norm_total")] == [0, 4, 8]
    assert [e.step for e in acc.Scalars("loss")] == [9]
    assert [e.step for e in acc.Images("gradguard/gradient_flow")] == [0, 8]
    layout = layout_pb2.Layout()
    layout.ParseFromString(acc.Tensors(LAYOUT_TAG)[0].tensor_proto.string_val[0])
    titles = [chart.title for chart in layout.category[0].chart]
    # No clip strategy: no empty clip charts; the rest of the panel is there.
    assert not any("clip" in title for title in titles)
    assert "gradient norm per layer" in titles and "gradient norm: total" in titles


class _FullDiskWriter(SummaryWriter):
    """A real SummaryWriter on a disk that has filled up: every write raises ENOSPC."""

    def _fail(self, *args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    add_scalar = add_custom_scalars = add_text = add_image = add_histogram = _fail
    flush = _fail


def test_a_failing_writer_disables_the_sink_with_one_warning(tmp_path: Path) -> None:
    writer = _FullDiskWriter(str(tmp_path))
    sink = TensorBoardSink(writer=writer)
    memory = gg.MemorySink()
    with pytest.warns(gg.GradGuardWarning) as caught:
        guard = _train(
            dict(log_every_n_steps=2, on_nonfinite="skip", warn=False, sinks=[sink, memory]),
            steps=20,
            poison=(6, 7),
        )
    assert guard.step == 20  # training completed
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "TensorBoardSink" in message and "No space left on device" in message
    assert guard.sinks.disabled == [sink]
    assert len(memory.scalars["gradguard/grad_norm_total"]) == 10  # the other sink went on
    SummaryWriter.close(writer)


def test_custom_prefix_layout_regexes_escape_the_prefix() -> None:
    (charts,) = custom_scalars_layout("runs.a+b").values()
    per_layer = charts["gradient norm per layer"][1]
    assert any(re.search(rx, "runs.a+b/grad_norm/encoder.0") for rx in per_layer)
    assert not any(re.search(rx, "runsXa+b/grad_norm/encoder.0") for rx in per_layer)


def test_custom_prefix_is_read_from_the_keys(tmp_path: Path) -> None:
    sink = TensorBoardSink(str(tmp_path), figure_every_n_logs=1)
    _train(dict(log_every_n_steps=5, prefix="train/gg", sinks=[sink], warn=False), steps=6)
    acc = _accumulator(Path(sink.log_dir or tmp_path))
    assert "train/gg/grad_norm_total" in acc.Tags()["scalars"]
    assert [e.step for e in acc.Images("train/gg/gradient_flow")] == [0, 5]
    layout = layout_pb2.Layout()
    layout.ParseFromString(acc.Tensors(LAYOUT_TAG)[0].tensor_proto.string_val[0])
    assert [c.title for c in layout.category] == ["train/gg"]


def test_figures_off_and_no_writes_after_close(tmp_path: Path) -> None:
    sink = TensorBoardSink(str(tmp_path), figure_every_n_logs=0)
    sink.log_scalars({"gradguard/grad_norm/0": 1.0, "gradguard/grad_norm_total": 1.0}, 0)
    sink.close()
    with pytest.raises(gg.GradGuardError, match="closed"):  # said, not silently dropped
        sink.log_scalars({"gradguard/grad_norm_total": 2.0}, 1)
    sink.close()
    acc = _accumulator(tmp_path)
    assert acc.Tags()["images"] == []
    assert [e.step for e in acc.Scalars("gradguard/grad_norm_total")] == [0]
    assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 1


def test_importing_the_dashboard_modules_pulls_no_backend() -> None:
    code = (
        "import sys; import gradguard.integrations.tensorboard, gradguard.integrations.wandb, "
        "gradguard.integrations._figures; "
        "print([m for m in ('tensorboard', 'wandb', 'matplotlib') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_missing_tensorboard_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    # Simulates an install without the extra: a None entry makes `import` fail.
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(gg.MissingDependencyError, match=r"gradguard\[tensorboard\]"):
        TensorBoardSink("unused")


def test_without_matplotlib_it_says_so_once_and_writes_the_rest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Simulates an install with tensorboard but not matplotlib (matplotlib IS installed
    # here): a None entry in sys.modules makes `import matplotlib` fail.
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.warns(gg.GradGuardWarning) as caught:
        sink = TensorBoardSink(str(tmp_path))
    (warning,) = caught
    message = str(warning.message)
    assert "matplotlib" in message and "pip install 'gradguard[tensorboard]'" in message
    guard = _train(
        dict(log_every_n_steps=5, on_nonfinite="skip", sinks=[sink], warn=False),
        steps=11,
        poison=(5,),
    )
    assert not guard.sinks.disabled
    acc = _accumulator(tmp_path)
    assert [e.step for e in acc.Scalars("gradguard/grad_norm_total")] == [0, 5, 10]
    assert "gradguard/grad_norm_log10/0" in acc.Tags()["scalars"]
    assert acc.Tags()["tensors"].count(LAYOUT_TAG) == 1  # the layout needs no matplotlib
    assert "gradguard/events/nonfinite/text_summary" in acc.Tags()["tensors"]
    assert acc.Tags()["images"] == []


def test_a_failing_figure_keeps_the_scalars(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gradguard.integrations.tensorboard as module

    def broken(flow: Any) -> Any:
        raise RuntimeError("font cache is corrupt")

    monkeypatch.setattr(module, "render_gradient_flow", broken)  # a matplotlib failure
    sink = TensorBoardSink(str(tmp_path), figure_every_n_logs=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(3):
            sink.log_scalars(step_metrics(step, {"0": 1.0}), step)
        sink.close()
    assert len(caught) == 1 and "without figures" in str(caught[0].message)
    acc = _accumulator(tmp_path)
    assert [e.step for e in acc.Scalars("gradguard/grad_norm_total")] == [0, 1, 2]


def test_the_layout_charts_the_loss_detectors_and_the_recovery_ladder(tmp_path: Path) -> None:
    # A loop that hands the loss over, with the recovery ladder on: their series get charts,
    # and every series a chart names is one the run really wrote.
    torch.manual_seed(0)
    model = mlp([16, 32, 32, 4])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = separable_data()
    sink = TensorBoardSink(str(tmp_path), log10_norms=False)
    with gg.attach(model, optimizer, sinks=[sink], log_every_n_steps=10, warn=False,
                   on_instability=gg.Recover()) as guard:  # fmt: skip
        for step in range(140):
            idx = torch.arange(step * 32, step * 32 + 32) % x.shape[0]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            guard.observe_loss(loss)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    acc = _accumulator(tmp_path)
    layout = layout_pb2.Layout()
    layout.ParseFromString(acc.Tensors(LAYOUT_TAG)[0].tensor_proto.string_val[0])
    charts = {chart.title: list(chart.multiline.tag) for chart in layout.category[0].chart}
    scalar_tags = set(acc.Tags()["scalars"])

    def matched(chart_words: str) -> set[str]:
        (title,) = [t for t in charts if t.startswith(chart_words)]
        return {tag for tag in scalar_tags if any(re.search(rx, tag) for rx in charts[title])}

    assert matched("loss spike z-score and trends") == {
        "gradguard/stability/loss_zscore",
        "gradguard/stability/loss_trend",
        "gradguard/stability/grad_norm_trend",
    }
    assert matched("spike score") == {
        "gradguard/stability/spike_score",
        "gradguard/stability/spike_score_total",
    }
    assert matched("recovery ladder") == {
        "gradguard/recovery/lr_factor",
        "gradguard/recovery/rollbacks",
    }
