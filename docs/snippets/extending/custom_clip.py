"""A ClipStrategy of your own: halve the gradients whenever the total norm exceeds `limit`.

Run it: python docs/snippets/extending/custom_clip.py
"""

import torch
from torch import nn

import gradguard as gg


class HalfOverLimit(gg.ClipStrategy):
    """Halve the gradients whenever the total norm exceeds ``limit``."""

    def __init__(self, limit: float) -> None:
        self.limit = limit

    def clip_(self, ctx: gg.ClipContext) -> gg.ClipResult:
        # ctx.total is the pre-clip global norm, a 0-d tensor on the device: compare it
        # there, scale in place, and never read it back to the host (no sync).
        over = ctx.total > self.limit
        coef = torch.where(over, 0.5, 1.0).float()
        ctx.scale_all_(coef)
        return gg.ClipResult(threshold=ctx.full(self.limit), coef=coef)


torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.01)
sink = gg.MemorySink()
guard = gg.attach(model, opt, clip=HalfOverLimit(1e-3), sinks=[sink], log_every_n_steps=1)
for _ in range(3):
    loss = model(torch.randn(16, 4)).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
guard.detach()

print(sink.scalars["gradguard/clip/coef"])  # [(0, 0.5), (1, 0.5), (2, 0.5)]
assert [coef for _, coef in sink.scalars["gradguard/clip/coef"]] == [0.5, 0.5, 0.5]
assert sink.latest("gradguard/clip/threshold") == torch.tensor(1e-3).item()
