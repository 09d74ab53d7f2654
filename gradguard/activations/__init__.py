"""Activation health: dead units and saturated sigmoid/tanh outputs, sampled in windows."""

from __future__ import annotations

from .monitor import ActivationMonitor

__all__ = ["ActivationMonitor"]
