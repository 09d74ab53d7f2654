"""What gradguard says: the advice catalogue, ``guard.summary()`` and ``guard.report()``."""

from __future__ import annotations

from .summary import build_summary
from .text import build_report

__all__ = ["build_report", "build_summary"]
