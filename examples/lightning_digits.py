"""gradguard in a Lightning Trainer: one line, ``callbacks=[GradGuardCallback(...)]``.

A small MLP learns scikit-learn's bundled 8x8 digits (no download). One batch carries a
corrupt record (a NaN pixel) at ``--poison-step``: with ``on_nonfinite="skip"`` gradguard
skips that optimizer step, so the weights stay finite and training carries on, and AutoClip
clips to the 10th percentile of the gradient norms seen so far. The metrics go to the
Trainer's own TensorBoard logger, keyed by the global step, next to Lightning's.

Run it (CPU, a few seconds):

    python examples/lightning_digits.py
    tensorboard --logdir lightning_logs     # the gradguard/... charts
"""

from __future__ import annotations

import argparse
from typing import Any

import lightning.pytorch as pl
import torch
from gradguard.integrations.lightning import GradGuardCallback
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import gradguard as gg


def digits_data() -> TensorDataset:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    return TensorDataset(x, torch.tensor(data.target))


class DigitsClassifier(pl.LightningModule):
    def __init__(self, poison_step: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10)
        )
        self.poison_step = poison_step

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        if self.global_step == self.poison_step:
            x = x.clone()
            x[0, 0] = float("nan")  # a corrupt record: this step's loss and gradients are NaN
        loss = F.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-steps", type=int, default=200)
    parser.add_argument("--poison-step", type=int, default=-1, help="-1: halfway")
    parser.add_argument("--log-dir", default="lightning_logs")
    args = parser.parse_args(argv)
    poison_step = args.poison_step if args.poison_step >= 0 else args.max_steps // 2

    pl.seed_everything(0, verbose=False)
    loader = DataLoader(digits_data(), batch_size=64, shuffle=True)
    logger = TensorBoardLogger(save_dir=args.log_dir, name="lightning_digits")

    # The one gradguard line. The defaults only observe; these options make it act.
    guard = GradGuardCallback(clip=gg.AutoClip(percentile=10.0), on_nonfinite="skip")

    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=args.max_steps,
        log_every_n_steps=10,  # gradguard logs on the Trainer's schedule
        logger=logger,
        callbacks=[guard],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(DigitsClassifier(poison_step), loader)  # the poisoned step: a GradGuardWarning

    report: str = guard.report()
    print(report)
    print(f"optimizer steps: {guard.guard.step}, skipped by gradguard: {guard.guard.skipped_steps}")
    print(f"TensorBoard: tensorboard --logdir {args.log_dir}")
    return report


if __name__ == "__main__":
    main()
