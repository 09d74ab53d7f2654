"""Floods: a condition that comes back every other step is one episode, announced once and
then reminded every ``repeat_every`` steps with the count folded in between."""

from __future__ import annotations

import re

import pytest
import torch

import gradguard as gg
from tests.faults._kit import backward, nonfinite_events, poison, tiny

STEPS = 600


@pytest.mark.parametrize("policy", ["warn", "skip"])
def test_a_nan_every_second_step_is_one_event_plus_reminders(policy: str) -> None:
    model = tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = gg.attach(model, opt, on_nonfinite=policy, activations=False, detectors=[])  # type: ignore[arg-type]
    with pytest.warns(gg.GradGuardWarning) as record:
        for step in range(STEPS):
            backward(model, opt)
            if step % 2 == 0:
                poison(model[2].weight)
            opt.step()
            if policy == "warn" and step % 2 == 0:
                # warn lets the NaN into the weights: start over from clean ones
                with torch.no_grad():
                    for p in model.parameters():
                        p.nan_to_num_(0.0)
    events = nonfinite_events(guard)
    # Step 0 opens the episode; reminders at 100, 200, ..., 500: 6 Events, not 300.
    assert [e.step for e in events] == [0, 100, 200, 300, 400, 500]
    assert [e.details["reminder"] for e in events] == [False] + [True] * 5
    # Each reminder counts the NaN steps since the last report: 50 of them.
    for event in events[1:]:
        assert event.details["occurrences"] == 50
        assert re.search(r"\(50 steps with NaN/Inf since the last report\.\)", event.message)
        assert event.message.startswith("Still present since step 0")
    assert len([w for w in record if "NaN" in str(w.message)]) == 6
    assert guard.nonfinite_steps == 300
    assert guard.skipped_steps == (300 if policy == "skip" else 0)
    assert guard.occurrences()["nonfinite"] == 300
    assert guard.active_conditions() == {"nonfinite": 0}
