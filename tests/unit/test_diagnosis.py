"""GradientFlowDetector: vanishing/exploding from the depth profile, debounced, resumable."""

from __future__ import annotations

import io
import math
import random
from collections import OrderedDict

import pytest
import torch
from torch import nn

import gradguard as gg
from gradguard._debounce import Debouncer
from gradguard._layers import discover_layers
from tests.models import digits, mlp
from tests.syncs import count_syncs

LAYERS = ["a", "b", "c", "d", "e", "f"]
VANISHING = [1e-8, 1e-7, 1e-5, 1e-3, 1e-2, 0.5]  # input first
EXPLODING = [3e4, 1e4, 1e3, 10.0, 1.0, 0.5]
FLAT = [0.3, 0.5, 0.2, 0.4, 0.6, 0.3]


def view(
    step: int,
    grads: list[float],
    *,
    layers: list[str] | None = None,
    params: list[float] | None = None,
    total: float | None = None,
    update: list[float] | None = None,
    present: list[bool] | None = None,
) -> gg.LoggedStats:
    layers = layers if layers is not None else LAYERS[: len(grads)]
    present = present if present is not None else [True] * len(grads)
    per_layer: dict[str, tuple[float | None, ...]] = {
        "grad_norm": tuple(g if p else None for g, p in zip(grads, present)),
        "param_norm": tuple(params if params is not None else [5.0] * len(grads)),
    }
    if update is not None:
        per_layer["update_ratio"] = tuple(update)
    return gg.LoggedStats(
        step=step,
        sink_step=step,
        layers=tuple(layers),
        total=total if total is not None else math.sqrt(sum(g * g for g in grads)),
        per_layer=per_layer,
        scalars={},
        present=tuple(present),
    )


def bind(
    detector: gg.GradientFlowDetector,
    model: nn.Module,
    *,
    clip: gg.ClipStrategy | None = None,
    every: int = 50,
) -> list[str]:
    """Bind as a guard would (logging every ``every`` steps); the layer names, depth order."""
    layout = discover_layers(model, torch.optim.SGD(model.parameters(), lr=0.1))
    context = gg.GuardContext(model, layout, torch.device("cpu"), every, 100, "warn", "warn", clip)
    detector.bind(context)
    return layout.names


class Checker:
    """A detector plus the guard's debouncer: findings in, Events out, as in a guard."""

    def __init__(self, detector: gg.GradientFlowDetector) -> None:
        self.detector = detector
        self.debouncer = Debouncer()

    def check(self, stats: gg.LoggedStats) -> list[gg.Event]:
        if self.detector.context is None:
            # Unbound: bind to a stand-in model whose layers all have depth.
            names = OrderedDict((name, nn.Linear(2, 2)) for name in stats.layers)
            bind(self.detector, nn.Sequential(names))
        events = [
            self.debouncer.admit(finding, stats.step) for finding in self.detector.on_log(stats)
        ]
        return [e for e in events if e is not None]


def checker(detector: gg.GradientFlowDetector) -> Checker:
    found: Checker | None = getattr(detector, "_test_checker", None)
    if found is None:
        found = Checker(detector)
        detector._test_checker = found  # type: ignore[attr-defined]
    return found


def check(detector: gg.GradientFlowDetector, stats: gg.LoggedStats) -> list[gg.Event]:
    return checker(detector).check(stats)


def feed(
    detector: gg.GradientFlowDetector, profiles: list[list[float]], every: int = 50, **kw: object
) -> list[gg.Event]:
    events: list[gg.Event] = []
    for i, grads in enumerate(profiles):
        events.extend(check(detector, view(i * every, grads, **kw)))  # type: ignore[arg-type]
    return events


# ---------------------------------------------------------------------------- detection
def test_vanishing_fires_after_three_checks_naming_the_input_side_worst_first() -> None:
    detector = gg.GradientFlowDetector()
    assert feed(detector, [VANISHING] * 2) == []  # two checks: not yet sustained
    (event,) = check(detector, view(100, VANISHING))
    assert event.kind == "vanishing" and event.step == 100 and event.severity == "warning"
    # Every input-side layer >= 2 orders below the output side's median, worst first.
    assert event.layers == ("a", "b", "c")
    # Median (log10) of the output third (1e-2, 0.5) over that of the input third (1e-8, 1e-7).
    output_side = (math.log10(1e-2) + math.log10(0.5)) / 2
    input_side = (math.log10(1e-8) + math.log10(1e-7)) / 2
    assert event.value == pytest.approx(10 ** (output_side - input_side))
    assert "over 3 consecutive checks" in event.message
    assert "'a'" in event.message and "1.0e-08" in event.message


def test_exploding_profile_names_the_input_side_largest_first() -> None:
    detector = gg.GradientFlowDetector()
    events = feed(detector, [EXPLODING] * 3)
    assert [e.kind for e in events] == ["exploding"]
    assert events[0].layers == ("a", "b", "c")
    assert events[0].details["evidence"] == "profile"
    assert "grows" in events[0].message and "3.0e+04" in events[0].message


def test_gradients_dwarfing_the_weights_are_exploding() -> None:
    detector = gg.GradientFlowDetector()
    grads = [400.0, 500.0, 900.0, 450.0]
    events = feed(detector, [grads] * 3, params=[2.0, 2.0, 3.0, 2.0])
    assert [e.kind for e in events] == ["exploding"]
    assert events[0].details["evidence"] == "scale"
    assert events[0].layers[0] == "c"
    assert events[0].value == pytest.approx(237.5)  # median of 200, 250, 300, 225
    assert "238x the size of the weights" in events[0].message


def test_total_norm_rising_by_orders_of_magnitude_is_exploding() -> None:
    detector = gg.GradientFlowDetector()
    calm = [0.1, 0.2, 0.1]
    profiles = [calm] * 3 + [[g * 400 for g in calm]] * 2 + [[g * 500 for g in calm]]
    events = feed(detector, profiles)
    assert len(events) == 1 and events[0].kind == "exploding" and events[0].step == 250
    assert events[0].details["evidence"] == "rise"
    assert events[0].value == pytest.approx(500.0)
    assert "rose to" in events[0].message and "500x its early level" in events[0].message


def test_a_noisy_but_flat_profile_never_fires() -> None:
    rng = random.Random(0)
    detector = gg.GradientFlowDetector()
    for step in range(0, 20_000, 50):
        grads = [g * 10 ** rng.uniform(-0.8, 0.8) for g in FLAT]
        assert check(detector, view(step, grads)) == []


def test_a_condition_that_breaks_its_streak_does_not_fire() -> None:
    detector = gg.GradientFlowDetector()
    assert feed(detector, [VANISHING, VANISHING, FLAT, VANISHING, VANISHING]) == []


def test_persisting_condition_is_one_event_then_still_present_reminders() -> None:
    detector = gg.GradientFlowDetector(repeat_every=500)
    events = feed(detector, [VANISHING] * 40)  # steps 0..1950
    assert [e.step for e in events] == [100, 600, 1100, 1600]
    assert not events[0].details["reminder"] and events[1].details["reminder"]
    assert events[1].message.startswith("Still present since step 100: ")
    assert detector.active() == {"vanishing": 100}


def test_a_resolved_condition_is_reported_afresh_when_it_returns() -> None:
    detector = gg.GradientFlowDetector()
    profiles = [VANISHING] * 3 + [FLAT] * 3 + [VANISHING] * 3
    events = feed(detector, profiles)
    assert [e.step for e in events] == [100, 400]
    assert not events[1].message.startswith("Still present")
    assert detector.active() == {"vanishing": 400}


def test_zero_and_missing_gradients_are_no_signal() -> None:
    detector = gg.GradientFlowDetector()
    zeros = [0.0, 0.0, 0.0, 0.2, 0.3, 0.5]
    assert feed(detector, [zeros] * 5) == []
    assert detector.last_profile["zero_layers"] == ["a", "b", "c"]
    # A layer without a gradient this step (present=False) says nothing either.
    stale = [1e-9, 0.3, 0.2, 0.4, 0.5, 0.3]
    for step in (300, 350, 400, 450):
        partial = view(step, stale, present=[False, *[True] * 5])
        assert check(detector, partial) == []
    assert len(feed(gg.GradientFlowDetector(), [stale] * 3)) == 1


def test_a_nonfinite_step_leaves_the_streak_untouched() -> None:
    detector = gg.GradientFlowDetector()
    feed(detector, [VANISHING] * 2)
    assert check(detector, view(100, [float("nan"), *VANISHING[1:]])) == []
    assert check(detector, view(110, VANISHING, total=float("inf"))) == []
    (event,) = check(detector, view(150, VANISHING))
    assert event.details["checks"] == 3


def test_too_few_layers_give_no_profile() -> None:
    detector = gg.GradientFlowDetector()
    assert feed(detector, [[1e-9, 1.0]] * 5) == []
    assert len(feed(gg.GradientFlowDetector(min_layers=2), [[1e-9, 1.0]] * 3)) == 1


def test_thresholds_are_configurable() -> None:
    mild = [2e-3, 1e-2, 1e-2, 0.1, 0.2, 0.5]  # 1.85 orders
    assert feed(gg.GradientFlowDetector(), [mild] * 5) == []
    assert len(feed(gg.GradientFlowDetector(orders=1.0), [mild] * 3)) == 1
    assert len(feed(gg.GradientFlowDetector(orders=1.0, patience=1), [mild])) == 1
    big = [400.0] * 4
    assert feed(gg.GradientFlowDetector(grad_to_weight=None), [big] * 5, params=[1.0] * 4) == []
    calm = [0.1, 0.2, 0.1]
    rising = [calm] * 3 + [[g * 500 for g in calm]] * 4
    assert feed(gg.GradientFlowDetector(rise_orders=None), rising) == []
    assert feed(gg.GradientFlowDetector(rise_orders=3.0), rising) == []


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"orders": 0}, r"orders=0 is not valid: expected a number in \(0, inf\]"),
        ({"orders": "2"}, r"orders='2' is not valid: expected a number"),
        ({"orders": float("nan")}, r"orders=nan is not valid: expected a finite number"),
        ({"grad_to_weight": -1.0}, r"grad_to_weight=-1.0 is not valid"),
        ({"rise_orders": 0.0}, r"rise_orders=0.0 is not valid"),
        ({"patience": 0}, r"patience=0 is not valid: expected an integer >= 1"),
        ({"patience": 2.5}, r"patience=2.5 is not valid: expected an integer"),
        ({"min_layers": 1}, r"min_layers=1 is not valid: expected an integer >= 2"),
        ({"baseline_checks": 0}, r"baseline_checks=0 is not valid"),
        ({"repeat_every": True}, r"repeat_every=True is not valid"),
    ],
)
def test_bad_thresholds_are_configuration_errors(kwargs: dict[str, object], pattern: str) -> None:
    with pytest.raises(gg.ConfigurationError, match=pattern):
        gg.GradientFlowDetector(**kwargs)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- which layers count
class Tagger(nn.Module):
    """Embedding -> Linear -> LayerNorm -> Linear -> Linear: three layers with depth."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.proj = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.mid = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.mid(self.norm(self.proj(self.embed(tokens)))))  # type: ignore[no-any-return]


def _bound(
    model: nn.Module, clip: gg.ClipStrategy | None = None
) -> tuple[gg.GradientFlowDetector, list[str]]:
    detector = gg.GradientFlowDetector()
    return detector, bind(detector, model, clip=clip)


def test_embeddings_and_norm_layers_are_not_part_of_the_profile() -> None:
    detector, names = _bound(Tagger())
    assert names == ["embed", "proj", "norm", "mid", "head"]
    assert [n for n in names if detector.is_weight_layer(n)] == ["proj", "mid", "head"]
    # Embedding and LayerNorm gradients 1e-9: an unbound detector reads a 10^8 collapse...
    grads = [1e-9, 0.3, 1e-9, 0.2, 0.4]
    assert feed(gg.GradientFlowDetector(), [grads] * 3, layers=names)
    # ...the bound one knows they have no depth.
    assert feed(detector, [grads] * 5, layers=names) == []


def test_custom_module_matrices_count_unless_they_are_lookup_tables() -> None:
    class Custom(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pos_embedding = nn.Parameter(torch.zeros(4, 8))
            self.weight = nn.Parameter(torch.randn(8, 8))
            self.scale = nn.Parameter(torch.ones(8))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (x + self.pos_embedding) @ self.weight * self.scale

    model = nn.Sequential(Custom(), nn.Sequential(nn.Linear(8, 8)))
    model[0].pos_embedding.requires_grad_(True)
    detector, names = _bound(model)
    assert [detector.is_weight_layer(n) for n in names] == [True, True]

    class Positions(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pos_embedding = nn.Parameter(torch.zeros(4, 8))

    detector, names = _bound(nn.Sequential(Positions(), nn.Linear(8, 8), nn.BatchNorm1d(8)))
    assert [detector.is_weight_layer(n) for n in names] == [False, True, False]


# ---------------------------------------------------------------------------- advice
def _first_event(
    model: nn.Module, profile: list[float], clip: gg.ClipStrategy | None = None, **kw: object
) -> gg.Event:
    detector, names = _bound(model, clip)
    weight_names = [n for n in names if detector.is_weight_layer(n)]
    assert len(weight_names) == len(profile)
    events = feed(detector, [profile] * 3, layers=weight_names, **kw)  # type: ignore[arg-type]
    assert len(events) == 1
    return events[0]


def test_vanishing_in_a_sigmoid_stack_advises_relu_he_and_normalisation() -> None:
    event = _first_event(mlp([8] * 7, nn.Sigmoid), VANISHING)
    assert "Sigmoid activations" in event.advice
    assert "ReLU or GELU" in event.advice and "He (Kaiming)" in event.advice
    assert "BatchNorm/LayerNorm" in event.advice


def test_vanishing_in_a_plain_rnn_advises_lstm_or_gru() -> None:
    class Seq(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 8)
            self.rnn = nn.RNN(8, 8)
            self.b = nn.Linear(8, 8)
            self.c = nn.Linear(8, 2)

    event = _first_event(Seq(), [1e-7, 1e-6, 1e-2, 0.5])
    assert "LSTM or GRU" in event.advice


def test_vanishing_with_small_weights_in_a_relu_net_advises_he_init() -> None:
    model = mlp([16] * 7)
    profile_params = [0.05] * 6  # std*sqrt(fan_in) = 0.05/sqrt(16) ~ 0.0125: tiny
    event = _first_event(model, VANISHING, params=profile_params)
    assert "weights start small" in event.advice and "kaiming_normal_" in event.advice


def test_exploding_with_large_weights_advises_xavier_he_and_clipping() -> None:
    model = mlp([16] * 5)
    params = [4.0 * math.sqrt(16)] * 4  # std*sqrt(fan_in) = 4
    event = _first_event(model, [3000.0, 4000.0, 2500.0, 2000.0], params=params)
    assert "std x sqrt(fan_in) = 4" in event.advice and "Xavier/He" in event.advice
    assert "clip=gg.AutoClip()" in event.advice


def test_advice_knows_when_clipping_is_already_on() -> None:
    model = mlp([16] * 5)
    params = [4.0 * math.sqrt(16)] * 4
    event = _first_event(model, [3000.0, 4000.0, 2500.0, 2000.0], gg.NormClip(1.0), params=params)
    assert event.advice.startswith("clipping is already on")
    assert "clip=gg.AutoClip()" not in event.advice


# ---------------------------------------------------------------------------- state
def test_state_round_trips_through_a_weights_only_checkpoint() -> None:
    profiles = [FLAT] * 3 + [VANISHING] * 2 + [VANISHING] * 25
    whole = gg.GradientFlowDetector(repeat_every=500)
    expected = feed(whole, profiles)

    first = gg.GradientFlowDetector(repeat_every=500)
    got = [e for i, p in enumerate(profiles[:5]) for e in check(first, view(i * 50, p))]
    buffer = io.BytesIO()
    # As the guard saves it: the detector's state and the debouncer's episodes.
    torch.save(
        {"detector": first.state_dict(), "debouncer": checker(first).debouncer.state_dict()}, buffer
    )
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    second = gg.GradientFlowDetector(repeat_every=500)
    second.load_state_dict(saved["detector"])
    checker(second).debouncer.load_state_dict(saved["debouncer"])
    got += [e for i, p in enumerate(profiles[5:], start=5) for e in check(second, view(i * 50, p))]
    assert [(e.step, e.message) for e in got] == [(e.step, e.message) for e in expected]
    assert [e.step for e in got] == [250, 750, 1250]


# ---------------------------------------------------------------------------- in a real guard
def _train(model: nn.Module, guard_kwargs: dict[str, object], steps: int) -> gg.GradGuard:
    x, y = digits()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gg.attach(model, opt, activations=False, **guard_kwargs)
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(
            model(x[step * 32 : step * 32 + 32]), y[step * 32 : step * 32 + 32]
        ).backward()
        opt.step()
    return guard


def test_the_default_guard_runs_a_gradient_flow_detector() -> None:
    assert "GradientFlowDetector" in gg.__all__
    assert [type(d).__name__ for d in gg.GradGuard().detectors] == [
        "GradientFlowDetector",
        "SymmetryDetector",
        "LearningRateDetector",
        "ClippedElsewhereDetector",
        "LossSpikeDetector",
        "TrendDetector",
        "UpdateSpikeDetector",
        "StabilityScore",
        "NonfiniteForensics",
    ]
    torch.manual_seed(0)
    with pytest.warns(gg.GradGuardWarning, match="Vanishing gradients"):
        guard = _train(mlp([64] + [32] * 8 + [10], nn.Sigmoid), {"log_every_n_steps": 2}, 6)
    (event,) = guard.events
    assert event.kind == "vanishing" and event.step == 4
    assert event.layers[0] in ("0", "2")


def test_a_detector_passed_in_replaces_the_default() -> None:
    torch.manual_seed(0)
    model = mlp([64] + [32] * 8 + [10], nn.Sigmoid)
    strict = gg.GradientFlowDetector(orders=20.0)
    guard = _train(model, {"log_every_n_steps": 1, "detectors": [strict]}, 5)
    assert guard.detectors == [strict] and list(guard.events) == []
    assert strict.last_profile["orders"] > 4  # it measured the collapse, below its threshold


def test_depth_comes_from_backward_order_not_registration_order() -> None:
    class Reversed(nn.Module):
        """Registers the output layer first; the forward runs l0 -> l1 -> ... -> out."""

        def __init__(self) -> None:
            super().__init__()
            self.out = nn.Linear(32, 10)
            self.hidden = nn.ModuleList(nn.Linear(32, 32) for _ in range(7))
            self.l0 = nn.Linear(64, 32)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.sigmoid(self.l0(x))
            for layer in self.hidden:
                h = torch.sigmoid(layer(h))
            return self.out(h)  # type: ignore[no-any-return]

    torch.manual_seed(0)
    with pytest.warns(gg.GradGuardWarning, match="Vanishing"):
        guard = _train(Reversed(), {"log_every_n_steps": 1}, 4)
    assert guard.layers[0] == "l0" and guard.layers[-1] == "out"
    assert guard.events[0].layers[0] in ("l0", "hidden.0")


def test_the_detector_adds_no_sync_to_a_logging_step() -> None:
    def syncs(detectors: list[gg.GradientFlowDetector] | None) -> int:
        torch.manual_seed(0)
        model = mlp([8, 16, 16, 16, 4])
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        x = torch.randn(16, 8)
        guard = gg.attach(model, opt, activations=False, log_every_n_steps=1, detectors=detectors)
        for _ in range(3):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
        with count_syncs() as counter:
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
        guard.detach()
        return counter.count

    assert syncs(None) == syncs([])
