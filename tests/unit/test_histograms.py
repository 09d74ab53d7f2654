"""gg.Histograms: per-layer log10-magnitude histograms counted on the device, handed to
the sinks on logging steps (a real guard, a real optimizer, gradients set by hand)."""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import gradguard as gg
from tests.models import mlp
from tests.syncs import count_syncs


class StatsSink(gg.MemorySink):
    """A MemorySink that also keeps the typed statistics of each logging step."""

    def __init__(self) -> None:
        super().__init__()
        self.stats: list[gg.LoggedStats] = []

    def log_scalars(self, scalars: Any, step: int) -> None:
        super().log_scalars(scalars, step)
        self.stats.append(scalars.stats)


def _run(steps: int, grads: dict[str, torch.Tensor] | None = None, **options: Any) -> StatsSink:
    """``steps`` SGD steps of a 3-layer MLP (layers ``0``, ``2``, ``4``); ``grads`` replaces
    the named parameters' gradients before each step."""
    torch.manual_seed(0)
    model = mlp([8, 16, 16, 4])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: the weights stay put
    sink = StatsSink()
    options.setdefault("log_every_n_steps", 1)
    named = dict(model.named_parameters())
    with gg.attach(model, optimizer, sinks=[sink], warn=False, **options):
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            model(torch.randn(4, 8)).square().mean().backward()
            for name, grad in (grads or {}).items():
                named[name].grad = grad.clone()
            optimizer.step()
    return sink


def test_counts_match_numpy_on_log10_magnitudes() -> None:
    values = torch.tensor([1.5e-3, -2e-3, 5e-1, 0.0, 0.0, float("nan"), float("inf"), 1e-20, 1e9])
    weight = torch.zeros(16, 8)
    weight.view(-1)[: values.numel()] = values
    # The rest of the layer. No entry sits on a bin edge, where float32 rounding decides.
    weight.view(-1)[values.numel() :] = 3e-2
    hists = gg.Histograms(bins=16, log10_range=(-8.0, 0.0), include=["0"])
    sink = _run(1, {"0.weight": weight, "0.bias": torch.full((16,), -4e-5)}, histograms=hists)
    (stats,) = sink.stats
    histogram = stats.histograms["grad_histogram"]["0"]
    assert set(stats.histograms["grad_histogram"]) == {"0"}  # include=["0"] only
    entries = torch.cat([weight.view(-1), torch.full((16,), -4e-5)]).double().numpy()
    finite = entries[np.isfinite(entries) & (entries != 0)]
    # Out of range entries land in the edge bins: 1e-20 in the first, 1e9 in the last.
    expected, edges = np.histogram(np.clip(np.log10(np.abs(finite)), -8, 0), 16, (-8.0, 0.0))
    assert list(histogram.counts) == expected.tolist()
    assert histogram.edges == pytest.approx(edges.tolist())
    assert histogram.zeros == 2 and histogram.nonfinite == 2
    assert histogram.entries == 16 * 8 + 16  # every entry of the layer, counted once


def test_include_exclude_patterns_and_parameters() -> None:
    hists = gg.Histograms(include=["*"], exclude=["2"], log="all")
    (stats,) = _run(1, histograms=hists).stats
    assert set(stats.histograms) == {"grad_histogram", "param_histogram"}
    for by_layer in stats.histograms.values():
        assert list(by_layer) == ["0", "4"]
    param = stats.histograms["param_histogram"]["4"]
    assert param.entries == 16 * 4 + 4 and param.zeros == 0


def test_a_pattern_that_matches_no_layer_is_said_once() -> None:
    hists = gg.Histograms(include=["encoder.*"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sink = _run(3, histograms=hists)
    messages = [str(w.message) for w in caught if issubclass(w.category, gg.GradGuardWarning)]
    assert len(messages) == 1
    assert "'encoder.*'" in messages[0] and "0, 2, 4" in messages[0]
    assert all(not stats.histograms for stats in sink.stats)


def test_rate_every_n_logs_and_logging_steps_only() -> None:
    sink = _run(13, histograms=gg.Histograms(every_n_logs=2), log_every_n_steps=3)
    with_histograms = [s.step for s in sink.stats if s.histograms]
    assert [s.step for s in sink.stats] == [0, 3, 6, 9, 12]
    assert with_histograms == [0, 6, 12]


def test_histograms_true_means_the_defaults() -> None:
    (stats,) = _run(1, histograms=True).stats
    histogram = stats.histograms["grad_histogram"]["0"]
    assert len(histogram.counts) == 64 and histogram.edges[0] == -12.0
    assert "param_histogram" not in stats.histograms


def test_a_skipped_step_has_no_gradient_histogram() -> None:
    nan = torch.full((4, 16), float("nan"))
    sink = _run(1, {"4.weight": nan}, histograms=True, on_nonfinite="skip")
    assert sink.stats[0].histograms.get("grad_histogram", {}) == {}


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"every_n_logs": 0}, "every_n_logs"),
        ({"bins": 1}, "bins"),
        ({"bins": 4096}, "bins"),
        ({"log10_range": (0.0, -3.0)}, "log10_range"),
        ({"log10_range": (0.0, math.inf)}, "log10_range"),
        ({"include": [3]}, "include"),
        ({"exclude": 3}, "exclude"),
        ({"log": "weights"}, "log"),
    ],
)
def test_bad_arguments_are_refused_at_construction(kwargs: dict[str, Any], named: str) -> None:
    with pytest.raises(gg.ConfigurationError, match=named):
        gg.Histograms(**kwargs)


def test_bad_histograms_option_is_refused() -> None:
    with pytest.raises(gg.ConfigurationError, match="histograms"):
        gg.GradGuard(histograms="yes")  # type: ignore[typeddict-item]


def _logging_step_syncs(**options: Any) -> int:
    torch.manual_seed(0)
    model = mlp([8, 32, 32, 4])
    optimizer = torch.optim.Adam(model.parameters())
    x = torch.randn(16, 8)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        optimizer.step()

    guard = gg.attach(model, optimizer, log_every_n_steps=2, activations=False, **options)
    step()
    step()
    with count_syncs() as counter:
        step()  # step 2: a logging step
    guard.detach()
    return counter.count


def test_histograms_add_no_host_read_to_a_logging_step() -> None:
    # Their counts travel in the logging step's one bulk copy (``.tolist()``, which the
    # counter does not see); an ``.item()`` per layer or bin would show here.
    assert _logging_step_syncs(histograms=gg.Histograms(log="all")) == _logging_step_syncs()


def test_histograms_serve_one_guard() -> None:
    hists = gg.Histograms()
    model, other = nn.Linear(2, 2), nn.Linear(2, 2)
    first = gg.attach(model, torch.optim.SGD(model.parameters(), lr=0.1), histograms=hists)
    with pytest.raises(gg.ConfigurationError, match="another GradGuard"):
        gg.attach(other, torch.optim.SGD(other.parameters(), lr=0.1), histograms=hists)
    first.detach()
