"""gradguard in a Lightning Fabric loop: attach to the objects ``fabric.setup`` returns.

A small MLP learns a synthetic classification task under Fabric's ``bf16-mixed`` precision
on the CPU. ``gg.attach(fabric_model, fabric_optimizer, ...)`` works on Fabric's wrappers
(layers keep the names of your model) and runs inside ``optimizer.step()``, after
``fabric.backward``. Let gradguard do the clipping (``clip=``): a ``fabric.clip_gradients``
call before the step clips before gradguard measures, and gradguard says so. Try it:

    python examples/fabric_loop.py                      # gradguard clips (ZClip)
    python examples/fabric_loop.py --fabric-clip 1.0    # Fabric clips: gradguard notices
"""

from __future__ import annotations

import argparse

import torch
from lightning.fabric import Fabric
from torch import nn

import gradguard as gg


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--fabric-clip", type=float, default=None, help="fabric.clip_gradients")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 20, generator=generator)
    y = (x @ torch.randn(20, 4, generator=generator)).argmax(dim=1)

    fabric = Fabric(accelerator="cpu", devices=1, precision="bf16-mixed")
    model = nn.Sequential(
        nn.Linear(20, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 4)
    )
    model, optimizer = fabric.setup(model, torch.optim.AdamW(model.parameters(), lr=3e-3))
    clip = None if args.fabric_clip is not None else gg.ZClip()
    with gg.attach(model, optimizer, clip=clip, log_every_n_steps=50) as guard:
        for _ in range(args.steps):
            idx = torch.randint(0, x.shape[0], (64,), generator=generator)
            loss = nn.functional.cross_entropy(model(x[idx]).float(), y[idx])
            optimizer.zero_grad()
            fabric.backward(loss)
            if args.fabric_clip is not None:
                fabric.clip_gradients(model, optimizer, max_norm=args.fabric_clip)
            optimizer.step()  # gradguard runs here
    print(guard.report())
    print(f"layers: {', '.join(guard.layers)}")
    print(f"optimizer steps: {guard.step}; Events: {[e.kind for e in guard.events]}")


if __name__ == "__main__":
    main()
