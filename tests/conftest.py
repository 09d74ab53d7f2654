"""Shared test settings.

The suite runs on 2-core machines (CI) with pytest-xdist's two workers; one intra-op thread
per worker keeps them from fighting over the cores (3-4x faster than oversubscribing).
"""

from __future__ import annotations

import os

import pytest
import torch

if os.environ.get("GRADGUARD_TEST_THREADS", "1") != "0":
    torch.set_num_threads(int(os.environ.get("GRADGUARD_TEST_THREADS", "1")))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(params=["host", "device"])
def bookkeeping(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a clip test both ways on CPU: the host bookkeeping CPU devices use, and the
    device bookkeeping accelerators use (forced here, so CI exercises the GPU's path)."""
    import gradguard.clip.base as clip_base

    monkeypatch.setattr(clip_base, "HOST_BOOKKEEPING_ON_CPU", request.param == "host")
    return str(request.param)
