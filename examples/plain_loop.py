"""gradguard in a plain PyTorch training loop: one line to attach, nothing else changes.

The loop below trains a small classifier on synthetic data. At ``--poison-step`` one
input sample is corrupted with a NaN, as a bad record in a real data set would be: the
loss and every gradient of that step turn NaN. With ``on_nonfinite="skip"`` gradguard
skips that optimizer step, so the weights stay finite and training carries on; AutoClip
clips the gradient norm to the 10th percentile of the norms seen so far.

Run it (CPU, a few seconds):

    python examples/plain_loop.py
    python examples/plain_loop.py --steps 500 --poison-step -1   # no bad sample
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import gradguard as gg


def make_data(samples: int = 4096, features: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and the labels a fixed random 'teacher' network gives them."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(samples, features, generator=generator)
    teacher = torch.randn(features, 4, generator=generator)
    y = (x @ teacher).argmax(dim=1)
    return x, y


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--poison-step", type=int, default=150, help="-1: no bad sample")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    x, y = make_data()
    model = nn.Sequential(
        nn.Linear(20, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 4)
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    memory = gg.MemorySink()  # keeps every logged scalar and Event in memory

    # The one gradguard line. The defaults only observe; these options make it act.
    with gg.attach(
        model,
        optimizer,
        clip=gg.AutoClip(percentile=10.0),
        on_nonfinite="skip",
        log_every_n_steps=25,
        sinks=[memory],  # also: gg.LoggingSink(), TensorBoardSink, WandbSink
    ) as guard:
        batches = torch.Generator().manual_seed(1)
        for step in range(args.steps):
            idx = torch.randint(0, x.shape[0], (64,), generator=batches)
            inputs, targets = x[idx].clone(), y[idx]
            if step == args.poison_step:
                inputs[0, 0] = float("nan")  # a corrupt record
            loss = nn.functional.cross_entropy(model(inputs), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()  # gradguard runs here, in the optimizer's step hooks
    # Leaving the `with` block detached every hook gradguard added.

    print(guard.report())
    finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    accuracy = (model(x).argmax(dim=1) == y).float().mean().item()
    print(f"optimizer steps: {guard.step}, skipped by gradguard: {guard.skipped_steps}")
    print(f"weights finite: {finite}; training accuracy: {100 * accuracy:.1f}%")
    print(f"last logged total grad norm: {memory.latest('gradguard/grad_norm_total'):.4f}")
    print(f"last AutoClip threshold: {memory.latest('gradguard/clip/threshold'):.4f}")


if __name__ == "__main__":
    main()
