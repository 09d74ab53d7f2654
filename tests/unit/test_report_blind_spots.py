"""The report says what gradguard could not observe, instead of leaving the user to guess."""

from __future__ import annotations

import warnings

import torch
from torch import nn

import gradguard as gg


class Recurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(8, 16, batch_first=True)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0][:, -1])


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, guard: gg.GradGuard) -> None:
    for _ in range(6):
        optimizer.zero_grad()
        model(torch.randn(4, 5, 8)).square().mean().backward()
        optimizer.step()


def test_fused_rnn_activations_and_outside_parameters_are_named() -> None:
    torch.manual_seed(0)
    model = Recurrent()
    outside = nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.Adam([*model.parameters(), outside])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gg.GradGuardWarning)  # said at attach, tested elsewhere
        guard = gg.attach(model, optimizer, log_every_n_steps=5)
    _train(model, optimizer, guard)
    report = guard.report()
    guard.detach()
    block = report[report.index("Not observed") :].split("\n\n")[0].splitlines()
    assert block[0] == "Not observed (so this report cannot speak for it):"
    assert block[1] == "  - LSTM activations run inside fused kernels: not sampled."
    assert block[2] == "  - 1 optimizer parameter(s) outside the model: not watched."


def test_activations_off_is_a_blind_spot_too() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(40, 8), nn.ReLU(), nn.Linear(8, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gg.attach(model, optimizer, log_every_n_steps=5, activations=False)
    _train(model, optimizer, guard)
    assert guard.summary()["not_observed"] == [
        "activations (dead and saturated units): not sampled, as activations=False"
    ]
    assert "- activations (dead and saturated units): not sampled" in guard.report()
    guard.detach()


def test_a_model_gradguard_sees_whole_has_no_such_section() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(40, 8), nn.ReLU(), nn.Linear(8, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with gg.attach(model, optimizer, log_every_n_steps=5) as guard:
        _train(model, optimizer, guard)
        assert "Not observed" not in guard.report()


def test_the_report_after_detach_still_names_what_was_not_observed() -> None:
    # The demo, `with` blocks and the end of a Lightning fit print the report after detaching.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(40, 8), nn.ReLU(), nn.Linear(8, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with gg.attach(model, optimizer, log_every_n_steps=5, activations=False) as guard:
        _train(model, optimizer, guard)
    assert not guard.attached
    assert "- activations (dead and saturated units): not sampled" in guard.report()
