"""gradguard in a plain accelerate loop: attach to what ``accelerator.prepare`` returns.

A small MLP learns a synthetic classification task with gradient accumulation (4
micro-batches per optimizer step). ``gg.attach(model, optimizer)`` works on accelerate's
``AcceleratedOptimizer``; gradguard runs once per real optimizer step, when the
accumulated gradients are complete. Let gradguard do the clipping (``clip=``): an
``accelerator.clip_grad_norm_`` call before the step clips before gradguard measures,
and gradguard says so. Try it:

    python examples/accelerate_loop.py                            # gradguard clips
    python examples/accelerate_loop.py --accelerator-clip 0.5     # accelerate clips
"""

from __future__ import annotations

import argparse

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import gradguard as gg


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--accelerator-clip", type=float, default=None)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 20, generator=generator)
    y = (x @ torch.randn(20, 4, generator=generator)).argmax(dim=1)
    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=4)
    model = nn.Sequential(
        nn.Linear(20, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 4)
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    clip = None if args.accelerator_clip is not None else gg.AutoClip(percentile=10.0)
    with gg.attach(model, optimizer, clip=clip, on_nonfinite="skip") as guard:
        for _ in range(args.epochs):
            for inputs, targets in loader:
                with accelerator.accumulate(model):
                    accelerator.backward(nn.functional.cross_entropy(model(inputs), targets))
                    if args.accelerator_clip is not None and accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(model.parameters(), args.accelerator_clip)
                    optimizer.step()  # gradguard runs here, on the last micro-batch only
                    optimizer.zero_grad()
    print(guard.report())
    micro_batches = args.epochs * len(loader)
    print(f"micro-batches: {micro_batches}; optimizer steps seen by gradguard: {guard.step}")
    print(f"Events: {[e.kind for e in guard.events]}")


if __name__ == "__main__":
    main()
