"""The core pipeline in a plain PyTorch loop: metrics, layers, hooks, policies, resume."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn

import gradguard as gg
from tests.models import mlp

X = torch.randn(32, 6, generator=torch.Generator().manual_seed(1))
Y = torch.randn(32, 3, generator=torch.Generator().manual_seed(2))


def make_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return mlp([6, 16, 16, 3])


def loss_of(model: nn.Module) -> torch.Tensor:
    return nn.functional.mse_loss(model(X), Y)


def one_step(model: nn.Module, opt: torch.optim.Optimizer, nan_in: str | None = None) -> None:
    opt.zero_grad(set_to_none=True)
    loss_of(model).backward()
    if nan_in is not None:
        dict(model.named_parameters())[nan_in].grad.view(-1)[0] = float("nan")
    opt.step()


def quiet(**kwargs: object) -> dict[str, object]:
    """Defaults for tests that are not about activations or warnings."""
    kwargs.setdefault("activations", False)
    return kwargs


def test_logged_norms_equal_independent_computation() -> None:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sink = gg.MemorySink()
    gg.attach(model, opt, sinks=[sink], log_every_n_steps=1, **quiet())
    opt.zero_grad()
    loss_of(model).backward()
    expected = {
        name: math.sqrt(sum(float(p.grad.pow(2).sum()) for p in module.parameters()))
        for name, module in model.named_children()
        if any(True for _ in module.parameters())
    }
    before = {
        name: [p.detach().clone() for p in m.parameters()] for name, m in model.named_children()
    }
    opt.step()
    for name, value in expected.items():
        assert sink.latest(f"gradguard/grad_norm/{name}") == pytest.approx(value, rel=1e-5)
    total = math.sqrt(sum(v * v for v in expected.values()))
    assert sink.latest("gradguard/grad_norm_total") == pytest.approx(total, rel=1e-5)
    for name in expected:
        params = list(model.get_submodule(name).parameters())
        param_norm = math.sqrt(sum(float(p.detach().pow(2).sum()) for p in params))
        update = math.sqrt(
            sum(float((p.detach() - b).pow(2).sum()) for p, b in zip(params, before[name]))
        )
        assert sink.latest(f"gradguard/param_norm/{name}") == pytest.approx(param_norm, rel=1e-5)
        assert sink.latest(f"gradguard/update_ratio/{name}") == pytest.approx(
            update / param_norm, rel=1e-4
        )
    assert sink.latest("gradguard/skipped_steps") == 0.0
    # Sequential names its children 0, 2, 4: ReLUs own no parameters and are not layers.
    assert set(expected) == {"0", "2", "4"}


def test_logging_steps_are_multiples_of_n() -> None:
    model = make_model()
    opt = torch.optim.Adam(model.parameters())
    sink = gg.MemorySink()
    guard = gg.attach(model, opt, sinks=[sink], log_every_n_steps=4, **quiet())
    for _ in range(10):
        one_step(model, opt)
    assert [s for s, _ in sink.scalars["gradguard/grad_norm_total"]] == [0, 4, 8]
    assert guard.step == 10


def test_lbfgs_with_closure_is_measured_after_the_closure() -> None:
    model = make_model()
    opt = torch.optim.LBFGS(model.parameters(), max_iter=5)
    sink = gg.MemorySink()
    gg.attach(model, opt, sinks=[sink], log_every_n_steps=1, **quiet())
    first_norms: list[float] = []

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = loss_of(model)
        loss.backward()
        if len(first_norms) == 0:
            first_norms.append(
                math.sqrt(sum(float(p.grad.pow(2).sum()) for p in model.parameters()))
            )
        return loss

    loss_before = loss_of(model).item()
    opt.step(closure)
    assert sink.latest("gradguard/grad_norm_total") == pytest.approx(first_norms[0], rel=1e-5)
    assert loss_of(model).item() < loss_before


def test_param_groups_frozen_and_unheld_parameters() -> None:
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(3))  # owned by the root module
            self.frozen = nn.Linear(6, 6)
            self.body = nn.Linear(6, 8)
            self.head = nn.Linear(8, 3)
            self.unheld = nn.Linear(3, 3)
            for p in self.frozen.parameters():
                p.requires_grad_(False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.unheld(self.head(torch.relu(self.body(self.frozen(x))))) * self.scale

    model = Net()
    opt = torch.optim.SGD(
        [
            {"params": model.body.parameters(), "lr": 0.1},
            {"params": [*model.head.parameters(), model.scale], "lr": 0.01},
        ]
    )
    sink = gg.MemorySink()
    guard = gg.attach(model, opt, sinks=[sink], log_every_n_steps=1, **quiet())
    opt.zero_grad()
    nn.functional.mse_loss(model(X), Y).backward()
    opt.step()
    grad_keys = {k.split("/", 2)[2] for k in sink.scalars if k.startswith("gradguard/grad_norm/")}
    assert grad_keys == {"root", "body", "head"}
    assert sorted(guard.layers) == ["body", "head", "root"]


def test_attach_validates_its_arguments() -> None:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(gg.ConfigurationError, match=r"clip='banana'.*NormClip"):
        gg.GradGuard(clip="banana")  # type: ignore[arg-type]
    with pytest.raises(
        gg.ConfigurationError, match=r"on_nonfinite='explode'.*'warn', 'skip', 'raise'"
    ):
        gg.GradGuard(on_nonfinite="explode")  # type: ignore[arg-type]
    with pytest.raises(gg.ConfigurationError, match=r"on_spike='loud'"):
        gg.GradGuard(on_spike="loud")  # type: ignore[arg-type]
    with pytest.raises(gg.ConfigurationError, match=r"log_every_n_steps=0.*>= 1"):
        gg.GradGuard(log_every_n_steps=0)
    with pytest.raises(gg.ConfigurationError, match=r"clip=-1.0"):
        gg.GradGuard(clip=-1.0)
    with pytest.raises(gg.ConfigurationError, match="sinks"):
        gg.GradGuard(sinks=["not a sink"])  # type: ignore[list-item]
    other = make_model(seed=3)
    with pytest.raises(gg.ConfigurationError, match="holds none of the trainable parameters"):
        gg.attach(other, opt)
    with pytest.raises(gg.ConfigurationError, match=r"expected a torch\.nn\.Module"):
        gg.attach("model", opt)  # type: ignore[arg-type]
    # ConfigurationError is also a ValueError, so generic handlers catch it.
    assert issubclass(gg.ConfigurationError, ValueError)


def test_attaching_twice_to_one_optimizer_is_an_error() -> None:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    first = gg.attach(model, opt, **quiet())
    with pytest.raises(gg.ConfigurationError, match="already watched"):
        gg.attach(model, opt, **quiet())
    first.detach()
    gg.attach(model, opt, **quiet()).detach()  # fine once the first guard let go


def _hook_counts(model: nn.Module, opt: torch.optim.Optimizer) -> tuple[int, ...]:
    module_hooks = sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        for m in model.modules()
    )
    param_hooks = sum(len(p._post_accumulate_grad_hooks or {}) for p in model.parameters())
    return (
        len(opt._optimizer_step_pre_hooks),
        len(opt._optimizer_step_post_hooks),
        module_hooks,
        param_hooks,
    )


def test_detach_removes_every_hook() -> None:
    model = make_model()
    opt = torch.optim.Adam(model.parameters())
    bare = _hook_counts(model, opt)
    guard = gg.attach(model, opt, activations=gg.ActivationMonitor(every_n_steps=2))
    assert _hook_counts(model, opt) != bare
    for _ in range(3):
        one_step(model, opt)
    guard.detach()
    assert _hook_counts(model, opt) == bare
    guard.detach()  # twice is harmless
    with gg.attach(model, opt) as inner:
        one_step(model, opt)
        assert inner.attached
    assert not inner.attached
    assert _hook_counts(model, opt) == bare


def test_nonfinite_warn_names_the_layer() -> None:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gg.attach(model, opt, **quiet())
    with pytest.warns(gg.GradGuardWarning, match=r"NaN/Inf in 1 of 3 layers.*'2'"):
        one_step(model, opt, nan_in="2.weight")
    (event,) = guard.events
    assert event.kind == "nonfinite" and event.layers == ("2",) and event.severity == "error"
    assert "on_nonfinite='skip'" in event.advice
    assert guard.nonfinite_steps == 1 and guard.skipped_steps == 0


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("optimizer", ["adam", "adamw", "sgd"])
def test_nonfinite_skip_leaves_weights_and_state_bit_identical(optimizer: str, fused: bool) -> None:
    model = make_model()
    params = model.parameters()
    opt: torch.optim.Optimizer
    if optimizer == "adam":
        opt = torch.optim.Adam(params, lr=1e-2, fused=fused)
    elif optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=1e-2, fused=fused)
    else:
        opt = torch.optim.SGD(params, lr=1e-2, momentum=0.9, fused=fused)
    guard = gg.attach(model, opt, on_nonfinite="skip", **quiet())
    for _ in range(3):
        one_step(model, opt)
    weights = copy.deepcopy(model.state_dict())
    state = copy.deepcopy(opt.state_dict())
    with pytest.warns(gg.GradGuardWarning, match="skipped the optimizer step"):
        one_step(model, opt, nan_in="0.bias")
    for key, value in model.state_dict().items():
        assert torch.equal(value, weights[key]), key
    after = opt.state_dict()["state"]
    for index, entries in state["state"].items():
        for name, value in entries.items():
            assert torch.equal(torch.as_tensor(after[index][name]), torch.as_tensor(value)), name
    assert guard.skipped_steps == 1
    one_step(model, opt)  # training goes on and the weights move again
    assert not torch.equal(model.state_dict()["0.weight"], weights["0.weight"])
    assert guard.skipped_steps == 1 and guard.step == 5


def test_nonfinite_raise_names_step_and_layer() -> None:
    model = make_model()
    opt = torch.optim.Adam(model.parameters())
    guard = gg.attach(model, opt, on_nonfinite="raise", **quiet())
    one_step(model, opt)
    weights = copy.deepcopy(model.state_dict())
    with pytest.raises(gg.GradientAlarmError, match=r"step 1:.*'4'") as info:
        one_step(model, opt, nan_in="4.weight")
    assert info.value.step == 1 and info.value.layers == ("4",)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert guard.events[-1].kind == "nonfinite"


def test_nan_storm_is_debounced() -> None:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gg.attach(model, opt, on_nonfinite="skip", **quiet())
    with pytest.warns(gg.GradGuardWarning) as record:
        for _ in range(250):
            one_step(model, opt, nan_in="0.weight")
    assert guard.skipped_steps == 250
    kinds = [e.kind for e in guard.events]
    # Steps 0, 100, 200: one episode with reminders; step 1's forward pass was traced once
    # (the NaN is put into the gradient after backward, so the pass is finite).
    assert kinds == ["nonfinite", "nonfinite_source", "nonfinite", "nonfinite"]
    assert "every output was finite" in guard.events[1].message
    assert "steps with NaN/Inf since the last report" in guard.events[2].message
    assert len(record) == 4


def _spiky_run(
    on_spike: str, spike_at: int = 150
) -> tuple[gg.GradGuard, list[dict[str, torch.Tensor]]]:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    guard = gg.attach(model, opt, on_spike=on_spike, **quiet())  # type: ignore[arg-type]
    gen = torch.Generator().manual_seed(0)
    snapshots = []
    for step in range(spike_at + 5):
        opt.zero_grad()
        x = torch.randn(32, 6, generator=gen)
        loss = nn.functional.mse_loss(model(x), torch.zeros(32, 3))
        (loss * (1000.0 if step == spike_at else 1.0)).backward()
        if step == spike_at:
            snapshots.append(copy.deepcopy(model.state_dict()))
        opt.step()
        if step == spike_at:
            snapshots.append(copy.deepcopy(model.state_dict()))
    return guard, snapshots


def test_spike_warns_once_and_healthy_steps_stay_silent() -> None:
    with pytest.warns(gg.GradGuardWarning, match=r"spiked to .*x its running mean") as record:
        guard, _ = _spiky_run("warn")
    assert [e.kind for e in guard.events] == ["spike"]
    assert guard.events[0].step == 150 and guard.events[0].value > 6
    assert len(record) == 1


def test_spike_skip_keeps_weights() -> None:
    with pytest.warns(gg.GradGuardWarning, match="skipped the step"):
        guard, (before, after) = _spiky_run("skip")
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert guard.skipped_steps == 1


def test_resume_from_state_dict_continues_identically() -> None:
    def run(
        steps: int, guard: gg.GradGuard, model: nn.Module, opt: torch.optim.Optimizer, start: int
    ) -> None:
        gen = torch.Generator().manual_seed(start)
        for _ in range(steps):
            opt.zero_grad()
            nn.functional.mse_loss(model(torch.randn(32, 6, generator=gen)), Y).backward()
            opt.step()

    kwargs = dict(clip=1.0, log_every_n_steps=5, **quiet())
    model_a = make_model()
    opt_a = torch.optim.Adam(model_a.parameters(), lr=1e-2)
    sink_a = gg.MemorySink()
    guard_a = gg.attach(model_a, opt_a, sinks=[sink_a], **kwargs)  # type: ignore[arg-type]
    run(20, guard_a, model_a, opt_a, start=1)
    run(20, guard_a, model_a, opt_a, start=2)

    model_b = make_model()
    opt_b = torch.optim.Adam(model_b.parameters(), lr=1e-2)
    guard_b = gg.attach(model_b, opt_b, **kwargs)  # type: ignore[arg-type]
    run(20, guard_b, model_b, opt_b, start=1)
    saved = copy.deepcopy(guard_b.state_dict())
    model_state, opt_state = copy.deepcopy(model_b.state_dict()), copy.deepcopy(opt_b.state_dict())
    guard_b.detach()

    model_c = make_model(seed=9)
    model_c.load_state_dict(model_state)
    opt_c = torch.optim.Adam(model_c.parameters(), lr=1e-2)
    opt_c.load_state_dict(opt_state)
    sink_c = gg.MemorySink()
    guard_c = gg.GradGuard(sinks=[sink_c], **kwargs)  # type: ignore[arg-type]
    guard_c.load_state_dict(saved)  # before attach, as Lightning does
    guard_c.attach(model_c, opt_c)
    assert guard_c.step == 20
    run(20, guard_c, model_c, opt_c, start=2)

    for key, value in model_a.state_dict().items():
        assert torch.equal(value, model_c.state_dict()[key]), key
    after_a, after_c = guard_a.state_dict(), guard_c.state_dict()
    assert after_a["step"] == after_c["step"] == 40
    assert after_a["detectors"]["spike"] == after_c["detectors"]["spike"]
    resumed = {k: v for k, v in sink_a.scalars.items() if k.startswith("gradguard/grad_norm")}
    for key, points in resumed.items():
        assert [p for p in points if p[0] >= 20] == sink_c.scalars[key], key


def test_state_dict_holds_only_plain_types() -> None:
    model = make_model()
    opt = torch.optim.Adam(model.parameters())
    guard = gg.attach(model, opt, clip=1.0)
    one_step(model, opt)

    def check(value: object) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                assert isinstance(k, str)
                check(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                check(v)
        else:
            assert isinstance(value, (torch.Tensor, int, float, str, bool, type(None))), type(value)

    state = guard.state_dict()
    check(state)
    assert state["version"] == 2 and state["step"] == 1
    with pytest.raises(gg.ConfigurationError, match="state_dict"):
        guard.load_state_dict({"nope": 1})


class _BrokenSink(gg.MemorySink):
    def log_scalars(self, scalars: object, step: int) -> None:
        raise OSError("disk full")


def test_a_failing_sink_is_disabled_with_one_warning() -> None:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    good = gg.MemorySink()
    guard = gg.attach(model, opt, sinks=[_BrokenSink(), good], log_every_n_steps=1, **quiet())
    with pytest.warns(
        gg.GradGuardWarning, match="disabled the sink _BrokenSink.*disk full"
    ) as record:
        for _ in range(5):
            one_step(model, opt)
    assert len(record) == 1
    assert len(good.scalars["gradguard/grad_norm_total"]) == 5
    assert guard.step == 5


def test_logging_sink_writes_debug_scalars_and_info_events(
    caplog: pytest.LogCaptureFixture,
) -> None:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gg.attach(model, opt, sinks=[gg.LoggingSink()], log_every_n_steps=1, warn=False, **quiet())
    with caplog.at_level("DEBUG", logger="gradguard"):
        one_step(model, opt)
        one_step(model, opt, nan_in="0.weight")
        one_step(model, opt, nan_in="0.weight")
    debug = [r for r in caplog.records if r.levelname == "DEBUG"]
    infos = [r for r in caplog.records if r.levelname == "INFO"]
    assert len(debug) == 3 and "gradguard/grad_norm_total=" in debug[0].getMessage()
    # The NaN, then what the traced forward pass of the next step found.
    assert len(infos) == 2 and "NaN/Inf" in infos[0].getMessage()
    assert "traced the forward pass of step 2" in infos[1].getMessage()


def test_public_api_is_sorted_and_complete() -> None:
    assert gg.__all__ == sorted(gg.__all__)
    for name in gg.__all__:
        assert hasattr(gg, name), name
    public = {n for n in dir(gg) if not n.startswith("_") and n[0].isupper()}
    assert public <= set(gg.__all__)


def test_event_title_fits_an_alert() -> None:
    event = gg.Event(
        "nonfinite", 12, ("encoder.layers.0.self_attn.out_proj" * 3,), 1.0, "error", "m", "a"
    )
    assert len(event.title) < 64
    assert str(event).startswith("[gradguard step 12]")


def test_warnings_can_be_silenced() -> None:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gg.attach(model, opt, warn=False, **quiet())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        one_step(model, opt, nan_in="0.weight")
    assert guard.events[-1].kind == "nonfinite"


def test_events_carry_the_step_the_sinks_use() -> None:
    # Adapters (Lightning) drive the steps themselves and pass their own global step.
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sink = gg.MemorySink()
    guard = gg.GradGuard(sinks=[sink], log_every_n_steps=1, warn=False, **quiet())
    guard.bind(model, opt)
    for step, nan_in in enumerate((None, "0.weight")):
        opt.zero_grad(set_to_none=True)
        loss_of(model).backward()
        if nan_in is not None:
            dict(model.named_parameters())[nan_in].grad.view(-1)[0] = float("nan")
        decision = guard.before_step(sink_step=1000 + 2 * step)
        assert decision.step == step and decision.skip is None
        opt.step()
        guard.after_step()
    assert [s for s, _ in sink.scalars["gradguard/grad_norm_total"]] == [1000, 1002]
    assert [e.step for e in sink.events] == [1002]
    assert guard.events[-1].step == 1002


def test_fp16_gradient_norms_beyond_the_fp16_range_are_finite() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(4, 4).half()
    opt = torch.optim.SGD(layer.parameters(), lr=0.0)
    sink = gg.MemorySink()
    gg.attach(layer, opt, sinks=[sink], log_every_n_steps=1, **quiet())
    for p in layer.parameters():
        p.grad = torch.full_like(p, 30000.0)  # finite in fp16; the norm (~134000) is not
    opt.step()
    expected = 30000.0 * math.sqrt(20)
    assert sink.latest("gradguard/grad_norm_total") == pytest.approx(expected, rel=1e-3)
    assert sink.latest("gradguard/nonfinite_steps") == 0.0


def test_attach_again_continues_with_the_same_sinks_and_clip_history() -> None:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    sink = gg.MemorySink()
    clip = gg.AutoClip(history=50)
    guard = gg.GradGuard(sinks=[sink], clip=clip, log_every_n_steps=1, **quiet())  # type: ignore[arg-type]
    guard.attach(model, opt)
    for _ in range(3):
        one_step(model, opt)
    history = clip.state_dict()["ring"].clone()
    guard.detach()
    guard.attach(model, opt)
    assert torch.equal(clip.state_dict()["ring"].nan_to_num(-1.0), history.nan_to_num(-1.0))
    for _ in range(2):
        one_step(model, opt)
    assert [s for s, _ in sink.scalars["gradguard/grad_norm_total"]] == [0, 1, 2, 3, 4]
    guard.close()


def test_a_state_saved_with_another_clip_starts_the_clip_fresh() -> None:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    saving = gg.attach(model, opt, clip=gg.ZClip(), **quiet())
    one_step(model, opt)
    state = saving.state_dict()
    saving.detach()
    guard = gg.GradGuard(clip=gg.AutoClip(), **quiet())  # type: ignore[arg-type]
    guard.load_state_dict(state)
    with pytest.warns(gg.GradGuardWarning, match="saved with clip=ZClip.*starts fresh"):
        guard.attach(model, opt)
    one_step(model, opt)
    assert guard.step == 2


def test_a_failed_attach_leaves_nothing_behind() -> None:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with pytest.raises(gg.ConfigurationError, match="exclude"):
        gg.attach(model, opt, clip=gg.AGC(exclude=("nope",)))
    assert _hook_counts(model, opt) == (0, 0, 0, 0)
    gg.attach(model, opt, **quiet()).detach()  # the optimizer is free again
