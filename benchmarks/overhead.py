"""What gradguard (and the tools people use today) cost per training step, side by side.

Every configuration trains its own copy of the same model (same initial weights, same
batch, AdamW) in the same process. Each repeat runs one block of steps of every
configuration, in an order that rotates from repeat to repeat, so a slow-down of the
machine hits all of them alike. A configuration's time is the median over repeats of its
mean step time in a block; the tables report it as a ratio to the bare step (no
monitoring at all). The "amortised" table uses the mean over every timed step instead,
so rare costs (gradguard's logging step every 50 steps, activation windows, wandb's
histograms every 100 steps) are spread over the steps they serve.

    python benchmarks/overhead.py                                # all models, CPU
    python benchmarks/overhead.py --device cuda --markdown benchmarks/RESULTS-cuda.md
    python benchmarks/overhead.py --quick --models stress --configs bare,gradguard

Peers that are not installed are listed as "not installed" and skipped. The peer
packages: ``pip install lightning wandb`` and ``pip install autoclip==0.2.1 zclip==1.0.0
--no-deps`` (both need only torch; ``zclip`` imports lightning when present).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

import gradguard as gg

# ---------------------------------------------------------------------------- models


@dataclass
class Workload:
    """A model and a fixed batch; ``loss(model)`` runs the forward pass."""

    model: nn.Module
    loss: Callable[[nn.Module], torch.Tensor]


def _mlp(device: torch.device) -> Workload:
    layers: list[nn.Module] = []
    for _ in range(24):
        linear = nn.Linear(512, 512)
        nn.init.kaiming_normal_(linear.weight, nonlinearity="relu")
        nn.init.zeros_(linear.bias)
        layers += [linear, nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(512, 10)).to(device)
    x = torch.randn(256, 512, device=device)
    y = torch.randint(0, 10, (256,), device=device)
    return Workload(model, lambda m: nn.functional.cross_entropy(m(x), y))


def _cnn(device: torch.device) -> Workload:
    def block(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
        return [
            nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(),
        ]

    model = nn.Sequential(
        *block(3, 32, 1),
        *block(32, 64, 2),
        *block(64, 128, 2),
        *block(128, 128, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(128, 10),
    ).to(device)
    x = torch.randn(64, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (64,), device=device)
    return Workload(model, lambda m: nn.functional.cross_entropy(m(x), y))


class _Transformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(
            d_model=256, nhead=4, dim_feedforward=1024, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, num_layers=4, enable_nested_tensor=False)
        self.head = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.head(self.encoder(x).mean(dim=1))
        return logits


def _transformer(device: torch.device) -> Workload:
    model = _Transformer().to(device)
    x = torch.randn(16, 64, 256, device=device)
    y = torch.randint(0, 10, (16,), device=device)
    return Workload(model, lambda m: nn.functional.cross_entropy(m(x), y))


class _ResidualTanh(nn.Module):
    """x + tanh(Linear(x)): 200 of them give 400 parameter tensors, plus a 2-tensor head."""

    def __init__(self, blocks: int = 200, width: int = 32) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(blocks))
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for linear in self.blocks:
            x = x + torch.tanh(linear(x))
        logits: torch.Tensor = self.head(x)
        return logits


def _stress(device: torch.device) -> Workload:
    model = _ResidualTanh().to(device)
    x = torch.randn(64, 32, device=device)
    y = torch.randint(0, 10, (64,), device=device)
    return Workload(model, lambda m: nn.functional.cross_entropy(m(x), y))


MODELS: dict[str, tuple[str, Callable[[torch.device], Workload]]] = {
    "mlp": ("MLP 24×Linear(512)+ReLU, batch 256", _mlp),
    "cnn": ("CNN 4×(Conv+BN+ReLU), 32×32, batch 64", _cnn),
    "transformer": ("TransformerEncoder 4×d256, 16×64 tokens", _transformer),
    "stress": ("200×(Linear(32)+Tanh) residual, 402 tensors, batch 64", _stress),
}

# ---------------------------------------------------------------------------- configurations


@dataclass
class Attached:
    """What a configuration did to one model: a per-step call before ``optimizer.step()``
    (``None``: nothing, hooks do the work) and how to undo it."""

    before_step: Callable[[], Any] | None = None
    teardown: Callable[[], Any] = lambda: None


Setup = Callable[[nn.Module, torch.optim.Optimizer, "Context"], Attached]


@dataclass
class Context:
    """Shared per-run resources (a wandb offline run, a temporary directory)."""

    tmp: Path
    device: torch.device
    clock: Callable[[], float] = time.perf_counter
    _wandb_run: Any = None

    def wandb_run(self) -> Any:
        if self._wandb_run is None:
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            self._wandb_run = wandb.init(
                mode="offline", dir=str(self.tmp), project="gradguard-bench", name="overhead"
            )
        return self._wandb_run

    def close(self) -> None:
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None


@dataclass
class Config:
    name: str
    label: str
    setup: Setup
    requires: tuple[str, ...] = ()
    note: str = ""


def _gradguard(**kwargs: Any) -> Setup:
    def setup(model: nn.Module, optimizer: torch.optim.Optimizer, ctx: Context) -> Attached:
        guard = gg.attach(model, optimizer, **kwargs)
        return Attached(teardown=guard.detach)

    return setup


def _gradguard_clip(class_name: str, **clip_kwargs: Any) -> Setup:
    def setup(model: nn.Module, optimizer: torch.optim.Optimizer, ctx: Context) -> Attached:
        strategy = getattr(gg, class_name)(**clip_kwargs)
        guard = gg.attach(model, optimizer, clip=strategy)
        return Attached(teardown=guard.detach)

    return setup


def _gradguard_recommended(
    model: nn.Module, optimizer: torch.optim.Optimizer, ctx: Context
) -> Attached:
    guard = gg.attach(model, optimizer, clip=gg.AutoClip(), on_nonfinite="skip")
    return Attached(teardown=guard.detach)


def _gradguard_recover(
    model: nn.Module, optimizer: torch.optim.Optimizer, ctx: Context
) -> Attached:
    guard = gg.attach(model, optimizer, clip=gg.AutoClip(), on_instability=gg.Recover())
    return Attached(teardown=guard.detach)


def _gradguard_activations(
    model: nn.Module, optimizer: torch.optim.Optimizer, ctx: Context
) -> Attached:
    monitor = gg.ActivationMonitor(every_n_steps=1, window=1)
    guard = gg.attach(model, optimizer, activations=monitor)
    return Attached(teardown=guard.detach)


def _gradguard_wandb(histograms: bool, log_every_n_steps: int) -> Setup:
    """gradguard logging to the shared offline W&B run (no figures): with ``histograms``,
    per-layer gradient histograms on every logging step, as wandb.watch(log="gradients")
    makes them on every ``log_freq``-th step."""

    def setup(model: nn.Module, optimizer: torch.optim.Optimizer, ctx: Context) -> Attached:
        from gradguard.integrations.wandb import WandbSink

        sink = WandbSink(run=ctx.wandb_run(), figure_every_n_logs=0)
        guard = gg.attach(
            model,
            optimizer,
            histograms=histograms,
            log_every_n_steps=log_every_n_steps,
            sinks=[sink],
        )
        return Attached(teardown=guard.detach)

    return setup


def _lightning_grad_norm(
    model: nn.Module, optimizer: torch.optim.Optimizer, ctx: Context
) -> Attached:
    from lightning.pytorch.utilities import grad_norm

    # Lightning's docs: call it in on_before_optimizer_step and self.log_dict() the result.
    # Only the utility is timed here (the Trainer's logging would come on top).
    return Attached(before_step=lambda: grad_norm(model, norm_type=2))


def _wandb_watch(log_freq: int) -> Setup:
    def setup(model: nn.Module, optimizer: torch.optim.Optimizer, ctx: Context) -> Attached:
        run = ctx.wandb_run()
        run.watch(model, log="gradients", log_freq=log_freq)
        return Attached(teardown=lambda: run.unwatch(model))

    return setup


def _autoclip_package(global_threshold: bool) -> Setup:
    def setup(model: nn.Module, optimizer: torch.optim.Optimizer, ctx: Context) -> Attached:
        from autoclip.torch import QuantileClip

        if global_threshold:  # the AutoClip paper's rule, as gg.AutoClip(percentile=10)
            clipper = QuantileClip(model.parameters(), quantile=0.1, global_threshold=True)
        else:  # the package's default: a 0.9 quantile per parameter tensor
            clipper = QuantileClip(model.parameters())
        return Attached(before_step=clipper.step)

    return setup


def _zclip_package(model: nn.Module, optimizer: torch.optim.Optimizer, ctx: Context) -> Attached:
    from zclip import ZClip

    clipper = ZClip()  # the package's defaults (alpha 0.97, z 2.5, max_grad_norm 1.0)
    return Attached(before_step=lambda: clipper.step(model))


def _composer_style(model: nn.Module, optimizer: torch.optim.Optimizer, ctx: Context) -> Attached:
    named = list(model.named_parameters())

    # The pattern of Composer's OptimizerMonitor and of many hand-written loops: a norm per
    # parameter tensor, each read back to the host with .item() (one sync per tensor).
    def per_parameter_norms() -> dict[str, float]:
        norms: dict[str, float] = {}
        total = 0.0
        for name, param in named:
            if param.grad is not None:
                value = torch.linalg.vector_norm(param.grad).item()
                norms[f"l2_norm/grad/{name}"] = value
                total += value * value
        norms["l2_norm/grad/global"] = math.sqrt(total)
        return norms

    return Attached(before_step=per_parameter_norms)


def _configs() -> list[Config]:
    configs = [
        Config("bare", "bare step (no monitoring)", lambda m, o, c: Attached()),
        Config("gradguard", "gradguard, defaults (`gg.attach(model, opt)`)", _gradguard()),
        Config(
            "gradguard-normclip",
            "gradguard + NormClip(1.0)",
            _gradguard_clip("NormClip", max_norm=1.0),
        ),
    ]
    for class_name in ("AutoClip", "ZClip", "AGC"):
        configs.append(
            Config(
                f"gradguard-{class_name.lower()}",
                f"gradguard + {class_name}()",
                _gradguard_clip(class_name),
            )
        )
    configs.append(
        Config(
            "gradguard-recommended",
            'gradguard + AutoClip() + on_nonfinite="skip"',
            _gradguard_recommended,
            note="one host read per step (the skip decision), non-fused optimizer",
        )
    )
    configs.append(
        Config(
            "gradguard-recover",
            "gradguard + AutoClip() + on_instability=Recover()",
            _gradguard_recover,
            note="the recovery ladder with its defaults: a CPU snapshot every 100 steps",
        )
    )
    configs += [
        Config(
            "gradguard-activations",
            "gradguard, activation sampling every step",
            _gradguard_activations,
            note="worst case; the default samples 4 steps in 100",
        ),
        Config(
            "gradguard-wandb-1",
            "gradguard → W&B, logging every step (`log_every_n_steps=1`)",
            _gradguard_wandb(False, 1),
            requires=("wandb",),
            note="the baseline of the next row: all metrics to W&B every step, no histograms",
        ),
        Config(
            "gradguard-histograms-wandb-1",
            "gradguard → W&B + `histograms=True`, every step",
            _gradguard_wandb(True, 1),
            requires=("wandb",),
            note="per-layer gradient histograms on the device, every step: compare with "
            "wandb.watch(log_freq=1)",
        ),
        Config(
            "gradguard-histograms-wandb",
            "gradguard → W&B + `histograms=True`, defaults (every 50 steps)",
            _gradguard_wandb(True, 50),
            requires=("wandb",),
        ),
        Config(
            "lightning-grad-norm",
            "Lightning `grad_norm()` every step",
            _lightning_grad_norm,
            requires=("lightning",),
        ),
        Config(
            "wandb-watch-1",
            '`wandb.watch(log="gradients", log_freq=1)`',
            _wandb_watch(1),
            requires=("wandb",),
        ),
        Config(
            "wandb-watch-100",
            '`wandb.watch(log="gradients", log_freq=100)`',
            _wandb_watch(100),
            requires=("wandb",),
        ),
        Config(
            "autoclip-pkg",
            "`autoclip` QuantileClip (per tensor, its default)",
            _autoclip_package(False),
            requires=("autoclip",),
        ),
        Config(
            "autoclip-pkg-global",
            "`autoclip` QuantileClip(0.1, global)",
            _autoclip_package(True),
            requires=("autoclip",),
        ),
        Config("zclip-pkg", "`zclip` ZClip() (its defaults)", _zclip_package, requires=("zclip",)),
        Config(
            "composer-style",
            "per-tensor norm + `.item()` loop every step (Composer OptimizerMonitor style)",
            _composer_style,
        ),
    ]
    return configs


def _missing(modules: tuple[str, ...]) -> list[str]:
    import importlib.util

    return [name for name in modules if importlib.util.find_spec(name) is None]


# ---------------------------------------------------------------------------- timing


@dataclass
class Runner:
    config: Config
    model: nn.Module
    optimizer: torch.optim.Optimizer
    loss: Callable[[nn.Module], torch.Tensor]
    attached: Attached
    block_times: list[float] = field(default_factory=list)  # mean seconds per step, per block

    def step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.loss(self.model).backward()  # type: ignore[no-untyped-call]
        if self.attached.before_step is not None:
            self.attached.before_step()
        self.optimizer.step()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_block(runner: Runner, steps: int, ctx: Context) -> float:
    _synchronize(ctx.device)  # only around the block, never inside a step
    start = ctx.clock()
    for _ in range(steps):
        runner.step()
    _synchronize(ctx.device)
    return (ctx.clock() - start) / steps


@dataclass
class ModelResult:
    model: str
    description: str
    steps_per_block: int
    repeats: int
    medians: dict[str, float]
    means: dict[str, float]
    spreads: dict[str, float]
    failures: dict[str, str] = field(default_factory=dict)


def benchmark_model(
    name: str,
    configs: list[Config],
    ctx: Context,
    *,
    repeats: int,
    block_seconds: float,
    warmup_steps: int,
    log: Callable[[str], None],
) -> ModelResult:
    description, build = MODELS[name]
    torch.manual_seed(0)
    workload = build(ctx.device)
    runners: list[Runner] = []
    failures: dict[str, str] = {}
    for config in configs:
        model = copy.deepcopy(workload.model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        runner = Runner(config, model, optimizer, workload.loss, Attached())
        try:
            runner.attached = config.setup(model, optimizer, ctx)
            for _ in range(warmup_steps):
                runner.step()
        except Exception as error:  # a peer that breaks is reported, not fatal
            runner.attached.teardown()
            failures[config.name] = f"{type(error).__name__}: {error}".splitlines()[0][:200]
            log(f"{name}: {config.name} failed: {failures[config.name]}")
            continue
        runners.append(runner)
    try:
        bare = runners[0]
        per_step = _timed_block(bare, max(2, warmup_steps), ctx)
        steps = max(2, min(200, round(block_seconds / max(per_step, 1e-6))))
        log(
            f"{name}: bare step ~{per_step * 1e3:.2f} ms; {len(runners)} configurations, "
            f"{repeats} repeats x {steps} steps"
        )
        gc.collect()
        for repeat in range(repeats):
            shift = repeat % len(runners)
            for runner in runners[shift:] + runners[:shift]:
                runner.block_times.append(_timed_block(runner, steps, ctx))
    finally:
        for runner in runners:
            runner.attached.teardown()
    medians = {r.config.name: statistics.median(r.block_times) for r in runners}
    means = {r.config.name: statistics.fmean(r.block_times) for r in runners}
    spreads = {
        r.config.name: (max(r.block_times) - min(r.block_times)) / statistics.median(r.block_times)
        for r in runners
    }
    del runners, workload
    gc.collect()
    return ModelResult(name, description, steps, repeats, medians, means, spreads, failures)


# ---------------------------------------------------------------------------- reporting


def machine_description(device: torch.device) -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 0
    parts = [
        f"CPU: {cpu}, {cores} cores available, torch threads {torch.get_num_threads()}",
        f"torch {torch.__version__}, Python {platform.python_version()}, "
        f"gradguard {gg.__version__}",
        f"device: {device.type}",
    ]
    if device.type == "cuda":
        parts[-1] += f" ({torch.cuda.get_device_name(device)})"
    return "; ".join(parts)


def _ratio(value: float, base: float) -> str:
    return f"{value / base:.2f}×"


AMORTISE_MIN_STEPS = 100  # timed steps a column needs to spread a step-50 logging step over


def render_markdown(
    results: list[ModelResult],
    configs: list[Config],
    skipped: dict[str, str],
    device: torch.device,
    command: str,
    max_load: float,
    clock: str = "wall",
) -> str:
    header = "| configuration | " + " | ".join(MODELS[r.model][0] for r in results) + " |"
    rule = "|---|" + "---:|" * len(results)
    lines = [
        "# gradguard overhead: one training step, side by side",
        "",
        f"Measured {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC on: "
        f"{machine_description(device)}.",
        "",
        f"Command: `{command}`",
        "",
    ]
    cores = os.cpu_count() or 1
    if max_load > 0.5 * cores:
        lines += [
            f"The machine was shared while this ran (1-minute load average up to {max_load:.1f} "
            f"on {cores} cores): the interleaving spreads that load over all configurations "
            "alike, but ratios within about ±10% of 1.00× are noise here.",
            "",
        ]
    blocks = ", ".join(
        f"{MODELS[r.model][0].split(',')[0]}: {r.repeats}×{r.steps_per_block}" for r in results
    )
    clock_text = (
        "this process's CPU time (`time.process_time`)"
        if clock == "cpu"
        else "wall time (`time.perf_counter`)"
    )
    lines += [
        "Every configuration trains its own copy of the model (AdamW, same weights, same batch) in "
        "one process; each repeat runs a block of steps of every configuration in rotating order. "
        f"Repeats × steps per block: {blocks}. Clock: {clock_text}.",
        "",
        "## Median step time, relative to the bare step (lower is better)",
        "",
        header,
        rule,
    ]

    def ratio_rows(table: dict[str, dict[str, float]], shown: set[str]) -> list[str]:
        out = []
        for config in configs:
            if config.name == "bare":
                continue
            cells = []
            for r in results:
                if r.model not in shown:
                    cells.append("—")
                elif config.name in table[r.model]:
                    cells.append(_ratio(table[r.model][config.name], table[r.model]["bare"]))
                else:
                    cells.append("failed")
            out.append(f"| {config.label} | " + " | ".join(cells) + " |")
        return out

    every = {r.model for r in results}
    lines.append(
        "| bare step, absolute | "
        + " | ".join(f"{r.medians['bare'] * 1e3:.2f} ms" for r in results)
        + " |"
    )
    lines.append(
        "| bare step, spread between repeats | "
        + " | ".join(f"±{50 * r.spreads['bare']:.0f}%" for r in results)
        + " |"
    )
    lines += ratio_rows({r.model: r.medians for r in results}, every)
    long_enough = {r.model for r in results if r.repeats * r.steps_per_block >= AMORTISE_MIN_STEPS}
    lines += [
        "",
        "## Amortised: mean over every timed step",
        "",
        "This spreads the rare steps over the steps they serve: gradguard's logging step "
        "(every 50 steps: one bulk device-to-host copy, detectors, sinks) and wandb's "
        f"histograms every 100 steps. Shown only where a configuration ran at least "
        f"{AMORTISE_MIN_STEPS} timed steps (—: too few to contain them).",
        "",
    ]
    if long_enough:
        lines += [header, rule]
        lines.append(
            "| bare step, absolute | "
            + " | ".join(
                f"{r.means['bare'] * 1e3:.2f} ms" if r.model in long_enough else "—"
                for r in results
            )
            + " |"
        )
        lines += ratio_rows({r.model: r.means for r in results}, long_enough)
    else:
        lines.append("(No model ran enough timed steps in this run.)")
    notes = [f"- {c.label}: {c.note}" for c in configs if c.note]
    notes += [f"- not measured: {name} ({why})" for name, why in skipped.items()]
    notes += [
        f"- failed on {MODELS[r.model][0].split(',')[0]}: {name} ({why})"
        for r in results
        for name, why in r.failures.items()
    ]
    if notes:
        lines += ["", "Notes:", "", *notes]
    return "\n".join(lines) + "\n"


def _load() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return 0.0


# ---------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--quick", action="store_true", help="few short repeats (smoke test)")
    parser.add_argument(
        "--models", default=",".join(MODELS), help=f"comma list of {','.join(MODELS)}"
    )
    parser.add_argument(
        "--configs", default="all", help="comma list of configuration names, or 'all'"
    )
    parser.add_argument("--repeats", type=int, default=None, help="override the number of repeats")
    parser.add_argument(
        "--block-seconds", type=float, default=None, help="target length of a block"
    )
    parser.add_argument("--markdown", default=None, help="write the Markdown tables here")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default: torch's choice); on a shared machine use 1",
    )
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall: elapsed time (default); cpu: this process's CPU time, which other "
        "processes on a shared machine disturb less (CPU device only)",
    )
    parser.add_argument("--list", action="store_true", help="list the configurations and exit")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    all_configs = _configs()
    if args.list:
        for config in all_configs:
            print(f"{config.name:28s} {config.label}")
        return 0
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if device.type == "cuda" and args.clock == "cpu":
        parser.error("--clock cpu measures host CPU time only; use --clock wall on CUDA")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    for model in models:
        if model not in MODELS:
            parser.error(f"unknown model {model!r}; choose from {', '.join(MODELS)}")
    if args.configs == "all":
        chosen = all_configs
    else:
        names = {"bare", *(c.strip() for c in args.configs.split(",") if c.strip())}
        known = {c.name for c in all_configs}
        for name in names - known:
            parser.error(f"unknown configuration {name!r}; see --list")
        chosen = [c for c in all_configs if c.name in names]
    skipped: dict[str, str] = {}
    configs: list[Config] = []
    for config in chosen:
        missing = _missing(config.requires)
        if missing:
            skipped[config.name] = "not installed: " + ", ".join(missing)
        else:
            configs.append(config)

    repeats = args.repeats or (2 if args.quick else 7)
    block_seconds = args.block_seconds or (0.02 if args.quick else 0.3)
    # Four steps: gradguard's first activation window (steps 0-3) and its first logging step
    # fall in the warm-up, as they would at the start of any run.
    warmup = 2 if args.quick else 4
    warnings.filterwarnings("ignore", category=gg.GradGuardWarning)
    command = "python benchmarks/overhead.py " + " ".join(sys.argv[1:] if argv is None else argv)
    max_load = _load()

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    log(machine_description(device))
    results: list[ModelResult] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gradguard-bench-") as tmp:
        clock = time.process_time if args.clock == "cpu" else time.perf_counter
        ctx = Context(Path(tmp), device, clock)
        try:
            for model in models:
                results.append(
                    benchmark_model(
                        model,
                        configs,
                        ctx,
                        repeats=repeats,
                        block_seconds=block_seconds,
                        warmup_steps=warmup,
                        log=log,
                    )
                )
                max_load = max(max_load, _load())
        finally:
            ctx.close()
    log(f"total {time.perf_counter() - started:.0f} s")
    max_load = max(max_load, _load())
    table = render_markdown(
        results, configs, skipped, device, command.strip(), max_load, args.clock
    )
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table)
        log(f"wrote {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
