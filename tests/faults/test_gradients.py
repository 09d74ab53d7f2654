"""Gradients torch supports that ordinary MLPs never produce: sparse, complex, tied,
per-sample (``torch.func``), absent, and parameters initialised on the ``meta`` device."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

import gradguard as gg
from tests.faults._kit import Snapshot, X, Y, backward, bit_equal, loss_of, tiny

IDX = torch.tensor([[1, 2, 2, 3], [3, 4, 5, 5]])  # repeated rows: an uncoalesced gradient


# ---------------------------------------------------------------------- sparse
def _sparse_model(dense_head: bool) -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Embedding(20, 4, sparse=True)]
    if dense_head:
        layers.append(nn.Linear(4, 2))
    return nn.Sequential(*layers)


@pytest.mark.parametrize("clip", [None, 1.0], ids=["default", "clip=1.0"])
@pytest.mark.parametrize("setup", ["SparseAdam", "SGD sparse+dense"])
def test_sparse_gradients_are_measured_and_clipped(setup: str, clip: float | None) -> None:
    model = _sparse_model(dense_head=setup != "SparseAdam")
    opt: torch.optim.Optimizer
    if setup == "SparseAdam":
        opt = torch.optim.SparseAdam(model.parameters(), lr=1e-2)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    sink = gg.MemorySink()
    guard = gg.attach(model, opt, clip=clip, sinks=[sink], log_every_n_steps=1, warn=False)
    for _ in range(4):
        opt.zero_grad(set_to_none=True)
        model(IDX).pow(2).sum().backward()
        grads = [
            p.grad.coalesce().values() if p.grad.is_sparse else p.grad for p in model.parameters()
        ]
        total = math.sqrt(sum(float(g.pow(2).sum()) for g in grads))
        before = Snapshot(model, opt)
        opt.step()
        assert sink.latest("gradguard/grad_norm_total") == pytest.approx(total, rel=1e-5)
        assert before.changed(model)
        if clip is not None:
            after = [
                p.grad.coalesce().values() if p.grad.is_sparse else p.grad
                for p in model.parameters()
            ]
            assert math.sqrt(sum(float(g.pow(2).sum()) for g in after)) <= clip * (1 + 1e-5)
    assert guard.nonfinite_steps == 0 and list(guard.events) == []


# ---------------------------------------------------------------------- complex
class ComplexNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.mix = nn.Parameter(torch.randn(4, 3, dtype=torch.cfloat))
        self.head = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head((x.to(torch.cfloat) @ self.mix).abs())


@pytest.mark.parametrize(
    "clip", [None, 1.0, "AGC", "AutoClip(per_layer)"], ids=["none", "1.0", "AGC", "AutoClip"]
)
def test_complex_parameters_are_measured_by_modulus_and_skipped(clip: Any) -> None:
    strategy = {"AGC": gg.AGC(), "AutoClip(per_layer)": gg.AutoClip(per_layer=True)}.get(clip, clip)
    model = ComplexNet()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sink = gg.MemorySink()
    guard = gg.attach(model, opt, clip=strategy, on_nonfinite="skip", sinks=[sink],
                      log_every_n_steps=1, warn=False)  # fmt: skip
    for step in range(4):
        backward(model, opt)
        expected = float(torch.linalg.vector_norm(model.mix.grad))
        if step == 2:
            model.mix.grad[1, 1] = complex(0.0, float("nan"))  # NaN in the imaginary part
        before = Snapshot(model, opt)
        opt.step()
        if step == 2:
            assert before.weights_equal(model) and before.state_equal(opt)
        else:
            assert sink.latest("gradguard/grad_norm/root") == pytest.approx(expected, rel=1e-5)
            assert "mix" in before.changed(model)
    assert guard.skipped_steps == 1


def test_value_clip_on_complex_parameters_is_refused_at_attach() -> None:
    model = ComplexNet()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    with pytest.raises(gg.ConfigurationError, match="complex"):
        gg.attach(model, opt, clip=gg.ValueClip(0.1), warn=False)


# ---------------------------------------------------------------------- tied weights
class TiedLM(nn.Module):
    """An LM head sharing the embedding's weight (as GPT-2 does)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(10, 4)
        self.mid = nn.Linear(4, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mid(self.emb(idx))))


def test_tied_weights_are_one_layer_with_the_summed_gradient() -> None:
    model = TiedLM()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sink = gg.MemorySink()
    guard = gg.attach(model, opt, clip=gg.AGC(), sinks=[sink], log_every_n_steps=1, warn=False)
    opt.zero_grad()
    tokens = torch.tensor([[1, 2, 3], [4, 5, 6]])
    nn.functional.cross_entropy(model(tokens).reshape(-1, 10), tokens.reshape(-1)).backward()
    expected = float(model.emb.weight.grad.norm())  # both uses, accumulated in one .grad
    opt.step()
    assert guard.layers == ["emb", "mid"]  # the head owns nothing of its own
    assert sink.latest("gradguard/grad_norm/emb") == pytest.approx(expected, rel=1e-5)
    assert "gradguard/grad_norm/head" not in sink.scalars


# ---------------------------------------------------------------------- per-sample (torch.func)
def _relu_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))


def _per_sample_step(model: nn.Module, opt: torch.optim.Optimizer, plain_forward: bool) -> None:
    """DP-SGD style: per-sample gradients under vmap(grad), clipped per sample, averaged."""

    def loss_one(params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, params, (x.unsqueeze(0),))
        return nn.functional.mse_loss(out, y.unsqueeze(0))

    params = {k: v.detach() for k, v in model.named_parameters()}
    per_sample = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, X, Y)
    norms = torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in per_sample.values()))
    scale = 1.0 / norms.clamp_min(1.0)
    for name, p in model.named_parameters():
        g = per_sample[name]
        p.grad = (g * scale.view(-1, *[1] * (g.ndim - 1))).mean(0)
    if plain_forward:
        loss_of(model)  # an ordinary training forward in the same step (e.g. for logging)
    opt.step()


def test_per_sample_gradients_under_vmap_with_activation_sampling_every_step() -> None:
    model = _relu_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sink = gg.MemorySink()
    monitor = gg.ActivationMonitor(every_n_steps=1, window=1)
    guard = gg.attach(model, opt, activations=monitor, sinks=[sink], log_every_n_steps=1)
    for _ in range(4):
        _per_sample_step(model, opt, plain_forward=False)
        assert torch._C._len_torch_function_stack() == 0
    assert guard.step == 4 and list(guard.events) == []
    assert sink.latest("gradguard/grad_norm_total") > 0.0


def test_a_plain_forward_beside_vmap_is_still_sampled() -> None:
    model = _relu_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sink = gg.MemorySink()
    monitor = gg.ActivationMonitor(every_n_steps=1, window=1)
    gg.attach(model, opt, activations=monitor, sinks=[sink], log_every_n_steps=1)
    for _ in range(3):
        _per_sample_step(model, opt, plain_forward=True)
    assert "gradguard/dead_fraction/0" in sink.scalars


# ---------------------------------------------------------------------- no gradient at all
STRATEGIES: dict[str, Callable[[], Any]] = {
    "none": lambda: None,
    "1.0": lambda: 1.0,
    "NormClip": lambda: gg.NormClip(1.0),
    "ValueClip": lambda: gg.ValueClip(0.1),
    "AutoClip": gg.AutoClip,
    "ZClip": gg.ZClip,
    "AGC": gg.AGC,
    "NormClip(per_layer)": lambda: gg.NormClip(1.0, per_layer=True),
    "AutoClip(per_layer)": lambda: gg.AutoClip(per_layer=True),
}


def _strategy_params() -> Iterator[Any]:
    for name in STRATEGIES:
        yield pytest.param(name, id=name)


@pytest.mark.parametrize("policy", ["warn", "skip"])
@pytest.mark.parametrize("name", list(_strategy_params()))
def test_a_step_without_any_gradient(name: str, policy: str) -> None:
    model = tiny()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    strategy = STRATEGIES[name]()
    guard = gg.attach(model, opt, clip=strategy, on_nonfinite=policy, log_every_n_steps=1,
                      activations=False, warn=False)  # fmt: skip
    for _ in range(3):
        backward(model, opt)
        opt.step()
    clip_state = guard.clip.state_dict() if guard.clip is not None else {}
    before = Snapshot(model, opt)
    clipped = guard.clipped_steps
    opt.zero_grad(set_to_none=True)
    opt.step()  # nothing has a gradient (e.g. a batch that touched no trainable branch)
    assert before.weights_equal(model) and before.state_equal(opt)
    assert guard.clipped_steps == clipped and guard.skipped_steps == 0
    assert list(guard.events) == []
    if guard.clip is not None:
        assert bit_equal(guard.clip.state_dict(), clip_state)  # nothing entered a history
    backward(model, opt)
    opt.step()  # and training goes on
    assert guard.step == 5


# ---------------------------------------------------------------------- meta-device init
def _on_meta() -> nn.Sequential:
    with torch.device("meta"):
        return tiny()


def _materialise(model: nn.Module) -> None:
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.Linear):
            module.reset_parameters()


def _trains(model: nn.Module, opt: torch.optim.Optimizer, guard: gg.GradGuard) -> None:
    for _ in range(3):
        backward(model, opt)
        before = Snapshot(model, opt)
        opt.step()
        assert len(before.changed(model)) == 6
    assert guard.layers == ["0", "2", "4"] and guard.step == 3


def test_meta_init_attach_after_to_empty() -> None:
    model = _on_meta()
    _materialise(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    _trains(model, opt, gg.attach(model, opt, warn=False))


def test_meta_init_attach_before_to_empty_with_swapped_params() -> None:
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        model = _on_meta()
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        guard = gg.attach(model, opt, warn=False)
        _materialise(model)  # the same Parameter objects now hold CPU data
        _trains(model, opt, guard)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(False)


def test_meta_init_attach_before_to_empty_without_swap_raises_at_the_first_step() -> None:
    model = _on_meta()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)  # holds the meta parameters
    gg.attach(model, opt, warn=False)
    _materialise(model)  # new Parameter objects: the optimizer would silently train nothing
    backward(model, opt)
    with pytest.raises(gg.GradGuardError, match=r"still on the 'meta' device.*to_empty"):
        opt.step()
