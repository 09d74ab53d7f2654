"""ActivationMonitor mechanics: windows and hooks, attribution, accumulation, cost, resume."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradguard as gg
from tests.models import mlp
from tests.syncs import count_syncs

X = torch.randn(32, 8, generator=torch.Generator().manual_seed(0))


def activation_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def function_modes() -> int:
    return int(torch._C._len_torch_function_stack())


def step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor = X) -> None:
    opt.zero_grad(set_to_none=True)
    model(x).square().mean().backward()
    opt.step()


def dead_relu_mlp() -> nn.Sequential:
    torch.manual_seed(0)
    model = mlp([8, 16, 16, 4])
    with torch.no_grad():
        for layer in model:
            if isinstance(layer, nn.Linear):
                layer.bias.fill_(-5.0)
    return model


def attach(
    model: nn.Module, lr: float = 0.0, **monitor: object
) -> tuple[gg.GradGuard, gg.MemorySink, torch.optim.Optimizer]:
    """A guard logging every step; lr=0 keeps the weights (and so the pathology) fixed."""
    sink = gg.MemorySink()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    guard = gg.attach(
        model,
        opt,
        sinks=[sink],
        log_every_n_steps=1,
        activations=gg.ActivationMonitor(**monitor),  # type: ignore[arg-type]
        warn=False,
    )
    return guard, sink, opt


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"every_n_steps": 0}, "every_n_steps"),
        ({"window": 0}, "window"),
        ({"every_n_steps": 2.5}, "every_n_steps"),
        ({"dead_threshold": -0.1}, "dead_threshold"),
        ({"dead_threshold": 1.5}, "dead_threshold"),
        ({"saturation_threshold": 2}, "saturation_threshold"),
        ({"saturation_threshold": "high"}, "saturation_threshold"),
        ({"remind_every": 0}, "remind_every"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs: dict[str, object], name: str) -> None:
    with pytest.raises(gg.ConfigurationError, match=name):
        gg.ActivationMonitor(**kwargs)  # type: ignore[arg-type]


def test_activations_true_means_default_monitor() -> None:
    monitor = gg.GradGuard().activations
    assert isinstance(monitor, gg.ActivationMonitor)
    assert (monitor.every_n_steps, monitor.window) == (100, 4)
    assert gg.GradGuard(activations=False).activations is None


def test_hooks_exist_only_during_the_window() -> None:
    model = mlp([8, 16, 16, 4])
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    bare = activation_hooks(model)
    guard = gg.attach(model, opt, activations=gg.ActivationMonitor(every_n_steps=10, window=3))
    hooks_at = []
    for _ in range(14):
        hooks_at.append(activation_hooks(model) > bare)
        step(model, opt)
        assert function_modes() == 0
    # windows of 3 training passes start at steps 0 and 10
    assert hooks_at == [True] * 3 + [False] * 7 + [True] * 3 + [False]
    guard.detach()
    assert activation_hooks(model) == bare


def test_detach_mid_window_removes_every_hook() -> None:
    model = mlp([8, 16, 4])
    guard, _, _ = attach(model, every_n_steps=5, window=4)
    assert activation_hooks(model) > 0
    guard.detach()
    assert activation_hooks(model) == 0 and function_modes() == 0


def test_compiled_model_is_not_sampled_and_says_so() -> None:
    model = mlp([8, 16, 4])
    compiled = torch.compile(model, backend="eager")
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    with pytest.warns(gg.GradGuardWarning, match="torch.compile"):
        guard = gg.attach(compiled, opt, log_every_n_steps=1)
    step(compiled, opt)
    assert activation_hooks(compiled) == 0
    assert guard.step == 1 and "gradguard/grad_norm_total" in guard.last_scalars
    guard.detach()


def test_no_grad_and_eval_passes_are_not_counted() -> None:
    model = dead_relu_mlp()
    guard, sink, opt = attach(model, every_n_steps=100, window=2)
    huge = torch.full((32, 8), 100.0)  # would make every unit fire if it were counted
    with torch.no_grad():
        model(huge)
    model.eval()
    model(huge)
    model.train()
    assert activation_hooks(model) > 0  # still waiting for 2 training passes
    step(model, opt)
    with torch.no_grad():
        model(huge)
    assert activation_hooks(model) > 0
    step(model, opt)
    assert activation_hooks(model) == 0
    guard.detach()
    assert sink.latest("gradguard/dead_fraction/0") == 1.0
    assert sink.latest("gradguard/dead_fraction/2") == 1.0


class Reused(nn.Module):
    """``fc`` runs twice; unit 0 fires only on the first use and unit 1 only on the second."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 2, bias=False)
        self.squash = nn.Linear(2, 3)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([[-1.0, 0.0], [1.0, 0.0]]))
            self.squash.weight.fill_(3.0)
            self.squash.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.fc(F.relu(self.fc(x))))
        return torch.tanh(self.squash(h)).sum(-1) + torch.tanh(self.squash(x)).sum(-1)


def test_module_used_twice_accumulates_both_uses() -> None:
    model = Reused()
    guard, sink, opt = attach(model, every_n_steps=50, window=1)
    x = torch.tensor([[-1.0, 0.0], [-0.5, 0.0]])
    step(model, opt, x)
    # Neither use alone keeps both units alive; together they do.
    assert sink.latest("gradguard/dead_fraction/fc") == 0.0
    with torch.no_grad():
        first = F.relu(model.fc(x))
        outputs = torch.cat([model.squash(first), model.squash(x)])
        expected = float((torch.tanh(outputs).abs() > 0.99).float().mean())
    assert sink.latest("gradguard/saturation/squash") == pytest.approx(expected)
    assert 0.0 < expected < 1.0
    guard.detach()


class Functional(nn.Module):
    """Every activation written functionally, with a norm between a Linear and its ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.b = nn.Linear(16, 16)
        self.norm = nn.BatchNorm1d(16)
        self.c = nn.Linear(16, 16)
        self.plain_norm = nn.LayerNorm(16, elementwise_affine=False)
        self.d = nn.Linear(16, 16)
        self.w = nn.Parameter(torch.randn(16, 16) * 0.1)
        self.e = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.a(x))
        x = torch.relu(self.norm(self.b(x)))
        x = self.plain_norm(self.c(x)).relu()
        x = torch.sigmoid(F.dropout(self.d(x), 0.1, self.training) + 1.0)
        x = torch.tanh(x @ self.w)
        return self.e(F.gelu(x))


def test_functional_activations_are_attributed_to_the_producing_layer() -> None:
    torch.manual_seed(0)
    model = Functional()
    guard, sink, opt = attach(model, every_n_steps=50, window=1)
    step(model, opt)
    dead = {k.split("/")[-1] for k in sink.scalars if "/dead_fraction/" in k}
    saturated = {k.split("/")[-1] for k in sink.scalars if "/saturation/" in k}
    # the ReLU after an affine BatchNorm belongs to the norm; after a parameter-free
    # LayerNorm to the Linear before it; x @ self.w to the module owning w (the root),
    # and so is the GELU that follows its tanh (never below GELU's -4 cut-off: alive).
    assert dead == {"a", "norm", "c", "root"}
    assert saturated == {"d", "root"}
    assert sink.latest("gradguard/dead_fraction/root") == 0.0
    assert set(guard.layers) >= dead | saturated
    guard.detach()


class Conv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3, padding=1)
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.conv(x)).mean((2, 3)))


def test_conv_units_are_channels() -> None:
    model = Conv()
    with torch.no_grad():
        model.conv.bias.copy_(torch.tensor([-50.0, -50.0, 0.0, 0.0, 0.0, 0.0]))
    guard, sink, opt = attach(model, every_n_steps=50, window=1)
    step(model, opt, torch.randn(16, 1, 8, 8))
    assert sink.latest("gradguard/dead_fraction/conv") == pytest.approx(2 / 6)
    guard.detach()


def test_sigmoid_output_of_the_model_is_not_saturation() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1), nn.Sigmoid())
    with torch.no_grad():
        model[2].weight.fill_(20.0)  # confident probabilities: saturated, and that is fine
    guard, sink, opt = attach(model, every_n_steps=50, window=1)
    step(model, opt)
    assert "gradguard/saturation/2" not in sink.scalars
    assert "gradguard/saturation/0" in sink.scalars
    guard.detach()


def test_non_sampled_step_adds_no_hooks_and_no_sync() -> None:
    torch.manual_seed(0)
    model = mlp([8, 32, 32, 4])
    opt = torch.optim.Adam(model.parameters())
    for _ in range(2):
        step(model, opt)
    with count_syncs() as bare:
        step(model, opt)
    guard = gg.attach(model, opt, log_every_n_steps=1000)  # activations=True: window 0..3
    for _ in range(5):
        step(model, opt)
    assert activation_hooks(model) == 0
    with count_syncs() as guarded:
        step(model, opt)
    assert guarded.count == bare.count
    guard.detach()


def test_sampled_steps_add_no_sync() -> None:
    torch.manual_seed(0)
    model = Functional()
    opt = torch.optim.Adam(model.parameters())
    step(model, opt)
    with count_syncs() as bare:
        step(model, opt)
    guard = gg.attach(
        model, opt, log_every_n_steps=1000, activations=gg.ActivationMonitor(window=3)
    )
    step(model, opt)  # step 0: logging step
    assert activation_hooks(model) > 0
    with count_syncs() as guarded:
        step(model, opt)  # step 1: sampled, not logging
    assert guarded.count == bare.count
    guard.detach()


def test_persisting_condition_is_reported_once_then_reminded() -> None:
    model = dead_relu_mlp()
    guard, _, opt = attach(model, every_n_steps=2, window=1, remind_every=3)
    for _ in range(16):  # windows at steps 0, 2, ..., 14
        step(model, opt)
    dead = [e for e in guard.events if e.kind == "dead_units"]
    assert [e.details["reminder"] for e in dead] == [False, True, True]
    assert dead[1].message.startswith("Still present since step 0: ")
    guard.detach()


def test_state_round_trip_keeps_the_episode() -> None:
    model = dead_relu_mlp()
    guard, _, opt = attach(model, every_n_steps=2, window=1)
    for _ in range(4):
        step(model, opt)
    assert [e.kind for e in guard.events] == ["dead_units"]
    buffer = io.BytesIO()
    torch.save(guard.state_dict(), buffer)
    guard.detach()
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert "dead_units" in state["debouncer"]["episodes"]  # the episode is in the checkpoint

    resumed = gg.GradGuard(
        log_every_n_steps=1, activations=gg.ActivationMonitor(every_n_steps=2, window=1), warn=False
    )
    resumed.load_state_dict(state)
    resumed.attach(model, opt)
    fresh_model = dead_relu_mlp()
    fresh, _, fresh_opt = attach(fresh_model, every_n_steps=2, window=1)
    for _ in range(4):
        step(model, opt)
        step(fresh_model, fresh_opt)
    assert resumed.step == 8
    assert not [e for e in resumed.events if e.kind == "dead_units"]  # the same episode
    assert [e.kind for e in fresh.events] == ["dead_units"]
    resumed.detach()
    fresh.detach()


def test_default_guard_works_with_closures_and_accumulation() -> None:
    torch.manual_seed(0)
    model = mlp([8, 16, 4])
    opt = torch.optim.LBFGS(model.parameters(), lr=0.1, max_iter=3)
    sink = gg.MemorySink()
    guard = gg.attach(model, opt, log_every_n_steps=1, sinks=[sink])  # activations=True

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = model(X).square().mean()
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(closure)
    assert guard.step == 3
    assert activation_hooks(model) == 0  # LBFGS ran its 4 passes within the first steps
    assert 0.0 <= sink.latest("gradguard/dead_fraction/0") < 0.5
    guard.detach()

    # gradient accumulation: 4 forward passes per optimizer step fill the window at once
    sgd = torch.optim.SGD(model.parameters(), lr=1e-3)
    sink = gg.MemorySink()
    guard = gg.attach(model, sgd, log_every_n_steps=1, sinks=[sink])
    for chunk in X.chunk(4):
        model(chunk).square().mean().backward()
    assert activation_hooks(model) == 0
    sgd.step()
    assert "gradguard/dead_fraction/0" in sink.scalars
    guard.detach()
