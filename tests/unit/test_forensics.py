"""Forward forensics: after a NaN/Inf gradient, the next training forward pass is traced and
the call and module that made the first non-finite value are named.

Each model below makes its NaN/Inf in a known place, from step ``BAD_FROM`` on; the guard
skips those steps (``on_nonfinite="skip"``) so the weights stay finite and the traced pass
makes the NaN again where it was made first.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
from torch import nn

import gradguard as gg
from gradguard.detect.forensics import NonfiniteForensics

BAD_FROM = 3
X = torch.randn(16, 4, generator=torch.Generator().manual_seed(0))


class LogOfNegative(nn.Module):
    """A parameterless module: log of its input, which a Linear makes negative."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.log(h)


class ExpOverflow(nn.Module):
    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return (h * 100.0).exp()  # a Tensor method call; Inf for h > 0.89


class ZeroOverZero(nn.Module):
    def forward(self, h: torch.Tensor) -> torch.Tensor:
        centred = h - h  # exactly 0
        return centred / centred.abs().sum(-1, keepdim=True)  # 0/0


class Net(nn.Module):
    """``inp`` -> ``body`` (the module under test, or a safe stand-in) -> ``head``."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.body = body
        self.head = nn.Linear(8, 1)
        self.bad = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        h = self.body(h) if self.bad else torch.tanh(h)
        return self.head(h)


class InlineSqrt(nn.Module):
    """The NaN is made by a functional call inside the root's own forward."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.head = nn.Linear(8, 1)
        self.bad = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        return self.head(torch.sqrt(h) if self.bad else h)


def _train(
    model: nn.Module,
    steps: int = 8,
    *,
    loss_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    **guard_kwargs: object,
) -> tuple[gg.GradGuard, NonfiniteForensics]:
    torch.manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    forensics = NonfiniteForensics()
    guard_kwargs.setdefault("on_nonfinite", "skip")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gg.GradGuardWarning)
        guard = gg.attach(model, opt, detectors=[forensics], **guard_kwargs)  # type: ignore[arg-type]
        for step in range(steps):
            model.bad = step >= BAD_FROM  # type: ignore[assignment]
            opt.zero_grad(set_to_none=True)
            out = model(X)
            loss = (loss_fn or (lambda o: o.square().mean()))(out)
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
        guard.detach()
    return guard, forensics


def _source(guard: gg.GradGuard) -> gg.Event:
    found = [e for e in guard.events if e.kind == "nonfinite_source"]
    assert len(found) == 1, [(e.kind, e.message) for e in guard.events]
    return found[0]


def test_log_of_a_negative_number_is_traced_to_its_module() -> None:
    guard, _ = _train(Net(LogOfNegative()))
    event = _source(guard)
    assert event.layers == ("body",)
    assert event.step == BAD_FROM + 1  # the pass after the first NaN step
    assert f"step {BAD_FROM}" in event.message and "log()" in event.message
    assert "NaN" in event.message and "from finite inputs" in event.message
    assert "clamp" in event.advice and "log" in event.advice
    assert event.severity == "warning"  # the NaN/Inf Event itself is the error
    # The input range is stated, and its minimum is negative (that is the cause).
    low = float(event.advice.split("the input reached ")[1].split(")")[0])
    assert low < 0


def test_exp_overflow_is_called_an_overflow() -> None:
    event = _source(_train(Net(ExpOverflow()))[0])
    assert event.layers == ("body",)
    assert "exp()" in event.message and "Inf" in event.message
    assert "overflow" in event.advice and "88.7" in event.advice


def test_zero_over_zero_names_the_division() -> None:
    event = _source(_train(Net(ZeroOverZero()))[0])
    assert event.layers == ("body",)
    assert "division (/)" in event.message
    assert "division by zero" in event.advice and "epsilon" in event.advice


def test_a_functional_call_in_the_root_forward_is_found() -> None:
    event = _source(_train(InlineSqrt())[0])
    assert event.layers == ()  # made by the model's own forward, not a submodule
    assert "sqrt()" in event.message and "the model's own forward" in event.message
    assert "square root of a negative" in event.advice


def test_with_warn_the_report_says_the_weights_are_gone() -> None:
    guard, _ = _train(Net(LogOfNegative()), on_nonfinite="warn")
    event = _source(guard)
    assert set(event.layers) == {"inp", "head"}
    assert "weights" in event.message and "already NaN/Inf" in event.message
    assert "on_nonfinite='skip'" in event.advice


def test_a_nan_made_in_the_backward_pass_is_placed_after_the_forward() -> None:
    # sqrt(x) at x = 0 is finite; its gradient is Inf, and 0 * Inf is NaN.
    class SqrtAtZero(nn.Module):
        def forward(self, h: torch.Tensor) -> torch.Tensor:
            return torch.sqrt(h.relu() * 0.0)

    event = _source(_train(Net(SqrtAtZero()))[0])
    assert "every output was finite" in event.message
    assert "backward pass" in event.advice and "sqrt" in event.advice


def test_a_nan_in_the_batch_is_blamed_on_the_data() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    torch.manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gg.GradGuardWarning)
        guard = gg.attach(model, opt, on_nonfinite="skip")  # the default detectors
        for step in range(6):
            x = X.clone()
            if step >= 2:
                x[0, 0] = float("nan")
            opt.zero_grad(set_to_none=True)
            model(x).square().mean().backward()
            opt.step()
        guard.detach()
    event = _source(guard)
    assert "the batch itself holds NaN" in event.message
    assert "data pipeline" in event.advice


def test_nothing_is_left_behind_and_an_ordinary_step_is_untouched() -> None:
    model = Net(LogOfNegative())
    _, forensics = _train(model)
    assert not forensics.armed
    for module in model.modules():
        assert "forward" not in module.__dict__  # the class's forward again
    assert forensics.traces == 1
    # A healthy run never arms it.
    healthy = Net(LogOfNegative())
    _, quiet = _train(healthy, steps=BAD_FROM)
    assert quiet.traces == 0 and quiet.last_trace is None


def test_one_trace_per_episode_and_at_most_max_traces() -> None:
    guard, forensics = _train(Net(LogOfNegative()), steps=40, repeat_every=5)
    # NaN on every step from BAD_FROM: one long episode, traced once.
    assert forensics.traces == 1
    assert len([e for e in guard.events if e.kind == "nonfinite_source"]) == 1
    with pytest.raises(gg.ConfigurationError, match="max_traces"):
        NonfiniteForensics(max_traces=-1)


def test_traced_pass_nests_with_an_activation_window() -> None:
    # The activation monitor samples every step (its own TorchFunctionMode), at the same
    # time as the traced pass: both must come out whole, and training goes on.
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    monitor = gg.ActivationMonitor(every_n_steps=1, window=1)
    guard, _ = _train(Net(LogOfNegative()), steps=6, activations=monitor, log_every_n_steps=1)
    assert _source(guard).layers == ("body",)
    assert len(model(X)) == 16
    assert torch._C._len_torch_function_stack() == 0


class MaskedAttention(nn.Module):
    """Causal self-attention scores with a -inf mask (meant: never blamed), then, when
    ``fully_masked``, a row with every position masked (softmax of all -inf is NaN)."""

    def __init__(self, fully_masked: bool = False) -> None:
        super().__init__()
        self.fully_masked = fully_masked

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        scores = h.unsqueeze(-1) * h.unsqueeze(-2)  # [batch, 8, 8]
        mask = torch.ones(8, 8, dtype=torch.bool).triu(1)
        if self.fully_masked:
            mask[0] = True
        weights = scores.masked_fill(mask, float("-inf")).softmax(-1)
        return (weights @ h.unsqueeze(-1)).squeeze(-1)


class MaskThenLog(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = MaskedAttention()
        self.score = LogOfNegative()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.score(self.attn(h))


def test_a_meant_minus_inf_mask_is_not_blamed() -> None:
    event = _source(_train(Net(MaskThenLog()))[0])
    assert event.layers == ("body.score",) and "log()" in event.message


def test_a_fully_masked_row_is_blamed_on_softmax_with_mask_advice() -> None:
    event = _source(_train(Net(MaskedAttention(fully_masked=True)))[0])
    assert event.layers == ("body",) and "softmax()" in event.message
    assert "held +-Inf but no NaN" in event.message
    assert "fully masked row" in event.advice and "finfo" in event.advice


class ScaledByBuffer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("scale", torch.ones(8))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h * self.scale


def test_a_nan_buffer_is_named() -> None:
    model = Net(ScaledByBuffer())
    torch.manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    model.bad = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gg.GradGuardWarning)
        guard = gg.attach(model, opt, on_nonfinite="skip")
        for step in range(5):
            if step == 2:
                model.body.scale[3] = float("nan")  # a running statistic gone bad
            opt.zero_grad(set_to_none=True)
            model(X).square().mean().backward()
            opt.step()
        guard.detach()
    event = _source(guard)
    assert event.layers == ("body",) and "buffers" in event.message
