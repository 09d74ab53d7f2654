"""Tiny LightningModules, data and probes shared by the Lightning adapter tests (CPU, seconds)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from tests.models import digits, mlp


def digits_loader(batch_size: int = 64) -> DataLoader[tuple[torch.Tensor, ...]]:
    x, y = digits()
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


class DigitsModule(pl.LightningModule):
    """A 64-32-10 ReLU MLP on digits; optionally a NaN or a 20x loss at one global step."""

    def __init__(
        self,
        *,
        optimizer: str = "adam",
        lr: float = 1e-2,
        fused: bool = False,
        nan_at: int | None = None,
        spike_at: int | None = None,
    ) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = mlp([64, 32, 10])
        self.optimizer_name = optimizer
        self.lr = lr
        self.fused = fused
        self.nan_at = nan_at
        self.spike_at = spike_at

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        if self.nan_at is not None and self.global_step == self.nan_at:
            loss = loss * float("nan")  # a bad batch: every gradient of this step is NaN
        if self.spike_at is not None and self.global_step == self.spike_at:
            loss = loss * 20.0  # a finite spike: the gradient norm jumps 20x
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_name == "sgd":
            return torch.optim.SGD(self.parameters(), lr=self.lr)
        if self.optimizer_name == "lbfgs":
            return torch.optim.LBFGS(self.parameters(), lr=self.lr, max_iter=5)
        return torch.optim.Adam(self.parameters(), lr=self.lr, fused=self.fused or None)


class ManualModule(pl.LightningModule):
    """Manual optimisation; ``two_optimizers``: an encoder and a head, each its own optimizer."""

    def __init__(self, *, two_optimizers: bool = False, lr: float = 1.0) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.automatic_optimization = False
        self.encoder = nn.Sequential(nn.Linear(64, 32), nn.ReLU())
        self.head = nn.Linear(32, 10)
        self.two_optimizers = two_optimizers
        self.lr = lr

    def training_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        optimizers = self.optimizers()
        opts = optimizers if isinstance(optimizers, list) else [optimizers]
        for opt in opts:
            opt.zero_grad()
        loss = F.cross_entropy(self.head(self.encoder(x)), y)
        self.manual_backward(loss)
        for opt in opts:
            opt.step()

    def configure_optimizers(self) -> Any:
        if self.two_optimizers:
            return [
                torch.optim.SGD(self.encoder.parameters(), lr=self.lr),
                torch.optim.Adam(self.head.parameters(), lr=1e-2),
            ]
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class GradProbe(pl.Callback):
    """Placed BEFORE GradGuardCallback: records the total gradient norm gradguard will see."""

    def __init__(self) -> None:
        self.norms: dict[int, float] = {}
        self.calls = 0

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self.calls += 1
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        per_tensor = torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])
        self.norms[trainer.global_step] = float(torch.linalg.vector_norm(per_tensor))


def trainer(tmp_path: Path, **overrides: Any) -> pl.Trainer:
    """A small CPU Trainer: no progress bar, no summary, no checkpoints or logger unless asked."""
    options: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "max_steps": 4,
        "max_epochs": -1,
        "log_every_n_steps": 1,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "logger": False,
        "default_root_dir": str(tmp_path),
    }
    options.update(overrides)
    return pl.Trainer(**options)


def params_of(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def same_state(a: Any, b: Any) -> bool:
    """Deep equality for state dicts holding tensors (NaN equals NaN)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return False
        a, b = a.detach().cpu(), b.detach().cpu()
        if a.shape != b.shape or a.dtype != b.dtype or not torch.equal(a.isnan(), b.isnan()):
            return False
        return bool(torch.equal(torch.where(a.isnan(), 0, a), torch.where(b.isnan(), 0, b)))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_state(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float) and a != a and b != b:
        return True
    return bool(a == b)


Snapshot = tuple[dict[str, torch.Tensor], dict[Any, dict[str, Any]]]


class StepSnapshot(pl.Callback):
    """Weights and optimizer state just before and just after the optimizer step at ``at``."""

    def __init__(self, at: int) -> None:
        self.at = at
        self.before: Snapshot | None = None
        self.after: Snapshot | None = None

    @staticmethod
    def _capture(trainer: pl.Trainer, module: pl.LightningModule) -> Snapshot:
        state = trainer.optimizers[0].state_dict()["state"]
        copied = {
            k: {n: v.clone() if isinstance(v, torch.Tensor) else v for n, v in s.items()}
            for k, s in state.items()
        }
        return params_of(module), copied

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self.at:
            self.before = self._capture(trainer, pl_module)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if trainer.global_step == self.at + 1 and self.after is None:
            self.after = self._capture(trainer, pl_module)

    def unchanged(self) -> bool:
        """Weights and optimizer state (moments, step counters) identical across the step."""
        assert self.before is not None and self.after is not None, "the step never ran"
        (weights_before, state_before), (weights_after, state_after) = self.before, self.after
        if not all(torch.equal(v, weights_after[k]) for k, v in weights_before.items()):
            return False
        return state_before.keys() == state_after.keys() and all(
            torch.equal(torch.as_tensor(value), torch.as_tensor(state_after[index][key]))
            for index, param_state in state_before.items()
            for key, value in param_state.items()
        )
