"""Shared test settings.

The suite runs on 2-core machines (CI) with pytest-xdist's two workers; one intra-op thread
per worker keeps them from fighting over the cores (3-4x faster than oversubscribing).
"""

from __future__ import annotations

import os

import torch

if os.environ.get("GRADGUARD_TEST_THREADS", "1") != "0":
    torch.set_num_threads(int(os.environ.get("GRADGUARD_TEST_THREADS", "1")))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("MPLBACKEND", "Agg")
