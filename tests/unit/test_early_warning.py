"""Early warning: the gradient-spike detector without a blind warm-up (host recurrence and
its device twin agree), steady rises (Mann-Kendall), per-layer update spikes."""

from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch
from torch import nn

import gradguard as gg
from gradguard.detect.trend import MannKendall
from tests.models import digits, mlp
from tests.replay import context, replay
from tests.syncs import count_syncs

# ---------------------------------------------------------------------------- spikes


def _norm_series() -> list[float]:
    gen = torch.Generator().manual_seed(3)
    norms = (1.0 + 0.2 * torch.rand(80, generator=gen)).tolist()
    norms[2] = 30.0  # inside the warm-up: over the 11x limit
    norms[6] = 4.0  # inside the warm-up: under it
    norms[50] = math.nan  # never enters the averages
    norms[60] = math.inf
    norms[75] = 30.0  # after it (and 70 steps after the first): a spike again
    return norms


def test_host_recurrence_and_device_twin_agree_step_by_step() -> None:
    norms = _norm_series()
    host = gg.SpikeDetector()
    host.bind(context())
    device = gg.SpikeDetector()
    device.bind(context(on_spike="skip"))  # on_spike="skip" runs the twin on the device
    assert not host.on_device and device.on_device
    for step, norm in enumerate(norms):
        warm = step >= host.warmup_steps
        z, spike, running = host._update_host(norm, warm)
        out = device.decide(torch.tensor(norm), warm)
        assert out["spike/flag"].item() == spike, step
        assert out["spike/zscore"].item() == pytest.approx(z, rel=1e-5, abs=1e-5), step
        assert out["spike/running"].item() == pytest.approx(running, rel=1e-5), step
    assert host.state_dict() == pytest.approx(device.state_dict(), rel=1e-5)


def test_no_blind_warm_up_only_huge_jumps_count_early() -> None:
    found = replay([gg.SpikeDetector()], [None] * 80, _norm_series())
    assert [step for step, _ in found] == [2, 75]
    assert "30" in found[0][1].message and found[0][1].value > 6.0
    # After the warm-up the floor is min_std: a 3x jump on a steady norm counts.
    calm = [1.0 + 0.01 * (t % 2) for t in range(30)] + [3.0]
    assert [step for step, _ in replay([gg.SpikeDetector()], [None] * 31, calm)] == [30]
    assert replay([gg.SpikeDetector(warmup_steps=40)], [None] * 31, calm) == []


def test_spike_advice_says_what_the_clip_did() -> None:
    detector = gg.SpikeDetector()
    bound = context(clip=gg.ZClip())
    detector.bind(bound)
    for step, norm in enumerate([1.0] * 30 + [20.0]):
        stats = gg.StepStats(
            step, ("0",), norm, (norm,), (True,), False, False, {"clip/coef": 0.05}
        )
        found = detector.on_step(stats)
    (finding,) = found
    assert "ZClip clipped it to 1" in finding.message
    assert "clip=gg.ZClip()" not in finding.advice


# ---------------------------------------------------------------------------- trends


def test_mann_kendall_incremental_equals_the_definition() -> None:
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(100, generator=gen).tolist()
    series = MannKendall(24)
    for end in range(1, len(values) + 1):
        series.push(values[end - 1])
        window = values[max(0, end - 24) : end]
        expected = sum((b > a) - (b < a) for a, b in itertools.combinations(window, 2))
        assert series.s == expected


def test_a_steady_climb_is_a_divergence_and_a_fall_is_not() -> None:
    # A loss that climbs 2% a step with noise: never a jump, always a trend.
    gen = torch.Generator().manual_seed(1)
    noise = (0.05 * torch.randn(80, generator=gen)).tolist()
    climbing = [3.0 * 1.02**t * math.exp(n) for t, n in enumerate(noise)]
    falling = [3.0 * 0.99**t * math.exp(n) for t, n in enumerate(noise)]
    norms = [1.0] * 80
    found = replay([gg.TrendDetector(), gg.LossSpikeDetector()], climbing, norms)
    kinds = {finding.kind for _, finding in found}
    assert kinds == {"divergence"}  # no single step jumps
    step, finding = found[0]
    assert 23 <= step <= 40
    assert "training loss rose" in finding.message and "learning rate" in finding.advice
    assert replay([gg.TrendDetector()], falling, norms) == []


def test_a_rising_gradient_norm_counts_only_while_the_loss_does_not_fall() -> None:
    rising = [1.1**t for t in range(60)]
    flat_loss = [2.0 + 0.01 * (t % 3) for t in range(60)]
    falling_loss = [2.0 * 0.97**t for t in range(60)]
    found = replay([gg.TrendDetector()], flat_loss, rising)
    assert found and "gradient norm rose" in found[0][1].message
    assert replay([gg.TrendDetector()], falling_loss, rising) == []
    # Without a loss, the norm's rise alone (5x over the window) counts.
    assert replay([gg.TrendDetector()], [None] * 60, rising)


def test_near_zero_loss_and_a_collapsed_norm_may_wander() -> None:
    # A memorised batch: the loss fell from 2.3 to ~1e-6 and the norm from 1 to ~1e-4;
    # there both double or grow 20x over a window, steadily, at no risk to the run.
    start = 24
    losses = [2.3] * start + [1e-6 * 1.05**t for t in range(60)]
    norms = [1.0] * start + [1e-4 * 1.06**t for t in range(60)]
    assert replay([gg.TrendDetector()], losses, norms) == []
    # The same climbs from where training started are divergences.
    assert replay([gg.TrendDetector()], [2.3 * 1.05**t for t in range(60)], [1.0] * 60)


def test_trend_detector_rejects_bad_arguments() -> None:
    with pytest.raises(gg.ConfigurationError, match="window"):
        gg.TrendDetector(window=4)
    with pytest.raises(gg.ConfigurationError, match="loss_rise"):
        gg.TrendDetector(loss_rise=1.0)


# ---------------------------------------------------------------------------- updates


def _lr_bump_run(detector: gg.UpdateSpikeDetector) -> tuple[gg.GradGuard, gg.MemorySink]:
    """Adam on digits; the learning rate is 10x for step 100 only."""
    x, y = digits()
    torch.manual_seed(0)
    model = mlp([64, 64, 10])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sink = gg.MemorySink()
    gen = torch.Generator().manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gg.GradGuardWarning)
        guard = gg.attach(model, opt, detectors=[detector], sinks=[sink], log_every_n_steps=5)
        for step in range(120):
            idx = torch.randint(0, x.shape[0], (64,), generator=gen)
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            for group in opt.param_groups:
                group["lr"] = 1e-2 if step == 100 else 1e-3
            opt.step()
        guard.detach()
    return guard, sink


@pytest.mark.parametrize("every", [None, 1])
def test_an_update_ten_times_too_large_is_an_update_spike(every: int | None) -> None:
    guard, sink = _lr_bump_run(gg.UpdateSpikeDetector(every_n_steps=every))
    (event,) = [e for e in guard.events if e.kind == "update_spike"]
    # Measured on the logging step 100 itself, or every step (reported with the next packet).
    assert event.step == (100 if every is None else 101)
    assert event.details["step"] == 100
    assert set(event.layers) == {"0", "2"} and event.value > 6.0
    assert "of their norm" in event.message and "eps" in event.advice
    if every == 1:
        zscores = dict(sink.scalars["gradguard/stability/update_zscore"])
        assert zscores[105] == pytest.approx(event.value)
        assert max(v for s, v in zscores.items() if s < 100) < 4.0


class _Recording(gg.UpdateSpikeDetector):
    """Keeps every measured row of ratios, by step."""

    def __init__(self) -> None:
        super().__init__(every_n_steps=1)
        self.rows: dict[int, list[float | None]] = {}

    def _score(self, step, layers, ratios):  # type: ignore[no-untyped-def]
        self.rows[step] = list(ratios)
        return super()._score(step, layers, ratios)


def test_per_step_update_ratios_equal_the_logged_ones() -> None:
    detector = _Recording()
    _, sink = _lr_bump_run(detector)
    ratios = detector.rows
    for layer, index in (("0", 0), ("2", 1)):
        logged = dict(sink.scalars[f"gradguard/update_ratio/{layer}"])
        for step in (5, 50, 100):
            assert ratios[step][index] == pytest.approx(logged[step], rel=1e-5)


def test_update_detector_rejects_bad_arguments() -> None:
    with pytest.raises(gg.ConfigurationError, match="every_n_steps"):
        gg.UpdateSpikeDetector(every_n_steps=0)
    with pytest.raises(gg.ConfigurationError, match="alpha"):
        gg.UpdateSpikeDetector(alpha=1.0)


# ---------------------------------------------------------------------------- no sync


def test_stability_detectors_add_no_sync_with_the_loss_fed() -> None:
    """The loss travels in the packet, the detectors read host numbers; the per-step update
    ratios reach the host like the packet: a non-logging step still adds no sync."""
    torch.manual_seed(0)
    model = mlp([8, 32, 32, 4])
    opt = torch.optim.Adam(model.parameters())
    x = torch.randn(16, 8)

    def step(guard: gg.GradGuard | None) -> None:
        opt.zero_grad(set_to_none=True)
        loss = model(x).square().mean()
        if guard is not None:
            guard.observe_loss(loss)
        loss.backward()
        opt.step()

    for _ in range(2):
        step(None)
    with count_syncs() as bare:
        step(None)
    detectors = [
        *(d for d in gg.default_detectors() if not isinstance(d, gg.UpdateSpikeDetector)),
        gg.UpdateSpikeDetector(every_n_steps=1),
    ]
    guard = gg.attach(model, opt, detectors=detectors, log_every_n_steps=1000)
    for _ in range(40):  # past every warm-up: every detector scores
        step(guard)
    with count_syncs() as guarded:
        step(guard)
    guard.detach()
    assert guarded.count - bare.count == 0
