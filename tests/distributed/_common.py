"""Models, data and small helpers shared by the distributed tests (workers and references)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

import gradguard as gg
from tests.models import mlp

SIZES = [8, 16, 16, 4]


def make_mlp(seed: int = 0) -> nn.Sequential:
    """The same tiny MLP on every rank and in every reference (same seed)."""
    torch.manual_seed(seed)
    return mlp(SIZES)


def batch(rank: int, step: int, micro: int = 0, size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """A classification batch that differs by rank, step and micro-batch."""
    gen = torch.Generator().manual_seed(1000 * step + 100 * micro + rank)
    x = torch.randn(size, SIZES[0], generator=gen)
    y = torch.randint(0, SIZES[-1], (size,), generator=gen)
    return x, y


def flat_params(model: nn.Module) -> torch.Tensor:
    """Every parameter, unsharded (DTensor.full_tensor) and flattened into one vector."""
    parts = []
    for param in model.parameters():
        full = param.full_tensor() if hasattr(param, "full_tensor") else param
        parts.append(full.detach().reshape(-1))
    return torch.cat(parts)


def max_gap_across_ranks(vector: torch.Tensor) -> float:
    """Largest elementwise difference between this rank's ``vector`` and any other rank's."""
    import torch.distributed as dist

    gathered = [torch.empty_like(vector) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, vector)
    return max(float((other - vector).abs().max()) for other in gathered)


def events_of(events: Any) -> list[dict[str, Any]]:
    return [
        {
            "kind": e.kind,
            "step": e.step,
            "layers": list(e.layers),
            "skipped": e.details.get("skipped"),
        }
        for e in events
    ]


def guard_warnings(caught: list[Any]) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, gg.GradGuardWarning)]


def shared_state(guard: gg.GradGuard) -> dict[str, Any]:
    """The parts of the guard's state that depend on gradients only (not on local data)."""
    state = guard.state_dict()
    keep = (
        "step",
        "skipped_steps",
        "nonfinite_steps",
        "spike_steps",
        "spike",
        "clip",
        "clipped_steps",
        "layer_order",
    )
    return {key: state[key] for key in keep if key in state}


def regression_mlp() -> nn.Sequential:
    """The last layer has ONE output: rank 1's shard of its weight and bias is empty."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 1)
    )


def regression_batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(500 + 10 * step + rank)
    return torch.randn(8, 8, generator=gen), torch.randn(8, 1, generator=gen)


def full_batch(world_size: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's batch together: FSDP's averaged gradient is this batch's gradient."""
    parts = [regression_batch(rank, step) for rank in range(world_size)]
    return torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts])
