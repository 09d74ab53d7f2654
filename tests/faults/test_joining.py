"""Parameters that join (or leave) after attach: gradual unfreezing, ``add_param_group``,
a layer frozen mid-run.

A layer that starts training after attach must be measured from its first gradient, its
NaN must be skipped like any other, and it must show in ``guard.layers`` and the metrics.
"""

from __future__ import annotations

import pytest
import torch

import gradguard as gg
from tests.faults._kit import Snapshot, backward, poison, tiny

UNFREEZE_AT = 3
NAN_AT = 5


def _grad_keys(sink: gg.MemorySink, step: int) -> set[str]:
    prefix = "gradguard/grad_norm/"
    return {
        key[len(prefix) :]
        for key, values in sink.scalars.items()
        if key.startswith(prefix) and values[-1][0] == step
    }


def _run_joining(model: torch.nn.Sequential, opt: torch.optim.Optimizer, join: object) -> None:
    sink = gg.MemorySink()
    guard = gg.attach(
        model, opt, on_nonfinite="skip", sinks=[sink], log_every_n_steps=1, warn=False,
        activations=False,
    )  # fmt: skip
    assert guard.layers == ["4"]
    for step in range(8):
        if step == UNFREEZE_AT:
            join()  # type: ignore[operator]
        backward(model, opt)
        if step == NAN_AT:
            poison(model[2].weight)  # a NaN in the layer that joined
        before = Snapshot(model, opt)
        opt.step()
        joined = step >= UNFREEZE_AT
        assert guard.layers == (["2", "4"] if joined else ["4"])
        assert _grad_keys(sink, step) == ({"2", "4"} if joined else {"4"})
        if step == NAN_AT:
            assert before.weights_equal(model) and before.state_equal(opt)
        elif joined:
            assert "2.weight" in before.changed(model)
        if joined:
            expected = float(torch.linalg.vector_norm(torch.cat(
                [model[2].weight.grad.reshape(-1), model[2].bias.grad.reshape(-1)]
            ))) if step != NAN_AT else None  # fmt: skip
            if expected is not None:
                assert sink.latest("gradguard/grad_norm/2") == pytest.approx(expected, rel=1e-5)
    assert guard.skipped_steps == 1
    (event,) = guard.events
    assert event.kind == "nonfinite" and event.layers == ("2",)


def test_gradual_unfreezing_is_watched_from_the_first_gradient() -> None:
    model = tiny()
    for layer in (model[0], model[2]):
        layer.requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)  # holds the frozen layers too
    _run_joining(model, opt, lambda: model[2].requires_grad_(True))


def test_a_param_group_added_after_attach_is_watched() -> None:
    model = tiny()
    model[0].requires_grad_(False)
    # Layer 2 has gradients from the start, but the optimizer holds it only from step 3:
    # until then it is not trained, and not reported.
    opt = torch.optim.Adam(model[4].parameters(), lr=1e-2)

    def add_group() -> None:
        opt.add_param_group({"params": list(model[2].parameters()), "lr": 1e-3})

    _run_joining(model, opt, add_group)


def test_attaching_with_every_parameter_frozen_says_what_to_do() -> None:
    model = tiny()
    model.requires_grad_(False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(gg.ConfigurationError, match=r"frozen \(requires_grad=False\).*unfrozen"):
        gg.attach(model, opt)
    assert not opt._optimizer_step_pre_hooks  # nothing left behind


@pytest.mark.xfail(
    strict=True,
    reason="_binding.py/_norms.py need at least one trainable parameter at attach "
    "(GradNormComputer takes its device from layout.params[0]); an empty layout that "
    "WatchedSet fills at the first gradient would support freeze-all-then-unfreeze",
)
def test_freeze_everything_attach_then_unfreeze() -> None:
    model = tiny()
    model.requires_grad_(False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gg.attach(model, opt, activations=False, warn=False)
    model[4].requires_grad_(True)
    backward(model, opt)
    opt.step()
    assert guard.layers == ["4"]


@pytest.mark.parametrize("set_to_none", [True, False])
def test_a_layer_frozen_after_attach_reports_no_made_up_norms(set_to_none: bool) -> None:
    model = tiny()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sink = gg.MemorySink()
    guard = gg.attach(model, opt, sinks=[sink], log_every_n_steps=1, activations=False)
    for step in range(60):
        if step == 3:
            model[0].requires_grad_(False)
        opt.zero_grad(set_to_none=set_to_none)
        torch.nn.functional.mse_loss(model(torch.ones(4, 4)), torch.zeros(4, 3)).backward()
        opt.step()
    assert guard.layers == ["0", "2", "4"]  # still held by the optimizer: still a layer
    logged = sink.scalars["gradguard/grad_norm/0"]
    if set_to_none:
        # No gradient from step 3 on: nothing is reported for the frozen layer.
        assert [s for s, _ in logged] == [0, 1, 2]
    else:
        # zero_grad(set_to_none=False) leaves a zero gradient that Adam still steps with
        # (its momentum keeps moving the "frozen" layer): 0 is what the optimizer sees.
        assert logged[-1] == (59, 0.0)
        assert sink.latest("gradguard/update_ratio/0") > 0.0
    # Neither case is mistaken for vanishing gradients.
    assert [e.kind for e in guard.events] == []
