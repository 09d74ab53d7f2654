"""gradguard's fixed per-step cost, next to torch's own ``clip_grad_norm_``.

On a big step gradguard's work is lost in the noise; on a small, launch-bound step what
counts is its fixed work per step: Python, op dispatch and small kernels. This benchmark
isolates that cost on a tiny model where the step itself is cheap:

* time ADDED to a bare step (no monitoring) by each configuration, measured side by side
  in one process: every configuration trains its own copy of the same model on the same
  batch; each repeat runs one block of steps of every configuration in a rotating order,
  and the added time of a repeat is the configuration's block mean minus the bare block
  mean of the same repeat (paired, so a slow moment of the machine cancels out); the
  table gives the median over repeats;
* an A/A line (a second bare configuration) that shows what "no difference" looks like;
* the ratio of each configuration's added time to ``clip_grad_norm_(1.0)``'s: the bar
  that watching everything should not exceed by much;
* the number of aten ops each configuration adds to one non-logging step, counted with a
  ``TorchDispatchMode``: on this CPU, and with the strategies' bookkeeping on the device
  as on an accelerator (a CPU device keeps it on the host, where reading a value is no
  sync; the accelerator count is what a GPU pays in kernel launches, whatever the model
  size), for a 5-layer and a 65-layer model (an op count that grows with depth is Python
  or per-layer work on every step).

Logging steps and activation windows are moved out of the way (``log_every_n_steps`` and
the sampling interval set beyond the run), so the numbers are the cost of an ordinary step.

    python benchmarks/fixed_cost.py                      # CPU, 1 thread
    python benchmarks/fixed_cost.py --markdown benchmarks/RESULTS-fixed-cost.md
    python benchmarks/fixed_cost.py --quick              # a smoke test, not a measurement
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import gradguard as gg

NEVER = 10**9  # a logging interval / sampling interval beyond any run


def tiny_mlp(layers: int, width: int = 32) -> nn.Module:
    """``layers`` Linear(width) layers with ReLU between them, ending in Linear(width, 10)."""
    modules: list[nn.Module] = []
    for _ in range(layers - 1):
        modules += [nn.Linear(width, width), nn.ReLU()]
    modules.append(nn.Linear(width, 10))
    return nn.Sequential(*modules)


@dataclass
class Config:
    """A way of watching a training step: ``setup`` returns a per-step callable run before
    ``optimizer.step()`` (or None) and a teardown."""

    name: str
    label: str
    setup: Callable[[nn.Module, torch.optim.Optimizer], tuple[Callable[[], Any] | None, Any]]


def _bare(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[None, Any]:
    return None, lambda: None


def _clip_grad_norm(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[Any, Any]:
    params = [p for p in model.parameters() if p.requires_grad]
    return (lambda: torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)), lambda: None


def _unitwise_norms(t: torch.Tensor) -> torch.Tensor:
    if t.ndim <= 1:
        return t.norm(2.0)
    return t.norm(2.0, dim=tuple(range(1, t.ndim)), keepdim=True)


def _agc_per_parameter(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[Any, Any]:
    """Adaptive gradient clipping the way timm's ``adaptive_clip_grad`` does it (Brock et
    al., 2021): a Python loop over the parameters, a handful of small ops each. Written
    here from the algorithm (timm is not a dependency), for gradguard's AGC to stand beside."""
    params = [p for p in model.parameters() if p.requires_grad]

    def clip(clipping: float = 0.01, eps: float = 1e-3) -> None:
        for p in params:
            if p.grad is None:
                continue
            grad = p.grad.detach()
            max_norm = _unitwise_norms(p.detach()).clamp_(min=eps).mul_(clipping)
            grad_norm = _unitwise_norms(grad)
            clipped = grad * (max_norm / grad_norm.clamp(min=1e-6))
            grad.copy_(torch.where(grad_norm < max_norm, grad, clipped))

    return clip, lambda: None


def _guard(
    make_clip: Callable[[], Any] = lambda: None, **kwargs: Any
) -> Callable[[nn.Module, torch.optim.Optimizer], tuple[None, Any]]:
    """Each setup gets fresh strategy objects (a strategy serves one guard)."""

    def setup(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[None, Any]:
        # A callable option (detectors=lambda: [...]) is made anew for every guard too.
        fresh = {k: v() if callable(v) else v for k, v in kwargs.items()}
        guard = gg.attach(
            model,
            optimizer,
            clip=make_clip(),
            activations=gg.ActivationMonitor(every_n_steps=NEVER),
            log_every_n_steps=NEVER,
            **fresh,
        )
        return None, guard.detach

    return setup


def configs() -> list[Config]:
    return [
        Config("bare", "bare step (no monitoring)", _bare),
        Config("bare-aa", "A/A: a second bare copy (noise)", _bare),
        Config(
            "clip_grad_norm_", "`torch.nn.utils.clip_grad_norm_(1.0)` (reference)", _clip_grad_norm
        ),
        Config("gradguard", "`gg.attach(model, opt)` defaults", _guard()),
        Config(
            "gradguard-lean",
            "`detectors=[gg.GradientFlowDetector()]` (defaults without the host detectors "
            "that read every step)",
            _guard(detectors=lambda: [gg.GradientFlowDetector()]),
        ),
        Config("normclip", "`clip=gg.NormClip(1.0)`", _guard(lambda: gg.NormClip(1.0))),
        Config("autoclip", "`clip=gg.AutoClip()`", _guard(lambda: gg.AutoClip())),
        Config("zclip", "`clip=gg.ZClip()`", _guard(lambda: gg.ZClip())),
        Config(
            "agc-per-parameter",
            "AGC as timm's `adaptive_clip_grad` (a per-parameter loop; reference for AGC)",
            _agc_per_parameter,
        ),
        Config("agc", "`clip=gg.AGC()`", _guard(lambda: gg.AGC())),
        Config(
            "autoclip-skip",
            '`clip=gg.AutoClip(), on_nonfinite="skip"` (one host read per step)',
            _guard(lambda: gg.AutoClip(), on_nonfinite="skip"),
        ),
    ]


@dataclass
class Runner:
    config: Config
    model: nn.Module
    optimizer: torch.optim.Optimizer
    before_step: Callable[[], Any] | None
    teardown: Callable[[], Any]
    x: torch.Tensor
    y: torch.Tensor
    added: list[float] = field(default_factory=list)
    block_times: list[float] = field(default_factory=list)
    block: float = 0.0

    def step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(self.model(self.x), self.y).backward()
        if self.before_step is not None:
            self.before_step()
        self.optimizer.step()


def _runner(config: Config, base: nn.Module, batch: int, width: int) -> Runner:
    torch.manual_seed(1)
    model = copy.deepcopy(base)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
    before, teardown = config.setup(model, optimizer)
    x = torch.randn(batch, width)
    y = torch.randint(0, 10, (batch,))
    runner = Runner(config, model, optimizer, before, teardown, x, y)
    # Step 0 is a logging step, the first steps allocate state, and ZClip warms up for 25
    # steps: count and time ordinary steps after all of that.
    for _ in range(30):
        runner.step()
    return runner


class _OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.count += 1
        return func(*args, **(kwargs or {}))


def ops_per_step(runner: Runner) -> int:
    counter = _OpCounter()
    with counter:
        runner.step()
    return counter.count


def measure_time(
    runners: list[Runner], repeats: int, steps: int, clock: Callable[[], float]
) -> None:
    bare = runners[0]
    for repeat in range(repeats):
        shift = repeat % len(runners)
        for runner in runners[shift:] + runners[:shift]:
            start = clock()
            for _ in range(steps):
                runner.step()
            runner.block = (clock() - start) / steps
            runner.block_times.append(runner.block)
        for runner in runners:
            runner.added.append(runner.block - bare.block)


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (
        f"{cpu}, {torch.get_num_threads()} thread(s), torch {torch.__version__}, "
        f"Python {sys.version.split()[0]}, gradguard {gg.__version__}"
    )


def ops_added(configs_: list[Config], layers: int, batch: int) -> dict[str, int]:
    """aten ops each configuration adds to one ordinary step of a ``layers``-deep model."""
    base = tiny_mlp(layers)
    bare = _runner(configs_[0], base, batch, 32)
    bare_ops = ops_per_step(bare)
    added = {}
    for config in configs_:
        runner = _runner(config, base, batch, 32)
        added[config.name] = ops_per_step(runner) - bare_ops
        runner.teardown()
    return added


def device_bookkeeping_ops(configs_: list[Config], layers: int, batch: int) -> dict[str, int]:
    """The same count with every strategy's bookkeeping on the device, as on an accelerator
    (on a CPU device gradguard keeps it on the host: see ``gradguard.clip.base``)."""
    import gradguard.clip.base as clip_base

    saved = clip_base.HOST_BOOKKEEPING_ON_CPU
    clip_base.HOST_BOOKKEEPING_ON_CPU = False
    try:
        return ops_added(configs_, layers, batch)
    finally:
        clip_base.HOST_BOOKKEEPING_ON_CPU = saved


def run(args: argparse.Namespace) -> str:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    chosen = [c for c in configs() if args.configs is None or c.name in args.configs]
    if chosen[0].name != "bare":
        chosen.insert(0, configs()[0])
    base = tiny_mlp(args.layers)
    runners = [_runner(c, base, args.batch, 32) for c in chosen]
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    measure_time(runners, args.repeats, args.steps, clock)
    bare_step = statistics.median(runners[0].block_times)
    reference = next((r for r in runners if r.config.name == "clip_grad_norm_"), None)
    ref_added = statistics.median(reference.added) if reference is not None else float("nan")
    cpu_ops = ops_added(chosen, args.layers, args.batch)
    device_ops = device_bookkeeping_ops(chosen, args.layers, args.batch)
    deep_device_ops = device_bookkeeping_ops(chosen, 65, args.batch)
    lines = [
        f"Fixed per-step cost ({args.layers}×Linear(32) MLP, batch {args.batch}, AdamW foreach; "
        f"{args.repeats} repeats × {args.steps} steps, blocks interleaved; {_machine()})",
        "",
        f"Bare step: {bare_step * 1e6:.0f} µs. Added time is the median over repeats of the "
        "configuration's block mean minus the bare block mean of the same repeat.",
        "",
        "| configuration | added per step (median) | × clip_grad_norm_'s | aten ops added, CPU "
        f"({args.layers} layers) | on an accelerator ({args.layers} layers) | on an "
        "accelerator (65 layers) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for runner in runners[1:]:
        added = statistics.median(runner.added)
        ratio = added / ref_added if ref_added > 0 else float("nan")
        name = runner.config.name
        lines.append(
            f"| {runner.config.label} | {added * 1e6:.0f} µs | {ratio:.2f}× | {cpu_ops[name]} | "
            f"{device_ops[name]} | {deep_device_ops[name]} |"
        )
    for runner in runners:
        runner.teardown()
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=5)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="cpu")
    parser.add_argument("--configs", type=lambda s: s.split(","), default=None)
    parser.add_argument("--quick", action="store_true", help="3 short repeats: a smoke test")
    parser.add_argument("--markdown", default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.steps = 3, 20
    table = run(args)
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as out:
            out.write(table + "\n")


if __name__ == "__main__":
    main()
