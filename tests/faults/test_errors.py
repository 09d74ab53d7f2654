"""Unclear arguments fail at construction with a ``ConfigurationError`` naming the
argument; a closed sink reused later is disabled with a clear warning, training goes on."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

import gradguard as gg
from tests.faults._kit import backward, tiny

BAD_OPTIONS: dict[str, tuple[dict[str, Any], str]] = {
    "sinks=None": ({"sinks": None}, r"sinks=None .*list of sinks"),
    "sinks=MemorySink()": ({"sinks": gg.MemorySink()}, r"sinks=.*sinks=\[MemorySink\(\.\.\.\)\]"),
    "sinks=[MemorySink]": ({"sinks": [gg.MemorySink]}, r"sinks=.*MemorySink.*not the class"),
    "sinks='memory'": ({"sinks": "memory"}, r"sinks='memory' .*list of sinks"),
    "sinks=[object()]": ({"sinks": [object()]}, r"sinks=.*log_scalars, log_event"),
    "detectors=5": ({"detectors": 5}, r"detectors=5 .*list of Detector"),
    "detectors=[object()]": ({"detectors": [object()]}, r"detectors=.*Detector instances"),
    "detectors=[GradientFlowDetector]": (
        {"detectors": [gg.GradientFlowDetector]},
        r"detectors=.*GradientFlowDetector\(\)\], not the class",
    ),
    "clip=gg.AutoClip": ({"clip": gg.AutoClip}, r"clip=.*clip=gg\.AutoClip\(\), not the class"),
    "clip=True": ({"clip": True}, r"clip=True"),
    "activations=ActivationMonitor": (
        {"activations": gg.ActivationMonitor},
        r"activations=.*ActivationMonitor",
    ),
    "spike=SpikeDetector": ({"spike": gg.SpikeDetector}, r"spike=.*SpikeDetector"),
}


@pytest.mark.parametrize("name", list(BAD_OPTIONS))
def test_a_bad_option_is_refused_at_construction_naming_it(name: str) -> None:
    options, message = BAD_OPTIONS[name]
    with pytest.raises(gg.ConfigurationError, match=message):
        gg.GradGuard(**options)


@pytest.mark.parametrize("exclude", [5, None, [""], [3]])
def test_agc_exclude_must_name_layers(exclude: Any) -> None:
    with pytest.raises(gg.ConfigurationError, match=r"exclude=.*layer names"):
        gg.AGC(exclude=exclude)


def test_agc_exclude_of_a_layer_that_does_not_exist_is_refused_at_attach() -> None:
    model = tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(gg.ConfigurationError, match=r"exclude='head' names no layer.*'0'"):
        gg.attach(model, opt, clip=gg.AGC(exclude=("head",)))
    assert not opt._optimizer_step_pre_hooks


def test_a_closed_tensorboard_sink_reused_is_disabled_with_a_clear_warning(tmp_path: Path) -> None:
    from gradguard.integrations.tensorboard import TensorBoardSink

    sink = TensorBoardSink(log_dir=str(tmp_path))
    model = tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gg.attach(model, opt, sinks=[sink], activations=False, log_every_n_steps=1):
        backward(model, opt)
        opt.step()
    # The first guard's close() closed the sink; a second run reuses it by mistake.
    model = tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gg.attach(model, opt, sinks=[sink], activations=False, log_every_n_steps=1)
    backward(model, opt)
    with pytest.warns(gg.GradGuardWarning, match=r"disabled the sink TensorBoardSink.*closed"):
        opt.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one warning, then silence: the sink is disabled
        for _ in range(3):
            backward(model, opt)
            opt.step()
    assert guard.step == 4 and sink in guard.sinks.disabled
