"""The loss-spike detector and the stability score, fed through ``guard.observe_loss``."""

from __future__ import annotations

import io
import math
import statistics
import warnings

import pytest
import torch
from torch import nn

import gradguard as gg
from gradguard.detect.score import RollingMoments
from tests.models import digits, mlp
from tests.replay import replay


def _train(
    steps: int, *, corrupt_from: int | None = None, feed_loss: bool = True, **guard_kwargs: object
) -> tuple[gg.GradGuard, gg.MemorySink, list[float]]:
    """A He-init ReLU MLP on digits with Adam; from ``corrupt_from`` on the labels of every
    batch are shuffled, a regime change the loss shows at once."""
    torch.manual_seed(0)
    model = mlp([64, 64, 10])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sink = gg.MemorySink()
    x, y = digits()
    gen = torch.Generator().manual_seed(0)
    losses = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gg.GradGuardWarning)
        guard = gg.attach(model, opt, sinks=[sink], log_every_n_steps=10, **guard_kwargs)  # type: ignore[arg-type]
        for step in range(steps):
            idx = torch.randint(0, x.shape[0], (64,), generator=gen)
            labels = y[idx]
            if corrupt_from is not None and step >= corrupt_from:
                labels = (labels + 5) % 10  # every label wrong, confidently
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(x[idx]), labels)
            if feed_loss:
                guard.observe_loss(loss)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    return guard, sink, losses


def test_a_loss_that_jumps_is_reported_at_the_step_it_jumps() -> None:
    guard, sink, losses = _train(150, corrupt_from=120)
    spikes = [e for e in guard.events if e.kind == "loss_spike"]
    assert spikes, [e.kind for e in guard.events]
    event = spikes[0]
    assert event.step == 120  # no lag: the packet brings the loss of the step itself
    assert event.value > 6.0
    assert f"{losses[120]:.3g}"[:3] in event.message and "median" in event.message
    assert "learning rate" in event.advice and "ZClip" in event.advice
    # One episode, not one Event per step of the corrupt stretch.
    assert len(spikes) == 1
    assert "loss_spike" in guard.report()
    zscores = dict(sink.scalars["gradguard/stability/loss_zscore"])
    assert zscores[120] == pytest.approx(event.value)


def test_a_healthy_run_is_silent_and_without_a_loss_nothing_is_scored() -> None:
    guard, sink, _ = _train(300)
    assert not guard.events
    assert max(v for _, v in sink.scalars["gradguard/stability/loss_zscore"]) < 4.0
    guard, sink, _ = _train(150, corrupt_from=120, feed_loss=False)
    assert not [e for e in guard.events if e.kind == "loss_spike"]
    assert "gradguard/stability/loss_zscore" not in sink.scalars


def test_advice_never_recommends_the_clip_already_on() -> None:
    guard, _, _ = _train(150, corrupt_from=120, clip=gg.ZClip())
    event = next(e for e in guard.events if e.kind == "loss_spike")
    assert "ZClip is on" in event.advice and "clip=gg.ZClip()" not in event.advice
    assert "the gradient norm was" in event.message


def test_the_robust_score_by_hand() -> None:
    losses = [4.0, 3.9, 4.1, 3.8, 4.0]
    logs = [math.log(v) for v in losses]
    center = statistics.median(logs)
    spread = max(1.4826 * statistics.median(abs(v - center) for v in logs), 0.07)
    fresh = gg.LossSpikeDetector(window=8, warmup_steps=5)
    for loss in losses:  # the warm-up: not scored
        assert not fresh.score(loss).spike
    result = fresh.score(9.0)
    assert result.zscore == pytest.approx((math.log(9.0) - center) / spread)
    assert result.spike and not result.early
    assert result.reference == pytest.approx(math.exp(center))


def test_no_blind_warm_up_a_loss_that_doubles_at_once_is_caught() -> None:
    # The stability benchmark at lr 1.0: the loss passes twice its start at step 3.
    detector = gg.LossSpikeDetector()
    verdicts = [detector.score(v) for v in (4.59, 4.08, 5.27, 12.04, 15.5)]
    assert [v.spike for v in verdicts] == [False, False, False, False, True]
    assert verdicts[4].early and verdicts[4].reference == 4.59
    # One hard small batch early on (a 4.9x loss once, seen on a batch of 8) is not a spike.
    noisy = gg.LossSpikeDetector()
    assert not any(noisy.score(v).spike for v in (0.044, 0.061, 0.05, 0.214, 0.07, 0.06))
    # A healthy start that wobbles (even up 40%) is not a spike.
    calm = gg.LossSpikeDetector()
    assert not any(calm.score(v).spike for v in (2.3, 2.5, 3.4, 2.2, 2.0, 1.9))


def test_a_hard_batch_on_a_memorised_set_is_not_a_spike() -> None:
    # Start at 2.3, fall to 0.01; a 0.08 batch is 8x the median but undoes 3% of the
    # progress: noise of a nearly memorised training set, not instability.
    detector = gg.LossSpikeDetector()
    for loss in [2.3, 2.2, 2.25, 2.1, 2.3] + [0.01, 0.012, 0.009] * 11:
        detector.score(loss)
    hard = detector.score(0.08)
    assert hard.zscore > 6.0 and not hard.spike
    assert detector.score(1.5).spike  # undoes two thirds of it: a spike


def test_bad_arguments_are_named() -> None:
    with pytest.raises(gg.ConfigurationError, match="window"):
        gg.LossSpikeDetector(window=2)
    with pytest.raises(gg.ConfigurationError, match="warmup_steps"):
        gg.LossSpikeDetector(window=8, warmup_steps=9)
    with pytest.raises(gg.ConfigurationError, match="threshold"):
        gg.LossSpikeDetector(threshold=0)


def test_state_survives_a_resume() -> None:
    # Through torch.save / torch.load(weights_only=True), as Lightning loads checkpoints.
    guard, _, _ = _train(40)
    buffer = io.BytesIO()
    torch.save(guard.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    fresh = gg.GradGuard()
    fresh.load_state_dict(state)
    model = mlp([64, 64, 10])
    fresh.attach(model, torch.optim.Adam(model.parameters()))
    kinds = (gg.LossSpikeDetector, gg.TrendDetector, gg.UpdateSpikeDetector, gg.StabilityScore)
    for kind in kinds:
        old = next(d for d in guard.detectors if isinstance(d, kind))
        new = next(d for d in fresh.detectors if isinstance(d, kind))
        assert new.state_dict() == old.state_dict(), kind
        assert old.state_dict() != kind().state_dict(), kind  # something was carried
    fresh.detach()


# ---------------------------------------------------------------------------- the score


def test_rolling_moments_match_the_window_exactly() -> None:
    gen = torch.Generator().manual_seed(0)
    values = (torch.randn(1000, generator=gen) * 1e3 + 1e6).tolist()
    moments = RollingMoments(128)
    for value in values:
        moments.push(value)
    window = values[-128:]
    mean = statistics.fmean(window)
    std = statistics.pstdev(window)
    assert moments.exceeds(mean + 6.01 * std, 6.0)
    assert not moments.exceeds(mean + 5.99 * std, 6.0)


def test_spike_score_is_olmo_cores_rule() -> None:
    # OLMo-core's rule, written out: a step spikes when its loss or its norm exceeds the
    # mean + 6 std of the previous 128 values; scored once 128 values are known.
    gen = torch.Generator().manual_seed(1)
    losses = (2.0 + 0.05 * torch.randn(600, generator=gen)).tolist()
    norms = (1.0 + 0.1 * torch.randn(600, generator=gen)).tolist()
    for step in (200, 201, 350, 500):
        losses[step] += 3.0
    norms[420] *= 10.0
    expected = []
    for t in range(128, 600):
        hit = False
        for series in (losses, norms):
            history = series[t - 128 : t]
            mean = statistics.fmean(history)
            hit |= series[t] > mean + 6.0 * statistics.pstdev(history)
        expected.append(hit)
    score = gg.StabilityScore()
    replay([score], losses, norms)
    assert score.total_spikes == sum(expected) == 5
    assert score.scored_steps == len(expected)
    assert score.score == pytest.approx(sum(expected) / len(expected))


def test_spike_score_reaches_the_sinks() -> None:
    _, sink, _ = _train(300, corrupt_from=250)
    keys = [k for k in sink.scalars if k.startswith("gradguard/stability/spike_score")]
    assert sorted(keys) == [
        "gradguard/stability/spike_score",
        "gradguard/stability/spike_score_total",
    ]
    first_step = sink.scalars["gradguard/stability/spike_score"][0][0]
    assert first_step == 130  # logging steps from the 129th value on (128 known before)
    assert sink.scalars["gradguard/stability/spike_score"][-1][1] > 0.0
