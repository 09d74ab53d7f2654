"""ClippedElsewhereDetector: a user's clip before optimizer.step() is noticed once, with the
fix; gradguard's own clip, healthy runs and a model that stopped moving stay silent."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import gradguard as gg


def train(
    steps: int,
    *,
    user_clip: float | None = None,
    loss_scale: float = 30.0,
    lr: float = 1e-2,
    same_batch: bool = False,
    state: dict[str, object] | None = None,
    **guard_options: object,
) -> gg.GradGuard:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    guard = gg.GradGuard(activations=False, warn=False, **guard_options)  # type: ignore[arg-type]
    if state is not None:
        guard.load_state_dict(state)
    guard.attach(model, optimizer)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 16, generator=gen), torch.randn(16, 4, generator=gen)
    for _ in range(steps):
        if not same_batch:
            x, y = torch.randn(16, 16, generator=gen), torch.randn(16, 4, generator=gen)
        optimizer.zero_grad()
        (nn.functional.mse_loss(model(x), y) * loss_scale).backward()
        if user_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), user_clip)
        optimizer.step()
    guard.detach()
    return guard


def kinds(guard: gg.GradGuard) -> list[str]:
    return [event.kind for event in guard.events]


def test_a_users_clip_before_the_step_is_reported_once_with_the_fix() -> None:
    guard = train(100, user_clip=1.0)
    (event,) = guard.events
    assert event.kind == "clipped_elsewhere" and event.step == 7
    assert "sat at 1.0 on 8 of the last 8 steps and never went above it" in event.message
    assert "clip_grad_norm_(..., 1.0)" in event.message
    assert "clip=gg.NormClip(1.0)" in event.advice


def test_a_clip_that_binds_only_sometimes_is_noticed() -> None:
    guard = train(300, user_clip=0.6, loss_scale=1.0, lr=1e-3)
    assert kinds(guard) == ["clipped_elsewhere"]
    assert guard.events[0].details["pinned_steps"] == 8


def test_double_clipping_advice_names_gradguards_clip() -> None:
    guard = train(50, user_clip=1.0, clip=gg.ZClip())
    (event,) = guard.events
    assert "gradguard clips too (ZClip), so the gradients are clipped twice" in event.advice


@pytest.mark.parametrize(
    "options",
    [{}, {"clip": gg.NormClip(1.0)}, {"clip": gg.NormClip(1.0, per_layer=True)}, {"clip": 0.5}],
)
def test_silent_without_a_users_clip(options: dict[str, object]) -> None:
    # gradguard measures before its own clip: its norms are never pinned.
    assert kinds(train(200, **options)) == []


def test_silent_when_the_model_stops_moving() -> None:
    # The same batch on weights that never change repeats its norm exactly, but the
    # gradient's direction does not change either: not a clip.
    assert kinds(train(50, lr=0.0, same_batch=True)) == []


def test_the_report_survives_a_resume() -> None:
    first = train(30, user_clip=1.0)
    assert kinds(first) == ["clipped_elsewhere"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resumed = train(30, user_clip=1.0, state=first.state_dict())
    assert kinds(resumed) == []  # said once per run, across the resume


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"window": 0}, r"window=0 is not valid"),
        ({"min_pinned": 1}, r"min_pinned=1 is not valid: expected an integer in \[2, window=64\]"),
        ({"window": 4, "min_pinned": 8}, r"min_pinned=8 is not valid"),
        ({"rtol": 0.5}, r"rtol=0\.5 is not valid"),
    ],
)
def test_bad_arguments_are_refused(arguments: dict[str, object], message: str) -> None:
    with pytest.raises(gg.ConfigurationError, match=message):
        gg.ClippedElsewhereDetector(**arguments)  # type: ignore[arg-type]


def test_it_is_a_default_detector() -> None:
    assert any(isinstance(d, gg.ClippedElsewhereDetector) for d in gg.default_detectors())
