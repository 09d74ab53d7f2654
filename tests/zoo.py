"""A zoo of small models with known gradient pathologies, and healthy ones, for detector tests.

Every case trains a small model on scikit-learn's bundled digits, synthetic sequences or
Python source text for a few hundred CPU steps; the healthy side includes real architectures
(``zoo_real.py``: nanoGPT, a ResNet with BatchNorm, a char LSTM, a ViT). Reuse it::

    from tests.zoo import CASES, run_case
    guard, sink = run_case("deep_sigmoid", activations=False)

Print the confusion table (every case at default settings, on one CPU thread)::

    python -m tests.zoo            # the loss handed over, as the Lightning callback does
    python -m tests.zoo --no-loss  # a plain loop that never calls guard.observe_loss

``CASES`` maps a name to a ``Case``: how to build it, which Event kind it must produce
(``None`` for a healthy model, which must produce no warning at all) and which layers that
Event must name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

import gradguard as gg
from tests.zoo_workloads import (
    Workload,
    constant_init,
    dead_relu,
    deep_linear_large_init,
    deep_sigmoid,
    healthy_cnn,
    healthy_gpt,
    healthy_lstm,
    healthy_mlp,
    healthy_resnet,
    healthy_transformer,
    healthy_vit,
    mixed_feature_scales,
    raw_pixels,
    rnn_large_recurrent,
    saturated_tanh,
    tanh_adam_high_lr,
)

__all__ = [
    "BROKEN",
    "CASES",
    "HEALTHY",
    "Case",
    "Workload",
    "build",
    "confusion_table",
    "run_case",
]


@dataclass(frozen=True)
class Case:
    """One entry of the zoo.

    ``expected`` is the Event kind the case must raise (``None``: healthy, no warning may
    fire); ``layers`` are layer names the Event must name, and ``first`` the names of which
    one must come first (the worst layer) when it is not empty.
    """

    name: str
    builder: Callable[[int], Workload]
    steps: int
    expected: str | None
    layers: tuple[str, ...] = ()
    first: tuple[str, ...] = ()
    description: str = ""


# ---------------------------------------------------------------------------- the zoo
CASES: dict[str, Case] = {
    case.name: case
    for case in [
        Case(
            "deep_sigmoid",
            deep_sigmoid,
            150,
            "vanishing",
            first=("0", "2"),
            description="10 sigmoid layers, default init",
        ),
        Case(
            "deep_linear_large_init",
            deep_linear_large_init,
            150,
            "exploding",
            description="12 linear layers, init 2.5x too large",
        ),
        Case(
            "rnn_large_recurrent",
            rnn_large_recurrent,
            150,
            "exploding",
            first=("inp", "rnn"),
            description="tanh RNN over 100 steps, recurrent gain 2.5",
        ),
        Case(
            "dead_relu",
            dead_relu,
            120,
            "dead_units",
            layers=("0", "2", "4"),
            description="ReLU MLP, hidden biases -5",
        ),
        Case(
            "saturated_tanh",
            saturated_tanh,
            120,
            "saturation",
            layers=("0", "2", "4"),
            description="tanh MLP, weights x10",
        ),
        Case(
            "constant_init",
            constant_init,
            200,
            "symmetric_units",
            layers=("2", "4"),
            description="ReLU MLP, weights = 0.05",
        ),
        Case(
            "raw_pixels",
            raw_pixels,
            150,
            "input_scale",
            layers=("0",),
            description="ReLU MLP on 0-255 pixels",
        ),
        Case(
            "mixed_feature_scales",
            mixed_feature_scales,
            150,
            "input_scale",
            layers=("0",),
            description="features scaled 1e-3..10",
        ),
        Case(
            "tanh_adam_high_lr",
            tanh_adam_high_lr,
            300,
            "lr_too_high",
            description="8 tanh layers, Adam lr 0.05",
        ),
        Case("healthy_mlp", healthy_mlp, 300, None, description="He-init ReLU MLP, Adam"),
        Case("healthy_cnn", healthy_cnn, 300, None, description="CNN + BatchNorm, SGD momentum"),
        Case(
            "healthy_transformer",
            healthy_transformer,
            300,
            None,
            description="2-layer TransformerEncoder (GELU), AdamW",
        ),
        Case("healthy_gpt", healthy_gpt, 300, None, description="nanoGPT, char-level, AdamW"),
        Case("healthy_resnet", healthy_resnet, 300, None, description="ResNet + BatchNorm, SGD"),
        Case("healthy_lstm", healthy_lstm, 300, None, description="char-level LSTM LM, Adam"),
        Case("healthy_vit", healthy_vit, 300, None, description="pre-LN ViT on digits, AdamW"),
    ]
}
BROKEN = tuple(name for name, case in CASES.items() if case.expected is not None)
HEALTHY = tuple(name for name, case in CASES.items() if case.expected is None)


def build(name: str, seed: int = 0) -> Workload:
    """A fresh model, optimizer and batch source for the named case."""
    return CASES[name].builder(seed)


def run_case(
    name: str,
    steps: int | None = None,
    *,
    seed: int = 0,
    observe_loss: bool = True,
    **guard_kwargs: Any,
) -> tuple[gg.GradGuard, gg.MemorySink]:
    """Train the named case under a GradGuard built from ``guard_kwargs`` (defaults otherwise).

    ``observe_loss``: hand each step's loss to the guard (``guard.observe_loss``), as the
    Lightning callback does by itself; a plain loop that does not call it is the other
    default. Returns the guard (still attached, so ``report()`` sees the layers) and a
    MemorySink that received every scalar and Event.
    """
    case = CASES[name]
    work = case.builder(seed)
    sink = gg.MemorySink()
    sinks = [sink, *guard_kwargs.pop("sinks", ())]
    guard = gg.attach(work.model, work.optimizer, sinks=sinks, **guard_kwargs)
    work.model.train()
    for _ in range(case.steps if steps is None else steps):
        work.optimizer.zero_grad(set_to_none=True)
        loss = work.loss()
        if observe_loss:
            guard.observe_loss(loss)
        loss.backward()
        work.optimizer.step()
        if work.scheduler is not None:
            work.scheduler.step()
    return guard, sink


# Column headers of the confusion table (Event kinds, shortened to fit).
_SHORT = {
    "nonfinite": "nonfinite",
    "nonfinite_source": "nan_src",
    "overflow_risk": "overflow",
    "loss_spike": "loss_spk",
    "divergence": "diverging",
    "update_spike": "upd_spike",
    "spike": "spike",
    "symmetric_units": "symmetric",
    "lr_too_high": "lr_high",
    "input_scale": "inputs",
    "clipped_elsewhere": "clip_else",
    "vanishing": "vanishing",
    "exploding": "exploding",
    "dead_units": "dead",
    "saturation": "saturated",
}


def confusion_table(events: dict[str, list[str]], warned: dict[str, bool]) -> str:
    """Rows: cases; columns: Event kinds (counts); last column: whether the row is right
    (a broken case raised its kind; a healthy one raised nothing and warned nothing).

    ``events``: case -> the kinds of its Events; ``warned``: case -> any warning issued.
    """
    from gradguard._events import EVENT_KINDS

    head = f"{'case':<22} {'expected':<16}" + "".join(
        f"{_SHORT.get(k, k)[:10]:>10}" for k in EVENT_KINDS
    )
    lines = [head + "  verdict", "-" * (len(head) + 9)]
    for name, kinds in events.items():
        case = CASES[name]
        counts = {k: kinds.count(k) for k in EVENT_KINDS}
        if case.expected is None:
            right = not kinds and not warned[name]
        else:
            right = counts.get(case.expected, 0) > 0
        cells = "".join(f"{counts[k] if counts[k] else '.':>10}" for k in EVENT_KINDS)
        expected = case.expected or "healthy"
        lines.append(f"{name:<22} {expected:<16}{cells}  {'ok' if right else 'WRONG'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Run every case at default settings and print the confusion table."""
    import argparse
    import time
    import warnings

    parser = argparse.ArgumentParser(description="The pathology zoo's confusion table.")
    parser.add_argument("--no-loss", action="store_true", help="do not hand the loss over")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    events: dict[str, list[str]] = {}
    warned: dict[str, bool] = {}
    start = time.perf_counter()
    for name in CASES:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            guard, sink = run_case(name, seed=args.seed, observe_loss=not args.no_loss)
            guard.detach()
        events[name] = [event.kind for event in sink.events]
        warned[name] = bool(caught)
    loss = "not handed over" if args.no_loss else "handed over (guard.observe_loss)"
    print(
        f"gradguard {gg.__version__}, torch {torch.__version__}, 1 CPU thread, seed {args.seed},"
        f" default settings, loss {loss}; {time.perf_counter() - start:.0f} s\n"
    )
    print(confusion_table(events, warned))


if __name__ == "__main__":
    main()
