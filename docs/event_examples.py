"""Real Event text for the docs: one small training run per Event kind.

Each scenario trains a tiny model on scikit-learn's bundled digits (no download) with a
known problem, with gradguard attached, and keeps the first Event of the kind it is
meant to show. The text of each Event (``str(event)``: message and advice, exactly as
gradguard wrote them, wrapped at 76 columns) goes to ``docs/snippets/events/<name>.txt``,
which the Troubleshooting and Metrics pages include. Regenerate after changing any
wording in gradguard:

    make docs-examples        # or: python docs/event_examples.py

CPU only, about half a minute.
"""

from __future__ import annotations

import math
import sys
import textwrap
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from sklearn.datasets import load_digits
from torch import nn

import gradguard as gg

OUT = Path(__file__).with_name("snippets") / "events"


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    return x, torch.tensor(data.target)


def mlp(sizes: list[int], act: Callable[[], nn.Module]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    steps: int,
    kind: str,
    *,
    corrupt: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
    before_step: Callable[[int], None] | None = None,
    input_scale: float = 1.0,
    feed_loss: bool = False,
    **options: object,
) -> gg.Event:
    """Train ``steps`` steps and return the first Event of ``kind``.

    ``before_step(step)`` runs between the backward pass and ``optimizer.step()``;
    ``input_scale`` multiplies the (standardised) inputs; ``feed_loss`` hands the loss to
    ``guard.observe_loss``, as the Lightning and Hugging Face callbacks do.
    """
    x, y = digits()
    x = x * input_scale
    batches = torch.Generator().manual_seed(1)
    sink = gg.MemorySink()
    dtype = next(model.parameters()).dtype
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gg.GradGuardWarning)
        with gg.attach(model, optimizer, sinks=[sink], log_every_n_steps=10, **options) as guard:
            for step in range(steps):
                idx = torch.randint(0, x.shape[0], (64,), generator=batches)
                logits = model(x[idx].to(dtype)).float()
                loss = nn.functional.cross_entropy(logits, y[idx])
                if corrupt is not None:
                    loss = corrupt(step, loss)
                if feed_loss:
                    guard.observe_loss(loss)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if before_step is not None:
                    before_step(step)
                optimizer.step()
    found = [event for event in sink.events if event.kind == kind]
    if not found:
        raise SystemExit(f"scenario for {kind!r} produced no such Event: {sink.events}")
    return found[0]


def nonfinite_loss() -> gg.Event:
    """A corrupt batch at step 150 turns the loss, so every gradient, NaN (default policy)."""
    torch.manual_seed(0)
    model = mlp([64, 128, 128, 10], nn.ReLU)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def corrupt(step: int, loss: torch.Tensor) -> torch.Tensor:
        return loss * float("nan") if step == 150 else loss

    return train(model, opt, 200, "nonfinite", corrupt=corrupt)


class WhereSqrt(nn.Module):
    """A classic bug: the forward pass is finite, but the gradient of the branch that
    ``torch.where`` did not pick (sqrt of a negative number: NaN) still flows back as
    0 * NaN = NaN into every layer below."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.where(x > 0, torch.sqrt(x), torch.zeros_like(x))


def nonfinite_layer() -> gg.Event:
    """NaN gradients below a ``torch.where(x > 0, sqrt(x), 0)``, with on_nonfinite="skip"."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), WhereSqrt(), nn.Linear(64, 10)
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return train(model, opt, 20, "nonfinite", on_nonfinite="skip")


def spike() -> gg.Event:
    """A healthy MLP; at step 250 one batch's loss is 1000x too large (a bad batch)."""
    torch.manual_seed(0)
    model = mlp([64, 128, 64, 10], nn.ReLU)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def corrupt(step: int, loss: torch.Tensor) -> torch.Tensor:
        return loss * 1000.0 if step == 250 else loss

    return train(model, opt, 300, "spike", corrupt=corrupt)


def vanishing() -> gg.Event:
    """Ten sigmoid layers with PyTorch's default init (the demo's broken model)."""
    torch.manual_seed(0)
    model = mlp([64] + [32] * 10 + [10], nn.Sigmoid)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    return train(model, opt, 100, "vanishing")


def exploding() -> gg.Event:
    """Eight ReLU layers initialised 3x larger than He init, Adam."""
    torch.manual_seed(0)
    model = mlp([64] + [64] * 8 + [10], nn.ReLU)
    with torch.no_grad():
        for layer in model:
            if isinstance(layer, nn.Linear):
                nn.init.normal_(layer.weight, std=3 * math.sqrt(2 / layer.in_features))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    return train(model, opt, 100, "exploding")


def dead_units() -> gg.Event:
    """Three ReLU layers whose biases start at -1.5."""
    torch.manual_seed(0)
    model = mlp([64, 128, 128, 128, 10], nn.ReLU)
    with torch.no_grad():
        for layer in list(model)[:-1]:
            if isinstance(layer, nn.Linear):
                nn.init.constant_(layer.bias, -1.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return train(model, opt, 50, "dead_units")


def saturation() -> gg.Event:
    """A tanh MLP whose weights are 10x PyTorch's default scale."""
    torch.manual_seed(0)
    model = mlp([64, 64, 64, 64, 10], nn.Tanh)
    with torch.no_grad():
        for layer in list(model)[:-1]:
            if isinstance(layer, nn.Linear):
                layer.weight.mul_(10.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    return train(model, opt, 50, "saturation")


def loss_spike() -> gg.Event:
    """A healthy MLP, the loss handed over; at step 150 one batch's loss is 20x too large."""
    torch.manual_seed(0)
    model = mlp([64, 128, 64, 10], nn.ReLU)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def corrupt(step: int, loss: torch.Tensor) -> torch.Tensor:
        return loss * 20.0 if step == 150 else loss

    return train(model, opt, 200, "loss_spike", corrupt=corrupt, feed_loss=True)


def divergence() -> gg.Event:
    """The loss handed over; from step 100 on the learning rate grows 10% a step (a
    schedule gone wrong), so the loss climbs steadily instead of jumping."""
    torch.manual_seed(0)
    model = mlp([64, 128, 64, 10], nn.ReLU)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def grow_lr(step: int) -> None:
        if step >= 100:
            for group in opt.param_groups:
                group["lr"] *= 1.1

    return train(model, opt, 250, "divergence", before_step=grow_lr, feed_loss=True)


def update_spike() -> gg.Event:
    """A healthy MLP under Adam; at step 150 one step runs at 100x the learning rate.
    ``UpdateSpikeDetector(every_n_steps=1)`` measures every step's update ratios."""
    torch.manual_seed(0)
    model = mlp([64, 128, 64, 10], nn.ReLU)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def jolt(step: int) -> None:
        for group in opt.param_groups:
            group["lr"] = 0.1 if step == 150 else 1e-3

    detectors = [d for d in gg.default_detectors() if not isinstance(d, gg.UpdateSpikeDetector)]
    detectors.append(gg.UpdateSpikeDetector(every_n_steps=1))
    return train(model, opt, 200, "update_spike", before_step=jolt, detectors=detectors)


def clipped_elsewhere() -> gg.Event:
    """``clip_grad_norm_(params, 0.5)`` called before ``optimizer.step()``: gradguard
    measures the clipped gradients."""
    torch.manual_seed(0)
    model = mlp([64, 128, 64, 10], nn.ReLU)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)

    def clip(step: int) -> None:
        nn.utils.clip_grad_norm_(model.parameters(), 0.5)

    return train(model, opt, 100, "clipped_elsewhere", before_step=clip)


class LogFeatures(nn.Module):
    """A bug: ``log`` of features that can be negative (NaN in the forward pass)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log(x)


def nonfinite_source() -> gg.Event:
    """``torch.log`` of a Linear layer's output (negative entries make NaN), with
    ``on_nonfinite="skip"``: the forensics trace the next forward pass."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), LogFeatures(), nn.Linear(64, 10))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return train(model, opt, 10, "nonfinite_source", on_nonfinite="skip")


def overflow_risk() -> gg.Event:
    """A float16 MLP one of whose first-layer units has a bias of 60,000 (fp16 max: 65,504)."""
    torch.manual_seed(0)
    model = mlp([64, 64, 64, 10], nn.ReLU)
    with torch.no_grad():
        model[0].bias[0] = 60_000.0
        model[2].weight.mul_(1e-3)  # keeps the next layer's outputs finite
    model = model.half()
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    return train(model, opt, 20, "overflow_risk")


def symmetric_units() -> gg.Event:
    """Hidden layers whose weights start at a constant (0.01) and biases at 0."""
    torch.manual_seed(0)
    model = mlp([64, 64, 64, 64, 10], nn.ReLU)
    with torch.no_grad():
        for layer in list(model)[2:-1]:
            if isinstance(layer, nn.Linear):
                nn.init.constant_(layer.weight, 0.01)
                nn.init.zeros_(layer.bias)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return train(model, opt, 60, "symmetric_units")


def lr_too_high() -> gg.Event:
    """Adam at a learning rate of 0.05 (about 50x what this MLP needs)."""
    torch.manual_seed(0)
    model = mlp([64, 128, 128, 10], nn.ReLU)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    return train(model, opt, 200, "lr_too_high", feed_loss=True)


def input_scale() -> gg.Event:
    """The inputs are 50x their standardised scale (forgotten normalisation)."""
    torch.manual_seed(0)
    model = mlp([64, 128, 64, 10], nn.ReLU)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    return train(model, opt, 60, "input_scale", input_scale=50.0)


SCENARIOS: dict[str, Callable[[], gg.Event]] = {
    "nonfinite-loss": nonfinite_loss,
    "nonfinite-layer": nonfinite_layer,
    "spike": spike,
    "vanishing": vanishing,
    "exploding": exploding,
    "dead_units": dead_units,
    "saturation": saturation,
    "loss_spike": loss_spike,
    "divergence": divergence,
    "update_spike": update_spike,
    "clipped_elsewhere": clipped_elsewhere,
    "nonfinite_source": nonfinite_source,
    "overflow_risk": overflow_risk,
    "symmetric_units": symmetric_units,
    "lr_too_high": lr_too_high,
    "input_scale": input_scale,
}


def render(event: gg.Event) -> str:
    """``str(event)`` wrapped, then the fields a program would read."""
    body = textwrap.fill(str(event), width=76, break_on_hyphens=False, break_long_words=False)
    layers = ", ".join(event.layers[:4]) + (" ..." if len(event.layers) > 4 else "")
    fields = (
        f"kind={event.kind}  severity={event.severity}  value={event.value:.4g}  layers=({layers})"
    )
    return f"{body}\n\n{fields}\n"


def main() -> None:
    torch.set_num_threads(1)
    OUT.mkdir(parents=True, exist_ok=True)
    wanted = sys.argv[1:] or list(SCENARIOS)
    for name in wanted:
        scenario = SCENARIOS[name]
        text = render(scenario())
        (OUT / f"{name}.txt").write_text(text)
        print(f"--- {name}\n{text}")


if __name__ == "__main__":
    main()
