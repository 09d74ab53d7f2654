"""gradguard under automatic mixed precision (AMP).

On a CPU this runs the forward pass under ``torch.autocast`` in bfloat16. bf16 keeps
float32's exponent range, so it needs no loss scaling: gradguard sees ordinary gradients.

On a CUDA GPU (``--device cuda``) it runs float16 with a ``GradScaler``, the usual recipe:

    scaler.scale(loss).backward()
    scaler.step(optimizer)     # unscales, then calls optimizer.step() unless it found Inf/NaN
    scaler.update()

What gradguard sees there:
- It runs inside ``optimizer.step()``, so it always measures UNSCALED gradients: the
  scaler unscales before calling ``step`` on ordinary optimizers, and with a fused
  optimizer (``fused=True``, used below) gradguard divides its norms by the scaler's
  ``grad_scale`` itself. Logged norms are never multiplied by the loss scale (~65536).
- A step the scaler skips (it found Inf/NaN after an overflow) never calls
  ``optimizer.step()``: gradguard does not see it and does not count it. That is the
  scaler doing its job, not a gradient problem.

Run it:

    python examples/amp.py                  # CPU, bf16, a few seconds
    python examples/amp.py --device cuda    # GPU, fp16 + GradScaler + fused AdamW
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import gradguard as gg


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="gradguard under AMP")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args(argv)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    on_gpu = device == "cuda"
    amp_dtype = torch.float16 if on_gpu else torch.bfloat16

    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 32, generator=generator)
    y = (x @ torch.randn(32, 8, generator=generator)).argmax(dim=1)
    x, y = x.to(device), y.to(device)

    model = nn.Sequential(
        nn.Linear(32, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 8)
    ).to(device)
    # Fused AdamW on the GPU: the scaler then leaves the unscaling to the optimizer kernel.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=on_gpu)
    scaler = torch.amp.GradScaler("cuda") if on_gpu else None
    memory = gg.MemorySink()
    guard = gg.attach(
        model, optimizer, clip=gg.ZClip(), on_nonfinite="skip", log_every_n_steps=20, sinks=[memory]
    )

    batches = torch.Generator().manual_seed(1)
    for _ in range(args.steps):
        idx = torch.randint(0, x.shape[0], (128,), generator=batches).to(device)
        with torch.autocast(device_type=device, dtype=amp_dtype):
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
    guard.detach()

    print(f"device: {device}, autocast dtype: {str(amp_dtype).removeprefix('torch.')}")
    if scaler is not None:
        print(f"GradScaler scale at the end: {scaler.get_scale():.0f}")
    print(guard.report())
    with torch.no_grad(), torch.autocast(device_type=device, dtype=amp_dtype):
        accuracy = (model(x).argmax(dim=1) == y).float().mean().item()
    print(
        f"optimizer steps seen by gradguard: {guard.step}; training accuracy {100 * accuracy:.1f}%"
    )
    norm = memory.latest("gradguard/grad_norm_total")
    print(f"last logged total grad norm (unscaled): {norm:.4f}")


if __name__ == "__main__":
    main()
