"""A Sink of your own: one CSV row per logging step, one line per Event.

Run it: python docs/snippets/extending/custom_sink.py
"""

import csv
import io
from collections.abc import Mapping

import torch
from torch import nn

import gradguard as gg


class CsvSink:
    """Writes the total gradient norm and the worst layer of each logging step as CSV."""

    def __init__(self, file: io.TextIOBase) -> None:
        self.writer = csv.writer(file)
        self.writer.writerow(["step", "grad_norm_total", "largest_layer", "largest_norm"])
        self.events: list[str] = []

    def log_scalars(self, scalars: Mapping[str, float], step: int) -> None:
        # From the guard, `scalars` is a gg.StepMetrics: keys -> floats, plus the typed
        # LoggedStats as `.stats`, so no key needs parsing.
        stats: gg.LoggedStats = scalars.stats  # type: ignore[attr-defined]
        norms = {layer: n for layer, n in zip(stats.layers, stats.grad_norm) if n is not None}
        worst = max(norms, key=norms.__getitem__)
        total = scalars["gradguard/grad_norm_total"]
        self.writer.writerow([step, f"{total:.4g}", worst, f"{norms[worst]:.4g}"])

    def log_event(self, event: gg.Event) -> None:
        self.events.append(f"{event.step},{event.kind},{event.severity}")

    def flush(self) -> None:  # called by guard.detach()
        pass

    def close(self) -> None:  # called by guard.close()
        pass


torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.01)
out = io.StringIO()
sink = CsvSink(out)
assert isinstance(sink, gg.Sink)  # gg.Sink is a runtime-checkable Protocol: no base class
guard = gg.attach(model, opt, sinks=[sink], log_every_n_steps=2)
for _ in range(5):
    loss = model(torch.randn(16, 4)).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
guard.close()

print(out.getvalue())
rows = out.getvalue().splitlines()
assert rows[0].startswith("step,") and [r.split(",")[0] for r in rows[1:]] == ["0", "2", "4"]
