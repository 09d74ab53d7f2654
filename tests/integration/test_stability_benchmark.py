"""The stability benchmark (``benchmarks/stability.py``), in process, on a tiny GPT.

The sweep's path is the one ``--quick`` takes, shrunk to a 1-block d_model 32 model: a rate
that is absurd must diverge and a small one must not, the runs of one seed must start from
the same weights and batches, and the report must have a row per configuration and a
column per learning rate in every table.
"""

from __future__ import annotations

import importlib
import json
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
LRS = [3e-3, 10.0]
CONFIGS = ["none", "clip_grad_norm", "autoclip", "zclip"]


@pytest.fixture(scope="module")
def stability() -> Iterator[ModuleType]:
    # benchmarks/ is a folder of scripts, not a package: import them as the script would.
    sys.path.insert(0, str(BENCHMARKS))
    try:
        yield importlib.import_module("stability")
    finally:
        sys.path.remove(str(BENCHMARKS))


@pytest.fixture(scope="module")
def metrics(stability: ModuleType) -> ModuleType:
    return sys.modules["stability_metrics"]


@pytest.fixture(scope="module")
def sweep(stability: ModuleType) -> tuple[object, list[object]]:
    settings = stability.Settings(
        model=stability.ModelConfig(n_layers=1, d_model=32, n_heads=2, context=16),
        steps=60,
        batch_size=8,
        warmup_steps=6,
        eval_every=20,
        val_windows=32,
        corpus_chars=60_000,
        target_val_loss=3.8,
    )
    return settings, stability.run_sweep(settings, LRS, CONFIGS, seeds=[0])


def test_small_rate_learns_and_absurd_rate_diverges(sweep: tuple[object, list[object]]) -> None:
    _, results = sweep
    assert len(results) == len(LRS) * len(CONFIGS)
    for r in results:
        assert r.observed  # --observe is on by default: every configuration has a guard
        assert len(r.grad_norms) == len(r.train_losses) <= 60
        if r.lr == 3e-3:
            assert not r.diverged, r
            assert r.final_val_loss < r.initial_val_loss - 0.5
            assert r.steps_to_target is not None and r.steps_to_target % 20 == 0
        else:
            assert r.diverged, r
            assert r.spikes >= 1 and r.first_spike_step == r.spike_steps[0]
            assert r.grad_jump_before_spike is not None and r.grad_jump_before_spike > 0.0
            assert r.steps_to_target is None
        if r.lead_time is not None:
            assert r.lead_time == r.first_spike_step - r.first_event_step
        assert r.false_alarm == (r.healthy and bool(r.events))


def test_the_loss_fed_guard_warns_no_later_than_the_spike(
    sweep: tuple[object, list[object]],
) -> None:
    _, results = sweep
    for r in results:
        assert len(r.update_ratios) == len(r.train_losses)
        assert len(r.update_ratios[0]) == len(r.layers) and "head" in r.layers
        if r.lr == 3e-3:
            assert r.events == [], r.events  # healthy: silent
        else:
            step = r.first_event_of("loss_spike")
            assert step is not None and step <= r.first_spike_step, r.events


def test_runs_of_a_seed_share_weights_and_batches(sweep: tuple[object, list[object]]) -> None:
    _, results = sweep
    assert len({r.initial_val_loss for r in results}) == 1
    # Step 0's loss is computed before any update: same weights and batch, same loss.
    assert len({r.train_losses[0] for r in results}) == 1


def test_report_has_a_row_per_configuration_and_a_column_per_rate(
    stability: ModuleType, metrics: ModuleType, sweep: tuple[object, list[object]]
) -> None:
    settings, results = sweep
    report = stability.render_markdown(results, settings, CONFIGS, LRS, [0], "test", 1.0)
    header = "| configuration | lr 0.003 | lr 10 |"
    assert report.count(header) == len(metrics.TABLES)
    for name in CONFIGS:
        rows = [
            line
            for line in report.splitlines()
            if line.startswith(f"| {_label(stability, name)} |")
        ]
        assert len(rows) == len(metrics.TABLES)
        assert all(row.count("|") == len(LRS) + 2 for row in rows)
    diverged = next(line for line in report.splitlines() if line.startswith("| no clipping |"))
    assert diverged == "| no clipping | 0/1 | 1/1 |"
    assert "torch threads" in report
    by_kind = report.split("### Lead time by Event kind")[1].split("## Every run")[0]
    assert "| `loss_spike` | no spike | +" in by_kind  # before the spike rule dates it
    assert "| `loss_spike` | 0/4 | — |" in by_kind  # silent at the healthy rate
    every_run = report.split("## Every run")[1]
    assert sum(line.startswith("|") for line in every_run.splitlines()) == 2 + len(results)


def test_json_holds_every_run_without_nan_tokens(
    stability: ModuleType, sweep: tuple[object, list[object]]
) -> None:
    _, results = sweep
    text = stability.runs_to_json(results, {"command": "test"})
    data = json.loads(text, parse_constant=lambda token: pytest.fail(f"bare {token} in JSON"))
    assert len(data["runs"]) == len(results)
    assert {run["config"] for run in data["runs"]} == set(CONFIGS)
    assert data["definitions"]["spike_factor"] == 1.5


def test_loss_spikes_counts_each_excursion_once(metrics: ModuleType) -> None:
    losses = [1.0] * 20 + [2.0, 2.0, 1.0] + [1.0] * 5 + [math.nan, math.nan]
    assert metrics.loss_spikes(losses) == [20, 28]
    # A falling loss is never a spike, and nothing counts before step 10.
    assert metrics.loss_spikes([5.0 - 0.1 * i for i in range(40)]) == []
    assert metrics.loss_spikes([1.0, 9.0] + [1.0] * 20) == []


def test_grad_jump_reads_the_five_steps_up_to_the_spike(metrics: ModuleType) -> None:
    norms = [1.0] * 20 + [4.0, 1.0, 1.0]
    assert metrics.grad_jump_before(norms, 22) == 4.0  # step 20 is within 5 steps of 22
    assert metrics.grad_jump_before(norms, 19) == 1.0  # before the jump: nothing announced
    assert metrics.grad_jump_before([1.0] * 20 + [math.nan], 20) == 1.0  # NaN is no number


def test_list_names_every_configuration(
    stability: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    assert stability.main(["--list"]) == 0
    out = capsys.readouterr().out
    for name in stability.CONFIGS:
        assert name in out


def _label(stability: ModuleType, name: str) -> str:
    return str(stability.CONFIGS[name].label)
