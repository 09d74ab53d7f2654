"""Importing gradguard stays light: no lightning, transformers, tensorboard, wandb or matplotlib."""

from __future__ import annotations

import subprocess
import sys

HEAVY = (
    "lightning",
    "pytorch_lightning",
    "transformers",
    "accelerate",
    "tensorboard",
    "wandb",
    "matplotlib",
)


def _imported_after(statement: str) -> list[str]:
    code = f"import sys; {statement}; print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return [m for m in out.stdout.strip().split(",") if m]


def test_import_gradguard_imports_no_framework() -> None:
    assert _imported_after("import gradguard") == []


def test_integrations_package_is_importable_without_pulling_frameworks() -> None:
    assert _imported_after("import gradguard.integrations") == []
