"""Training stability under gradient clipping: a tiny char-level GPT over a learning-rate sweep.

A nanoGPT-style model (``tinygpt.py``: 2 pre-LayerNorm blocks, d_model 128, 4 heads, context
64) learns to predict the next character of Python's own standard library source (read
locally, no download). For every learning rate x configuration x seed it trains from the
same initial weights on the same batches: AdamW (betas 0.9/0.95, weight decay 0.1), a
linear warm-up over the first 10% of the steps, then a constant rate (no decay, so a rate
that is too high keeps pushing). It records how stable each run was, and when gradguard
spoke up.

    python benchmarks/stability.py                           # the full sweep (~8 min, 1 thread)
    python benchmarks/stability.py --quick                   # smoke test (< 1 min)
    python benchmarks/stability.py --lrs 3e-3,0.5 --configs none,zclip --seeds 2
    python benchmarks/stability.py --markdown out.md --json runs.json

Definitions (``step`` counts optimizer steps from 0, as ``guard.step`` does; ``loss[t]`` is
the training loss of the batch of step ``t``, before that step's update):

- **loss spike**: a step ``t >= 10`` whose ``loss[t]`` exceeds 1.5 times the median of the
  up to 30 finite losses before it, or whose loss is NaN/Inf. Consecutive spiking steps are
  ONE spike (a new one needs the loss to drop back under its threshold first). The **first
  spike step** is the first step of the first spike.
- **diverged**: the training loss became NaN/Inf (the run stops there: its weights are
  NaN), or the final validation loss is above the validation loss of the initial weights,
  i.e. training ended no better than it started.
- **final val loss**: mean cross-entropy (nats per character) of the final weights on 256
  fixed validation windows, the same for every run; NaN/Inf for a run that stopped.
- **steps to target**: the first evaluation step (every ``eval_every`` = 25 steps, on every
  4th of those windows) whose validation loss is at or below the target (2.6 by default,
  which every run at the best rate of the default grid reaches, about halfway through).
- **grad-norm jump**: for a run that spiked, the largest ratio of a step's total gradient
  norm (before clipping) to the median of the 30 norms before it, over the 5 steps up to
  and including the first spike step: how loudly the gradient announced the spike.
- **gradguard's first Event**: the step and kind of the first ``gg.Event`` of the run's
  guard. With ``--observe`` (the default) every configuration gets one guard in observe
  mode, ``gg.attach(model, opt, log_every_n_steps=10, sinks=[])`` (default detectors),
  fed each step's loss with ``guard.observe_loss(loss)``; for the AutoClip and ZClip
  configurations that guard also clips (``clip=...``: one guard per optimizer).
- **lead time**: ``first spike step - first Event step``: positive means gradguard spoke
  before the loss spiked, 0 at the same step, negative after it. Runs without a spike have
  no lead time ("no spike"); runs that spiked with no Event at all are "missed".
- **false alarm**: a run that neither spiked nor diverged, yet got an Event (healthy runs
  must stay silent at default settings, the rule of the test zoo).
- **by Event kind**: the same lead time and false alarms, for the first Event of each kind
  alone (all configurations and seeds of a rate together), so that each detector's
  contribution shows.

``clip_grad_norm_`` runs in an optimizer step pre-hook registered after the guard's own: the
update is the same as calling it just before ``optimizer.step()``, and the guard measures the
gradient before clipping, as it does under its own clip strategies (called in the loop, it
would show the guard norms capped at 1.0). Each step's total gradient norm before clipping
and every layer's update/parameter ratio are also recorded (``--json``), so a detector can
be replayed offline on the same runs (the ratios cost the benchmark a parameter copy per
step; gradguard's default guard does not pay it).

A new configuration is one entry in ``CONFIGS``: a function that receives the model, its
optimizer and whether to observe, and returns an ``Attached``. The recovery ladder runs
with ``on_exhausted="warn"`` so that every run completes and is scored like the others
(the default, ``"raise"``, stops a run whose rollbacks are spent).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from stability_metrics import (
    RunResult,
    render_kind_tables,
    render_lr_table,
    render_runs,
    render_tables,
    runs_to_json,
    summarise_run,
)
from tinygpt import Corpus, ModelConfig, TinyGPT, batch_offsets, lm_loss, make_optimizer, windows
from torch import nn

import gradguard as gg

# ---------------------------------------------------------------------------- configurations


@dataclass
class Attached:
    """What a configuration added to one run: the guard whose Events are read (``None``: not
    observed), a call before ``optimizer.step()`` (``None``: hooks do the work), and how to
    undo everything."""

    guard: gg.GradGuard | None = None
    before_step: Callable[[], Any] | None = None
    teardown: Callable[[], Any] = lambda: None


Setup = Callable[[nn.Module, torch.optim.Optimizer, bool], Attached]


def _observer(model: nn.Module, optimizer: torch.optim.Optimizer, **kwargs: Any) -> gg.GradGuard:
    """The guard every configuration gets: defaults, logging every 10 steps, no sinks."""
    return gg.attach(model, optimizer, log_every_n_steps=10, sinks=[], **kwargs)


def _plain(model: nn.Module, optimizer: torch.optim.Optimizer, observe: bool) -> Attached:
    """No clipping: the baseline every clip rule must beat."""
    guard = _observer(model, optimizer) if observe else None
    return Attached(guard=guard, teardown=guard.detach if guard else lambda: None)


def _torch_clip(max_norm: float) -> Setup:
    """``torch.nn.utils.clip_grad_norm_(max_norm)`` before every update, in a pre-hook placed
    after the guard's so the guard still measures the unclipped gradient."""

    def setup(model: nn.Module, optimizer: torch.optim.Optimizer, observe: bool) -> Attached:
        guard = _observer(model, optimizer) if observe else None
        params = [p for p in model.parameters() if p.requires_grad]

        def clip(*_: Any) -> None:
            torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)

        handle = optimizer.register_step_pre_hook(clip)

        def teardown() -> None:
            handle.remove()
            if guard is not None:
                guard.detach()

        return Attached(guard=guard, teardown=teardown)

    return setup


def _recover(model: nn.Module, optimizer: torch.optim.Optimizer, observe: bool) -> Attached:
    """The recovery ladder with its defaults, a fresh one per run (it keeps state)."""
    guard = _observer(model, optimizer, on_instability=gg.Recover(on_exhausted="warn"))
    return Attached(guard=guard, teardown=guard.detach)


def _gradguard_clip(make_clip: Callable[[], gg.ClipStrategy], **kwargs: Any) -> Setup:
    """A gradguard clip strategy; its guard is also the observer (one guard per optimizer)."""

    def setup(model: nn.Module, optimizer: torch.optim.Optimizer, observe: bool) -> Attached:
        guard = _observer(model, optimizer, clip=make_clip(), **kwargs)
        return Attached(guard=guard, teardown=guard.detach)

    return setup


@dataclass(frozen=True)
class Config:
    label: str
    setup: Setup
    default: bool = True


# Configuration name -> how to set it up. Add an entry to benchmark a new recipe; entries with
# default=False run only when named in --configs.
CONFIGS: dict[str, Config] = {
    "none": Config("no clipping", _plain),
    "clip_grad_norm": Config("`clip_grad_norm_(1.0)`", _torch_clip(1.0)),
    "autoclip": Config("`gg.AutoClip()`", _gradguard_clip(gg.AutoClip)),
    "zclip": Config("`gg.ZClip()`", _gradguard_clip(gg.ZClip)),
    "recover": Config(
        '`on_instability=gg.Recover(on_exhausted="warn")` (no clipping)',
        _recover,
    ),
    "zclip+skip": Config(
        '`gg.ZClip()`, `on_nonfinite="skip"`, `on_spike="skip"`',
        _gradguard_clip(gg.ZClip, on_nonfinite="skip", on_spike="skip"),
        default=False,
    ),
}
DEFAULT_CONFIGS = [name for name, config in CONFIGS.items() if config.default]

# ---------------------------------------------------------------------------- one run


@dataclass(frozen=True)
class Settings:
    """Everything that shapes a sweep besides learning rate, configuration and seed."""

    model: ModelConfig = field(default_factory=ModelConfig)
    steps: int = 300
    batch_size: int = 8
    warmup_steps: int = 30
    eval_every: int = 25
    val_windows: int = 256  # the final evaluation; periodic ones use every 4th window
    corpus_chars: int = 1_500_000
    target_val_loss: float = 2.6
    observe: bool = True


@dataclass
class Validation:
    """Fixed validation windows, spread evenly over the validation text."""

    final: tuple[torch.Tensor, torch.Tensor]
    periodic: tuple[torch.Tensor, torch.Tensor]

    @classmethod
    def build(cls, corpus: Corpus, settings: Settings) -> Validation:
        context = settings.model.context
        top = len(corpus.val) - context - 2
        offsets = torch.linspace(0, top, settings.val_windows).long()
        x, y = windows(corpus.val, offsets, context)
        return cls((x, y), (x[::4], y[::4]))


@torch.no_grad()
def evaluate(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor], chunk: int = 64) -> float:
    """Mean validation cross-entropy (``inf`` when not finite)."""
    was_training = model.training
    model.eval()
    x, y = data
    total = 0.0
    for start in range(0, len(x), chunk):
        part = slice(start, start + chunk)
        total += lm_loss(model, x[part], y[part]).item() * len(x[part])
    model.train(was_training)
    mean = total / len(x)
    return mean if math.isfinite(mean) else math.inf


@dataclass
class Seeded:
    """What every run of one seed shares: initial weights, their loss, the batches."""

    seed: int
    initial_state: dict[str, torch.Tensor]
    initial_val_loss: float
    offsets: torch.Tensor


def train_run(
    settings: Settings,
    config: str,
    lr: float,
    seeded: Seeded,
    corpus: Corpus,
    validation: Validation,
) -> RunResult:
    """Train one configuration from the seed's initial weights on the seed's batches."""
    started = time.perf_counter()
    model = TinyGPT(settings.model)
    model.load_state_dict(seeded.initial_state)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(model, lr)
    warmup = max(1, settings.warmup_steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    attached = CONFIGS[config].setup(model, optimizer, settings.observe)
    guard = attached.guard
    layers = update_layers(model)
    losses: list[float] = []
    grad_norms: list[float] = []
    update_ratios: list[list[float]] = []
    val_losses = [(0, seeded.initial_val_loss)]
    try:
        for step in range(settings.steps):
            x, y = windows(corpus.train, seeded.offsets[step], settings.model.context)
            loss = lm_loss(model, x, y)
            if guard is not None:
                guard.observe_loss(loss)  # the loss-aware detectors read it (no sync)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            grads = [p.grad for p in params if p.grad is not None]
            grad_norms.append(torch.nn.utils.get_total_norm(grads).item())
            if attached.before_step is not None:
                attached.before_step()
            before = [torch._foreach_mul(list(group), 1.0) for _, group in layers]
            optimizer.step()
            update_ratios.append(_update_ratios(layers, before))
            schedule.step()
            losses.append(loss.item())
            if not math.isfinite(losses[-1]):
                break  # the weights are NaN from here on: nothing more to learn
            if (step + 1) % settings.eval_every == 0:
                val_losses.append((step + 1, evaluate(model, validation.periodic)))
        final_val = evaluate(model, validation.final)
    finally:
        attached.teardown()  # detach() drains the guard's last flags into Events
    events = None
    if guard is not None:
        events = [{"step": e.step, "kind": e.kind, "message": e.message} for e in guard.events]
    return summarise_run(
        config=config,
        lr=lr,
        seed=seeded.seed,
        train_losses=losses,
        grad_norms=grad_norms,
        update_ratios=update_ratios,
        layers=[name for name, _ in layers],
        val_losses=val_losses,
        final_val_loss=final_val,
        target_val_loss=settings.target_val_loss,
        events=events,
        seconds=time.perf_counter() - started,
    )


def update_layers(model: nn.Module) -> list[tuple[str, list[torch.Tensor]]]:
    """The modules that own parameters directly (gradguard's layers), with their parameters."""
    layers = []
    for name, module in model.named_modules():
        params = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if params:
            layers.append((name or "root", params))
    return layers


@torch.no_grad()
def _update_ratios(
    layers: Sequence[tuple[str, list[torch.Tensor]]], before: Sequence[list[torch.Tensor]]
) -> list[float]:
    """``||update|| / ||param||`` per layer for the step just taken (recorded for offline
    replay of update-based detectors; the benchmark's own cost, not gradguard's)."""
    ratios = []
    for (_, params), old in zip(layers, before):
        update = torch.stack(torch._foreach_norm(torch._foreach_sub(params, old))).norm()
        weight = torch.stack(torch._foreach_norm(params)).norm()
        ratios.append(float(update / weight.clamp_min(1e-12)))
    return ratios


# ---------------------------------------------------------------------------- the sweep


def run_sweep(
    settings: Settings,
    lrs: Sequence[float],
    configs: Sequence[str],
    seeds: Sequence[int],
    log: Callable[[str], None] = lambda text: None,
) -> list[RunResult]:
    """Every seed x learning rate x configuration. The runs of one seed share their initial
    weights and batches, so a difference between configurations is the configuration's."""
    corpus = Corpus.from_stdlib(settings.corpus_chars)
    validation = Validation.build(corpus, settings)
    results: list[RunResult] = []
    with warnings.catch_warnings():
        # The Events are what is measured; their warnings would only flood the output.
        warnings.simplefilter("ignore", gg.GradGuardWarning)
        for seed in seeds:
            torch.manual_seed(seed)
            initial = TinyGPT(settings.model)
            seeded = Seeded(
                seed=seed,
                initial_state={k: v.clone() for k, v in initial.state_dict().items()},
                initial_val_loss=evaluate(initial, validation.final),
                offsets=batch_offsets(
                    len(corpus.train),
                    settings.model.context,
                    settings.steps,
                    settings.batch_size,
                    seed,
                ),
            )
            for lr in lrs:
                for config in configs:
                    results.append(train_run(settings, config, lr, seeded, corpus, validation))
                    log(_run_line(results[-1]))
    return results


def _run_line(r: RunResult) -> str:
    event = f"{r.first_event_kind}@{r.first_event_step}" if r.first_event_kind else "no event"
    spikes = f"{r.spikes} spikes" + (f" (first @{r.first_spike_step})" if r.spike_steps else "")
    return (
        f"seed {r.seed} lr {r.lr:<6g} {r.config:>14}: val {r.final_val_loss:.3f}"
        f"{' DIVERGED' if r.diverged else ''}, {spikes}, {event}, {r.seconds:.1f} s"
    )


# ---------------------------------------------------------------------------- reporting


def machine_description() -> str:
    """CPU model, cores, torch threads and versions, as ``overhead.py`` prints them."""
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
    return (
        f"CPU: {cpu}, {cores} cores available, torch threads {torch.get_num_threads()}; "
        f"torch {torch.__version__}, Python {platform.python_version()}, "
        f"gradguard {gg.__version__}"
    )


def describe_setup(settings: Settings, seeds: Sequence[int]) -> str:
    """One paragraph: the model, data, optimizer and schedule a report was measured with."""
    model = settings.model
    return (
        f"Model: {model.n_layers} pre-LN blocks, d_model {model.d_model}, {model.n_heads} "
        f"heads, context {model.context}, vocabulary {model.vocab}. Data: the first "
        f"{settings.corpus_chars:,} characters of Python {platform.python_version()}'s standard "
        "library (top-level `.py` files, sorted), the last 10% held out. AdamW (betas 0.9/0.95, "
        f"weight decay 0.1), {settings.warmup_steps} linear warm-up steps then a constant rate; "
        f"{settings.steps} steps of {settings.batch_size} x {model.context} characters; seeds "
        f"{', '.join(map(str, seeds))}. Validation: {settings.val_windows} fixed windows at the "
        f"end, every 4th of them every {settings.eval_every} steps; target validation loss "
        f"{settings.target_val_loss:g}. Every configuration of a seed starts from the same "
        "weights and sees the same batches. The observing guard: "
        f"{'on' if settings.observe else 'off (--no-observe)'}. Definitions: the docstring of "
        "`benchmarks/stability.py`."
    )


def render_markdown(
    results: Sequence[RunResult],
    settings: Settings,
    configs: Sequence[str],
    lrs: Sequence[float],
    seeds: Sequence[int],
    command: str,
    seconds: float,
    max_load: float = 0.0,
) -> str:
    """The whole report: where and how it ran, a table per metric, then every run."""
    labels = {name: CONFIGS[name].label for name in configs}
    shared = ""
    if max_load > 1.0:
        # The metrics do not depend on the load (every run is deterministic); the time does.
        shared = f" (1-minute load average up to {max_load:.1f}: the machine was shared)"
    return "\n".join(
        [
            "# gradguard stability: a tiny char-level GPT over a learning-rate sweep",
            "",
            f"Measured {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC on: "
            f"{machine_description()}; the sweep took {seconds / 60:.1f} minutes{shared}.",
            "",
            f"Command: `{command}`",
            "",
            describe_setup(settings, seeds),
            "",
            render_tables(results, labels, lrs),
            render_kind_tables(results, gg.EVENT_KINDS, lrs),
            render_lr_table(results, lrs),
            "## Every run",
            "",
            render_runs(results),
        ]
    )


# ---------------------------------------------------------------------------- main

# Plain AdamW on this model is healthy up to about 0.3 and blows up from about 0.5 (measured:
# see RESULTS-stability.md), far above the 1e-3..3e-2 where larger models spike.
DEFAULT_LRS = (3e-3, 3e-2, 3e-1, 5e-1, 1.0)
QUICK_LRS = (3e-3, 1.0)


def _load() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return 0.0


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def _config_names(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    for name in names:
        if name not in CONFIGS:
            raise argparse.ArgumentTypeError(
                f"unknown configuration {name!r}; choose from {', '.join(CONFIGS)}"
            )
    return names


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="2 rates x 1 seed x 100 steps: a smoke test"
    )
    parser.add_argument("--lrs", type=_floats, default=None, help="comma list of peak rates")
    parser.add_argument(
        "--configs", type=_config_names, default=None, help=f"comma list of {', '.join(CONFIGS)}"
    )
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds: 0, 1, ...")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run")
    parser.add_argument("--target", type=float, default=None, help="target validation loss")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1)")
    parser.add_argument(
        "--observe",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="attach an observing guard to every configuration (default: on)",
    )
    parser.add_argument("--markdown", default=None, help="write the report here")
    parser.add_argument("--json", default=None, help="write every run's raw numbers here")
    parser.add_argument("--list", action="store_true", help="list the configurations and exit")
    return parser.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    """The defaults, then --quick, then explicit options."""
    settings = Settings(observe=args.observe)
    if args.quick:
        settings = replace(
            settings, steps=100, warmup_steps=10, corpus_chars=300_000, val_windows=64
        )
    if args.steps is not None:
        settings = replace(settings, steps=args.steps, warmup_steps=max(1, args.steps // 10))
    if args.target is not None:
        settings = replace(settings, target_val_loss=args.target)
    return settings


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        for name, config in CONFIGS.items():
            print(f"{name:16s} {config.label}{'' if config.default else '  (not by default)'}")
        return 0
    torch.set_num_threads(args.threads)
    settings = settings_from(args)
    lrs = args.lrs or list(QUICK_LRS if args.quick else DEFAULT_LRS)
    configs = args.configs or DEFAULT_CONFIGS
    seeds = list(range(args.seeds if args.seeds is not None else (1 if args.quick else 3)))
    command = "python benchmarks/stability.py " + " ".join(sys.argv[1:] if argv is None else argv)

    max_load = _load()

    def log(text: str) -> None:
        nonlocal max_load
        max_load = max(max_load, _load())
        print(text, file=sys.stderr, flush=True)

    log(machine_description())
    log(f"{len(lrs)} rates x {len(configs)} configurations x {len(seeds)} seeds")
    started = time.perf_counter()
    results = run_sweep(settings, lrs, configs, seeds, log)
    seconds = time.perf_counter() - started
    log(f"total {seconds:.0f} s")
    report = render_markdown(
        results, settings, configs, lrs, seeds, command.strip(), seconds, max_load
    )
    print(report)
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(report)
        log(f"wrote {args.markdown}")
    if args.json:
        header = {
            "machine": machine_description(),
            "command": command.strip(),
            "settings": asdict(settings),
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(runs_to_json(results, header))
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
