"""guard.report() (for a person) and guard.summary() (the same as data, for sinks)."""

from __future__ import annotations

import json
import warnings
from collections import Counter
from typing import Any

import torch
from torch import nn

import gradguard as gg
from tests.models import digits, mlp


def _train(
    model: nn.Module,
    steps: int,
    *,
    lr: float = 0.1,
    adam: bool = False,
    nan_at: tuple[int, ...] = (),
    **guard_kwargs: Any,
) -> gg.GradGuard:
    x, y = digits()
    opt: torch.optim.Optimizer = (
        torch.optim.Adam(model.parameters(), lr=lr)
        if adam
        else torch.optim.SGD(model.parameters(), lr=lr)
    )
    guard_kwargs.setdefault("activations", False)
    guard = gg.attach(model, opt, **guard_kwargs)
    gen = torch.Generator().manual_seed(0)
    for step in range(steps):
        idx = torch.randint(0, x.shape[0], (64,), generator=gen)
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        if step in nan_at:
            next(model.parameters()).grad.view(-1)[0] = float("nan")  # type: ignore[union-attr]
        opt.step()
    return guard


def _healthy_run() -> gg.GradGuard:
    torch.manual_seed(0)
    model = mlp([64, 32, 32, 10])
    for module in model:
        if isinstance(module, nn.Linear):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    return _train(model, 60, lr=1e-3, adam=True, log_every_n_steps=10)


class _DeadUnitsStub(gg.Detector):
    """A third-party detector (the public Detector interface) reporting a kind."""

    kinds = ("dead_units",)

    def on_log(self, stats: gg.LoggedStats) -> list[gg.Finding]:
        if stats.step != 4:
            return []
        return [
            gg.Finding(
                "dead_units",
                ("4",),
                0.9,
                "90% of units in '4' never fire.",
                "lower the learning rate.",
                max_gap=1,  # a one-off: the episode ends at once
            )
        ]


def _broken_run() -> gg.GradGuard:
    torch.manual_seed(0)
    model = mlp([64] + [32] * 8 + [10], nn.Sigmoid)
    detectors = [gg.GradientFlowDetector(), _DeadUnitsStub()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gg.GradGuardWarning)
        return _train(
            model, 12, nan_at=(2, 8), on_nonfinite="skip", log_every_n_steps=1, detectors=detectors
        )


def test_healthy_report_gives_the_verdict_and_the_flow_table() -> None:
    guard = _healthy_run()
    report = guard.report()
    lines = report.splitlines()
    assert lines[0] == "gradguard report: 60 optimizer steps, 0 skipped by gradguard"
    assert lines[1] == "Verdict: HEALTHY - no problem found in 60 optimizer steps."
    assert "Gradient flow at step 50 (input first; depth from the first forward pass):" in report
    rows = [
        line.split()[0]
        for line in lines
        if line.startswith("  ") and line.split()[0] in {"0", "2", "4"}
    ]
    assert rows == ["0", "2", "4"]  # every layer, in depth order
    assert "Depth profile: output-side / input-side median grad norm = " in report
    assert "Events: none." in report and "What to try first" not in report


def test_broken_report_groups_events_by_kind_and_ranks_the_remedies() -> None:
    guard = _broken_run()
    report = guard.report()
    assert "12 optimizer steps, 2 skipped by gradguard" in report
    assert " ".join(report.split()).startswith(
        "gradguard report: 12 optimizer steps, 2 skipped by gradguard "
        "Verdict: UNHEALTHY - NaN/Inf gradients (2x, last seen at step 8); "
        "vanishing gradients (8x, still present); dead units (1x, last seen at step 4). "
    )
    # NaN at steps 2 and 8 is one intermittent episode: one Event, both steps counted; at
    # step 11 (logging every step) it is no longer "still present", and the folded
    # sighting at step 8 is the one quoted.
    events_at = report.index("Events (3), by kind:")
    nonfinite = report.index("  nonfinite: 1 error, step 2, seen 2 times\n", events_at)
    vanishing = report.index(
        "  vanishing: 1 warning, step 3, seen 8 times (still present)", events_at
    )
    dead = report.index("  dead_units: 1 warning, step 4", events_at)
    assert nonfinite < vanishing < dead
    remedies = report[report.index("What to try first:") :].splitlines()
    assert remedies[1].startswith("  1. [NaN/Inf gradients] look at the forward pass of '0'")
    assert any(
        line.startswith("  2. [vanishing gradients] the Sigmoid activations") for line in remedies
    )
    assert any(line.startswith("  3. [dead units] lower the learning rate.") for line in remedies)


def test_the_flow_table_bar_is_a_log_scale() -> None:
    guard = _broken_run()
    table = {
        line.split()[0]: line
        for line in guard.report().splitlines()
        if line.startswith("  ") and line.split() and line.split()[0].isdigit()
    }
    bars = {name: line.count("#") for name, line in table.items()}
    assert bars["0"] < bars["8"] < bars["16"] == 24  # grad norms fall toward the input
    norms = guard.summary()["layers"]
    by_name = {row["name"]: row["grad_norm"] for row in norms}
    assert by_name["0"] < 1e-3 * by_name["16"]


def test_summary_is_plain_data_matching_the_events() -> None:
    guard = _broken_run()
    summary = guard.summary()
    json.dumps(summary)  # numbers, strings, lists, dicts: any sink can take it
    assert summary["verdict"] == "error" and summary["healthy"] is False
    assert summary["events"] == dict(Counter(event.kind for event in guard.events))
    assert [g["kind"] for g in summary["event_groups"]] == ["nonfinite", "vanishing", "dead_units"]
    group = summary["event_groups"][1]
    assert group["count"] == 1 and group["active"] is True and group["layers"][0] in ("0", "2")
    assert [r["kind"] for r in summary["remedies"]] == ["nonfinite", "vanishing", "dead_units"]
    assert [row["name"] for row in summary["layers"]] == guard.layers
    assert summary["skipped_steps"] == 2 and summary["step"] == 12
    assert summary["profile_orders"] > 2

    healthy = _healthy_run().summary()
    assert healthy["verdict"] == "healthy" and healthy["healthy"] is True
    assert healthy["event_groups"] == [] and healthy["remedies"] == []


def test_layers_without_depth_and_zero_gradients_are_marked() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(64, 32)
            self.norm = nn.LayerNorm(32)
            self.b = nn.Linear(32, 32)
            self.c = nn.Linear(32, 32)
            self.head = nn.Linear(32, 10)
            for layer in (self.a, self.b):
                nn.init.constant_(layer.bias, -5.0)  # every unit after a and b is dead

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.norm(self.a(x)) - 5.0)
            return self.head(torch.relu(self.c(torch.relu(self.b(h)))))  # type: ignore[no-any-return]

    torch.manual_seed(0)
    guard = _train(Net(), 3, log_every_n_steps=1)
    report = guard.report()
    assert "(not in profile" in next(
        line for line in report.splitlines() if line.startswith("  norm ")
    )
    flat = " ".join(report.split())
    assert "Note: 2 weight layer(s) got an exactly zero gradient ('a', 'b')" in flat
    assert guard.summary()["zero_grad_layers"] == ["a", "b"]
    assert list(guard.events) == []  # "no signal" is not "vanishing"


def test_a_very_deep_model_shows_both_ends_of_the_table() -> None:
    torch.manual_seed(0)
    model = mlp([64] + [8] * 60 + [10])
    guard = _train(model, 1, log_every_n_steps=1)
    report = guard.report()
    assert "... 21 layers not shown ..." in report
    assert "\n  0 " in report and "\n  120 " in report


def test_a_report_before_any_logging_step() -> None:
    model = mlp([4, 4, 2])
    guard = gg.attach(model, torch.optim.SGD(model.parameters(), lr=0.1), activations=False)
    report = guard.report()
    assert "Verdict: HEALTHY - no problem found in 0 optimizer steps." in report
    assert "Gradient flow: no logging step yet." in report
