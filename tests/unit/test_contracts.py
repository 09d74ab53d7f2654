"""The contract every clip strategy and every sink keeps, run on each one gradguard ships.

The lists come from ``tests/strategies.py``, which finds them in the public API: a new
strategy or sink is tested here the day it is exported (or this file says what to add).
"""

from __future__ import annotations

import copy
import io
import logging
import math
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import gradguard as gg
from tests.models import mlp
from tests.strategies import clip_classes, sample, sink_classes
from tests.syncs import count_syncs

STEPS, CHECKPOINT, SPIKE = 12, 6, 9
# Strategies whose scale comes from a norm of the whole gradient (or of a layer).
NORM_BASED = {"NormClip", "AutoClip", "ZClip"}

# One bad argument per strategy: the error names the argument and what is allowed.
BAD_ARGS: dict[str, tuple[dict[str, Any], str]] = {
    "NormClip": ({"max_norm": 0.0}, r"max_norm=0\.0 is not valid: expected a number in \(0"),
    "ValueClip": ({"value": -1.0}, r"value=-1\.0 is not valid"),
    "AutoClip": ({"percentile": 101.0}, r"percentile=101\.0 is not valid: expected a number in"),
    "ZClip": ({"mode": "median"}, r"mode='median' is not valid: expected one of 'zscore'"),
    "AGC": ({"exclude": 5}, r"exclude=5 is not valid: expected layer names"),
}


def _batches() -> list[tuple[torch.Tensor, torch.Tensor, float]]:
    gen = torch.Generator().manual_seed(0)
    return [
        (
            torch.randn(16, 8, generator=gen),
            torch.randn(16, 4, generator=gen),
            50.0 if i == SPIKE else 1.0,
        )
        for i in range(STEPS)
    ]


def _fresh(
    cls: type[gg.ClipStrategy],
) -> tuple[nn.Module, torch.optim.Optimizer, gg.GradGuard, gg.MemorySink]:
    torch.manual_seed(0)
    model = mlp([8, 16, 16, 4])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sink = gg.MemorySink()
    # on_spike="ignore": the batches below scale the loss on purpose (not under test here).
    guard = gg.GradGuard(
        clip=sample(cls), sinks=[sink], log_every_n_steps=1, activations=False, on_spike="ignore"
    )
    return model, opt, guard, sink


def _train(model: nn.Module, opt: torch.optim.Optimizer, batches: list[Any]) -> None:
    for x, y, scale in batches:
        opt.zero_grad(set_to_none=True)
        (nn.functional.mse_loss(model(x), y) * scale).backward()
        opt.step()


CLIPS = [pytest.param(cls, id=cls.__name__) for cls in clip_classes()]


@pytest.mark.parametrize("cls", CLIPS)
def test_clip_state_round_trip_continues_bit_identically(
    cls: type[gg.ClipStrategy], bookkeeping: str
) -> None:
    data = _batches()
    model, opt, guard, straight = _fresh(cls)
    guard.attach(model, opt)
    _train(model, opt, data)
    expected = [p.detach().clone() for p in model.parameters()]

    model, opt, guard, first = _fresh(cls)
    guard.attach(model, opt)
    _train(model, opt, data[:CHECKPOINT])
    buffer = io.BytesIO()
    torch.save({"m": model.state_dict(), "o": opt.state_dict(), "g": guard.state_dict()}, buffer)
    guard.detach()
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)  # what Lightning does

    model, opt, guard, second = _fresh(cls)
    model.load_state_dict(saved["m"])
    opt.load_state_dict(saved["o"])
    guard.load_state_dict(saved["g"])
    guard.attach(model, opt)
    _train(model, opt, data[CHECKPOINT:])
    for got, want in zip(model.parameters(), expected):
        assert torch.equal(got, want)
    coefs = [
        v for _, v in first.scalars["gradguard/clip/coef"] + second.scalars["gradguard/clip/coef"]
    ]
    assert coefs == [v for _, v in straight.scalars["gradguard/clip/coef"]]


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("cls", CLIPS)
def test_clip_adds_no_host_sync(cls: type[gg.ClipStrategy], fused: bool, bookkeeping: str) -> None:
    torch.manual_seed(0)
    model = mlp([8, 16, 4])
    opt = torch.optim.Adam(model.parameters(), fused=fused)
    x = torch.randn(16, 8)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        opt.step()

    for _ in range(2):
        step()
    with count_syncs() as bare:
        step()
    guard = gg.attach(model, opt, clip=sample(cls), log_every_n_steps=1000, activations=False)
    for _ in range(3):  # step 0 logs; the others do not
        step()
    with count_syncs() as guarded:
        step()
    guard.detach()
    assert guarded.count - bare.count == 0


@pytest.mark.parametrize("cls", CLIPS)
def test_clip_never_increases_the_norm_and_leaves_a_nan_step_alone(
    cls: type[gg.ClipStrategy], bookkeeping: str
) -> None:
    model, opt, guard, sink = _fresh(cls)
    guard.attach(model, opt)
    with pytest.warns(gg.GradGuardWarning, match="NaN/Inf"):
        for step, (x, y, scale) in enumerate(_batches()):
            opt.zero_grad(set_to_none=True)
            (nn.functional.mse_loss(model(x), y) * scale).backward()
            if step == 4:
                model[0].weight.grad[0, 0] = float("nan")
            before = torch.linalg.vector_norm(
                torch.stack([p.grad.norm() for p in model.parameters()])
            )
            grads_before = [p.grad.clone() for p in model.parameters()]
            guard.before_step()
            after = torch.linalg.vector_norm(
                torch.stack([p.grad.norm() for p in model.parameters()])
            )
            if step == 4:
                # A NaN is the policy's business: the clip never spreads it to finite
                # entries, and a rule built on the total norm (which is NaN) scales nothing.
                for got, want in zip(model.parameters(), grads_before):
                    assert torch.equal(torch.isfinite(got.grad), torch.isfinite(want))
                    if cls.__name__ in NORM_BASED:
                        finite = torch.isfinite(want)
                        assert torch.equal(got.grad[finite], want[finite])
            else:
                assert after <= before * (1 + 1e-6)
            guard.after_step()
    coefs = [v for _, v in sink.scalars["gradguard/clip/coef"]]
    assert all(0.0 < c <= 1.0 for c in coefs)
    guard.detach()


@pytest.mark.parametrize("cls", CLIPS)
def test_clip_serves_one_guard_at_a_time(cls: type[gg.ClipStrategy]) -> None:
    strategy = sample(cls)
    generator, discriminator = mlp([4, 8, 4]), mlp([4, 8, 1])
    opt_g = torch.optim.SGD(generator.parameters(), lr=0.1)
    opt_d = torch.optim.SGD(discriminator.parameters(), lr=0.1)
    first = gg.attach(generator, opt_g, clip=strategy, activations=False)
    with pytest.raises(gg.ConfigurationError, match="already serves another GradGuard"):
        gg.attach(discriminator, opt_d, clip=strategy, activations=False)
    # Nothing was left behind by the refused attach: the discriminator trains unwatched.
    assert not opt_d._optimizer_step_pre_hooks
    # A copy of the strategy is free; so is the strategy once its guard let go.
    gg.attach(discriminator, opt_d, clip=copy.deepcopy(strategy), activations=False).detach()
    first.detach()
    gg.attach(discriminator, opt_d, clip=strategy, activations=False).detach()


def test_every_strategy_has_a_bad_argument_case() -> None:
    assert sorted(BAD_ARGS) == sorted(cls.__name__ for cls in clip_classes())


@pytest.mark.parametrize("cls", CLIPS)
def test_clip_bad_arguments_are_refused_at_construction(cls: type[gg.ClipStrategy]) -> None:
    from tests.strategies import REQUIRED_ARGS

    kwargs, pattern = BAD_ARGS[cls.__name__]
    with pytest.raises(gg.ConfigurationError, match=pattern):
        cls(**{**REQUIRED_ARGS.get(cls.__name__, {}), **kwargs})
    assert cls.__name__ in repr(sample(cls))


# ---------------------------------------------------------------------------- sinks
# Sinks that hold nothing outside the process may go on working after close(); the others
# must say they are closed, never drop writes in silence.
IN_PROCESS = {"MemorySink", "LoggingSink"}


@pytest.fixture(scope="module")
def mlflow_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, str]:
    """A real local MLflow store (SQLite; creating its tables takes a second) and a run."""
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("mlflow")
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.create_experiment("contract", artifact_location=str(root / "artifacts"))
    return client, experiment


@pytest.fixture
def wandb_run(tmp_path: Path) -> Iterator[Any]:
    import wandb

    run = wandb.init(mode="offline", dir=str(tmp_path), project="gradguard-contract")
    yield run
    run.finish()


def _make_sink(cls: type[Any], tmp_path: Path, request: pytest.FixtureRequest) -> Any:
    name = cls.__name__
    if name == "TensorBoardSink":
        return cls(str(tmp_path / "tb"))
    if name == "WandbSink":
        return cls(run=request.getfixturevalue("wandb_run"))
    if name == "LoggingSink":
        return cls(logging.getLogger("gradguard.contract"))
    if name == "MemorySink":
        return cls()
    if name == "MlflowSink":
        client, experiment = request.getfixturevalue("mlflow_run")
        return cls(client.create_run(experiment).info.run_id, client=client)
    raise AssertionError(f"add a way to build {name} to tests/unit/test_contracts.py")


SINKS = [pytest.param(cls, id=cls.__name__) for cls in sink_classes()]


@pytest.mark.parametrize("cls", SINKS)
def test_sink_takes_a_nan_run_and_closes_twice(
    cls: type[Any], tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    sink = _make_sink(cls, tmp_path, request)
    model = mlp([8, 16, 4])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gg.attach(
        model, opt, sinks=[sink], log_every_n_steps=4, on_nonfinite="skip", warn=False
    )
    x = torch.randn(8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", gg.GradGuardWarning)  # a sink that raises would warn
        for step in range(10):
            opt.zero_grad(set_to_none=True)
            model(x).square().mean().backward()
            if step == 5:
                model[0].weight.grad[0, 0] = math.inf
            opt.step()
        guard.close()
        sink.close()  # twice is harmless
    assert guard.skipped_steps == 1 and [e.kind for e in guard.events] == ["nonfinite"]


@pytest.mark.parametrize("cls", SINKS)
def test_a_closed_sink_never_drops_writes_in_silence(
    cls: type[Any], tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    sink = _make_sink(cls, tmp_path, request)
    sink.close()
    event = gg.Event("nonfinite", 3, ("0",), math.nan, "error", "NaN.", "skip.")
    if cls.__name__ in IN_PROCESS:
        sink.log_event(event)  # still works
        return
    with pytest.raises(gg.GradGuardError, match="closed"):
        sink.log_scalars({"gradguard/grad_norm_total": 1.0}, 3)
    with pytest.raises(gg.GradGuardError, match="closed"):
        sink.log_event(event)


def test_the_lists_above_cover_what_gradguard_ships() -> None:
    names = {cls.__name__ for cls in sink_classes()}
    assert {"MemorySink", "LoggingSink", "TensorBoardSink", "WandbSink", "MlflowSink"} <= names
    assert {cls.__name__ for cls in clip_classes()} == {
        "NormClip",
        "ValueClip",
        "AutoClip",
        "ZClip",
        "AGC",
    }


HOST_CAPABLE = [
    pytest.param(cls, id=cls.__name__) for cls in clip_classes() if cls.host_bookkeeping
]


@pytest.mark.parametrize("cls", HOST_CAPABLE)
def test_host_and_device_bookkeeping_give_the_same_numbers(
    cls: type[gg.ClipStrategy], monkeypatch: pytest.MonkeyPatch
) -> None:
    """CPU devices keep a strategy's bookkeeping on the host, accelerators on the device:
    the thresholds, scales and weights must not depend on which (float32 rounding aside)."""
    import gradguard.clip.base as clip_base

    runs = {}
    for on_host in (True, False):
        monkeypatch.setattr(clip_base, "HOST_BOOKKEEPING_ON_CPU", on_host)
        model, opt, guard, sink = _fresh(cls)
        guard.attach(model, opt)
        _train(model, opt, _batches() * 3)  # ZClip's warm-up (25) ends at step 25
        guard.detach()
        runs[on_host] = (sink, [p.detach().clone() for p in model.parameters()])
    (host, host_params), (device, device_params) = runs[True], runs[False]
    assert host.scalars.keys() == device.scalars.keys()
    for key in ("gradguard/clip/coef", "gradguard/clip/threshold", "gradguard/clip/clipped_steps"):
        if key in device.scalars:
            assert [s for s, _ in host.scalars[key]] == [s for s, _ in device.scalars[key]]
            assert [v for _, v in host.scalars[key]] == pytest.approx(
                [v for _, v in device.scalars[key]], rel=1e-5
            )
    for a, b in zip(host_params, device_params):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
