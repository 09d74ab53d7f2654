"""Two models, two optimizers, two guards (a GAN): each guard watches its own model, and a
stateful part (clip strategy, detector) given to both is refused at the second attach
with a clear message, leaving nothing behind."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import gradguard as gg
from tests.faults._kit import Snapshot


def _gan() -> tuple[nn.Sequential, nn.Sequential]:
    torch.manual_seed(0)
    generator = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 4))
    discriminator = nn.Sequential(nn.Linear(4, 16), nn.LeakyReLU(0.2), nn.Linear(16, 1))
    return generator, discriminator


def _hooks(model: nn.Module, opt: torch.optim.Optimizer) -> tuple[int, ...]:
    return (
        len(opt._optimizer_step_pre_hooks),
        len(opt._optimizer_step_post_hooks),
        sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()),
    )


def test_a_gan_loop_with_two_guards_and_two_strategies() -> None:
    gen, disc = _gan()
    opt_g = torch.optim.Adam(gen.parameters(), lr=1e-3, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(disc.parameters(), lr=1e-3, betas=(0.5, 0.999))
    sink_g, sink_d = gg.MemorySink(), gg.MemorySink()
    guard_g = gg.attach(gen, opt_g, clip=gg.AGC(), on_nonfinite="skip", sinks=[sink_g],
                        log_every_n_steps=1, warn=False)  # fmt: skip
    guard_d = gg.attach(disc, opt_d, clip=gg.AutoClip(), on_nonfinite="skip", sinks=[sink_d],
                        log_every_n_steps=1, warn=False)  # fmt: skip
    bce = nn.functional.binary_cross_entropy_with_logits
    gen_rng = torch.Generator().manual_seed(3)
    for step in range(8):
        real = torch.randn(16, 4, generator=gen_rng) + 2.0
        noise = torch.randn(16, 2, generator=gen_rng)
        # discriminator step
        opt_d.zero_grad(set_to_none=True)
        fake = gen(noise).detach()
        loss_d = bce(disc(real), torch.ones(16, 1)) + bce(disc(fake), torch.zeros(16, 1))
        loss_d.backward()
        opt_d.step()
        # generator step (its backward also fills the discriminator's grads: not stepped)
        opt_g.zero_grad(set_to_none=True)
        loss_g = bce(disc(gen(noise)), torch.ones(16, 1))
        loss_g.backward()
        if step == 4:
            gen[2].weight.grad[0, 0] = float("nan")  # the generator blows up once
        before_g, before_d = Snapshot(gen, opt_g), Snapshot(disc, opt_d)
        opt_g.step()
        if step == 4:
            assert before_g.weights_equal(gen) and before_g.state_equal(opt_g)
        assert before_d.weights_equal(disc)  # the generator's step never touches D
    assert guard_g.layers == ["0", "2"] and guard_d.layers == ["0", "2"]
    assert guard_g.skipped_steps == 1 and guard_d.skipped_steps == 0
    assert [e.kind for e in guard_g.events] == ["nonfinite"] and list(guard_d.events) == []
    assert guard_g.step == guard_d.step == 8
    # Each sink has its own model's norms.
    assert sink_g.latest("gradguard/grad_norm/2") != sink_d.latest("gradguard/grad_norm/2")


SHARED: dict[str, Callable[[Any], dict[str, Any]]] = {
    "clip=AGC": lambda part: {"clip": part},
    "clip=AutoClip(per_layer)": lambda part: {"clip": part},
    "detectors=[GradientFlowDetector]": lambda part: {"detectors": [part]},
    "spike=SpikeDetector": lambda part: {"spike": part},
    "activations=ActivationMonitor": lambda part: {"activations": part},
}
PARTS: dict[str, Callable[[], Any]] = {
    "clip=AGC": gg.AGC,
    "clip=AutoClip(per_layer)": lambda: gg.AutoClip(per_layer=True),
    "detectors=[GradientFlowDetector]": gg.GradientFlowDetector,
    "spike=SpikeDetector": gg.SpikeDetector,
    "activations=ActivationMonitor": gg.ActivationMonitor,
}


@pytest.mark.parametrize("name", list(SHARED))
def test_one_part_given_to_two_guards_is_refused_and_leaves_nothing(name: str) -> None:
    gen, disc = _gan()
    opt_g = torch.optim.SGD(gen.parameters(), lr=0.1)
    opt_d = torch.optim.SGD(disc.parameters(), lr=0.1)
    part = PARTS[name]()
    options = SHARED[name](part)
    first = gg.attach(gen, opt_g, warn=False, **options)
    bare = _hooks(disc, opt_d)
    second = gg.GradGuard(warn=False, **options)
    role = "clip" if name.startswith("clip") else "detector"
    with pytest.raises(gg.ConfigurationError, match=rf"{role}=.*already serves another GradGuard"):
        second.attach(disc, opt_d)
    assert _hooks(disc, opt_d) == bare and not second.attached
    # The optimizer is not marked as watched: a guard with its own part attaches fine...
    third = gg.attach(disc, opt_d, warn=False, **SHARED[name](PARTS[name]()))
    third.detach()
    # ...and once the first guard lets go, the shared part may serve the second one.
    first.detach()
    second.attach(disc, opt_d)
    second.detach()
