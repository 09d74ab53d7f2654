"""W&B charts and alerts from gradguard: a corrupt shard makes 100 steps NaN; you get one alert.

A small classifier trains on synthetic data. From ``--bad-start`` on, ``--bad-steps``
batches in a row carry a NaN (a corrupt shard, as happens with a bad preprocessing job).
With ``on_nonfinite="skip"`` gradguard skips those optimizer steps, so the weights stay
intact; ``WandbSink`` logs gradguard's per-layer charts to the W&B run and sends ONE alert
for the whole NaN storm (per kind, at most one per ``alert_interval``; the next alert
says how many were held back).

Runs offline in a few seconds (no account needed); upload later with the printed
``wandb sync`` line, or set ``WANDB_MODE=online`` to log live. W&B delivers alerts to
Slack or e-mail as set in your W&B user settings.

    python examples/wandb_alerts.py
    python examples/wandb_alerts.py --bad-steps 0     # a healthy run: no alert
"""

from __future__ import annotations

import argparse
import os

import torch
import wandb
from gradguard.integrations.wandb import WandbSink
from torch import nn

import gradguard as gg


def make_data(samples: int = 4096, features: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and the labels a fixed random 'teacher' network gives them."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(samples, features, generator=generator)
    y = (x @ torch.randn(features, 4, generator=generator)).argmax(dim=1)
    return x, y


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--bad-start", type=int, default=120, help="first NaN batch")
    parser.add_argument("--bad-steps", type=int, default=100, help="NaN batches in a row")
    parser.add_argument("--dir", default=".", help="where the W&B run directory goes")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    x, y = make_data()
    model = nn.Sequential(
        nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4)
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    mode = os.environ.get("WANDB_MODE", "offline")
    run = wandb.init(project="gradguard-examples", dir=args.dir, mode=mode)  # type: ignore[arg-type]
    sink = WandbSink(alert_interval=600)  # logs to wandb.run; errors (NaN/Inf) alert

    bad = range(args.bad_start, args.bad_start + args.bad_steps)
    with gg.attach(
        model, optimizer, on_nonfinite="skip", log_every_n_steps=20, sinks=[sink]
    ) as guard:
        batches = torch.Generator().manual_seed(1)
        for step in range(args.steps):
            idx = torch.randint(0, x.shape[0], (64,), generator=batches)
            inputs = x[idx].clone()
            if step in bad:
                inputs[3, 7] = float("nan")  # one corrupt value per batch is enough
            loss = nn.functional.cross_entropy(model(inputs), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            run.log({"loss": loss.item()})  # your own metrics: gradguard's rows do not clash
    sync_dir = run.settings.sync_dir
    run.finish()

    accuracy = (model(x).argmax(dim=1) == y).float().mean().item()
    print(f"optimizer steps: {guard.step}, skipped by gradguard (NaN/Inf): {guard.skipped_steps}")
    print(
        f"weights finite: {all(bool(torch.isfinite(p).all()) for p in model.parameters())}; "
        f"training accuracy: {100 * accuracy:.1f}%"
    )
    print(f"W&B alerts sent: {len(sink.alerts)}")
    for alert in sink.alerts:
        print(f"\n[{alert['level']}] {alert['title']}\n{alert['text']}")
    if mode == "offline":
        print(
            f"\nThe run was saved offline. Upload it (charts and alerts) with:\n"
            f"  wandb sync {sync_dir}"
        )


if __name__ == "__main__":
    main()
