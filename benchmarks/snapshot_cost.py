"""What the recovery ladder's snapshots cost: host memory and time per snapshot, and the
time of a rollback, next to one training step of the same model.

A snapshot (``gg.Recover(snapshot_every=K)``) copies ``model.state_dict()``, the optimizer's
state and the clip history to host memory (pinned, non-blocking, one wait, on CUDA); it is
a host sync, paid on snapshot steps only. Run::

    python benchmarks/snapshot_cost.py --threads 1 --markdown benchmarks/RESULTS-recovery.md
    python benchmarks/snapshot_cost.py --device cuda --markdown benchmarks/RESULTS-recovery-cuda.md
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable
from datetime import datetime, timezone

import torch
from torch import nn

import gradguard as gg
from gradguard.recover.snapshot import Snapshot

MODELS = {"1M": (512, 4), "10M": (1024, 10), "50M": (2048, 12)}


def build(width: int, depth: int, device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers).to(device)


def timed(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median seconds of ``fn`` (the device synchronised around each call)."""
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(name: str, device: torch.device, repeats: int) -> dict[str, float | str]:
    width, depth = MODELS[name]
    model = build(width, depth, device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.randn(64, width, device=device)

    def train_step() -> None:
        opt.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        opt.step()

    train_step()  # Adam's state exists from here on: what a snapshot copies
    params = sum(p.numel() for p in model.parameters())
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    step_s = timed(train_step, device, repeats)
    snapshot = Snapshot.take(0, model, opt, None)
    take_s = timed(lambda: Snapshot.take(0, model, opt, None), device, repeats)
    restore_s = timed(lambda: snapshot.restore(model, opt, None), device, repeats)
    return {
        "model": f"{depth}x Linear({width}) + Adam",
        "params": params,
        "param_mb": param_bytes / 2**20,
        "snapshot_mb": snapshot.nbytes / 2**20,
        "step_ms": step_s * 1e3,
        "take_ms": take_s * 1e3,
        "restore_ms": restore_s * 1e3,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--markdown", default="")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = [measure(name, device, args.repeats) for name in args.models.split(",")]
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    cpu = platform.processor() or platform.machine()
    machine = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{cpu}, torch threads {torch.get_num_threads()}"
    )
    lines = [
        "# gradguard recovery ladder: what a snapshot costs",
        "",
        f"Measured {when} on: {machine}; torch {torch.__version__}, gradguard {gg.__version__}; "
        f"device: {device.type}. Median of {args.repeats} repeats.",
        "",
        "A snapshot copies the model's `state_dict` and the optimizer's state (Adam: two "
        "moments per parameter) to host memory; the ladder holds the last healthy one, plus "
        "for one step the next candidate (peak: twice the column below). A rollback copies "
        "them back. Amortised over `snapshot_every=100` (the default), a snapshot costs the "
        "last column per step.",
        "",
        "| model | parameters | params (MiB) | snapshot (MiB) | train step (ms) | snapshot (ms) "
        "| rollback (ms) | snapshot / step | per step at K=100 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        ratio = float(row["take_ms"]) / float(row["step_ms"])
        lines.append(
            f"| {row['model']} | {int(row['params']):,} | {float(row['param_mb']):.1f} "
            f"| {float(row['snapshot_mb']):.1f} | {float(row['step_ms']):.1f} "
            f"| {float(row['take_ms']):.1f} | {float(row['restore_ms']):.1f} "
            f"| {ratio:.2f}x | {ratio / 100:.1%} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as handle:
            handle.write(text)


if __name__ == "__main__":
    main()
