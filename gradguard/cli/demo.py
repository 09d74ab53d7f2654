"""``gradguard demo``: a broken model and the same model fixed, side by side, on digits.

Each case trains two small MLPs on scikit-learn's bundled 8x8 digits (no download): one
with a known problem and one repaired the way gradguard's advice says. Both are watched
by a ``GradGuard``; the demo prints both reports and the accuracy they reached, writes
TensorBoard logs (and W&B runs with ``--wandb``) and prints the command that opens them.
"""

from __future__ import annotations

import os
import shlex
import sys
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

import torch
from torch import nn

from .._errors import GradGuardWarning, MissingDependencyError
from .._guard import GradGuard
from .._histograms import Histograms
from .._sinks import MemorySink, Sink
from .cases import CASES, Builder, DemoCase, Digits, load_digits_split
from .progress import make_progress

__all__ = [
    "CASES",
    "DEFAULT_STEPS",
    "DemoCase",
    "DemoOptions",
    "DemoResult",
    "RunResult",
    "run_demo",
]

DEFAULT_STEPS = 600
BATCH_SIZE = 64
LOG_EVERY_N_STEPS = 10
WIDTH = 78


# ---------------------------------------------------------------------------- training
@dataclass
class DemoOptions:
    case: str = "vanishing"
    steps: int = DEFAULT_STEPS
    logdir: str | None = "runs/gradguard-demo"
    wandb: bool = False
    seed: int = 0
    progress: bool = True


@dataclass
class RunResult:
    """One trained model: its guard, its accuracy and what gradguard found."""

    label: str
    description: str
    guard: GradGuard
    report: str
    accuracy: float
    final_loss: float
    seconds: float
    warnings: list[str]
    sink: MemorySink

    @property
    def event_counts(self) -> Counter[str]:
        return Counter(event.kind for event in self.guard.events)


@dataclass
class DemoResult:
    case: DemoCase
    broken: RunResult
    fixed: RunResult
    tensorboard_dir: Path | None
    notes: list[str]


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        logits = model(x)
    model.train()
    if not bool(torch.isfinite(logits).all()):
        return float("nan")
    return float((logits.argmax(1) == y).float().mean())


def train_one(
    label: str,
    description: str,
    builder: Builder,
    data: Digits,
    options: DemoOptions,
    sinks: list[Sink],
    out: TextIO,
    guard_kwargs: dict[str, Any] | None = None,
) -> RunResult:
    x_train, y_train, x_test, y_test = data
    model, optimizer = builder(options.seed)
    memory = MemorySink()
    guard = GradGuard(
        log_every_n_steps=LOG_EVERY_N_STEPS,
        sinks=[memory, *sinks],
        # Per-layer gradient histograms for the dashboards, every 5th logging step.
        histograms=Histograms(every_n_logs=5) if sinks else None,
        **(guard_kwargs or {}),
    )
    guard.attach(model, optimizer)
    batches = torch.Generator().manual_seed(options.seed + 1)
    progress = make_progress(options.steps, label, options.progress, out)
    shown: list[str] = []
    loss_value = float("nan")
    start = time.perf_counter()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", GradGuardWarning)
            for step in range(options.steps):
                idx = torch.randint(0, x_train.shape[0], (BATCH_SIZE,), generator=batches)
                optimizer.zero_grad(set_to_none=True)
                loss = nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
                loss.backward()  # type: ignore[no-untyped-call]
                optimizer.step()
                report_loss = step % 10 == 0 or step == options.steps - 1
                if report_loss:
                    loss_value = float(loss.detach())  # host read for the progress bar only
                progress.update(loss_value if report_loss else None)
                while len(shown) < len(caught):
                    record = caught[len(shown)]
                    shown.append(str(record.message))
                    kind = (
                        "gradguard warning"
                        if issubclass(record.category, GradGuardWarning)
                        else record.category.__name__
                    )
                    progress.write(f"  {kind}: {record.message}")
    finally:
        progress.close()
        guard.close()  # detach and close the TensorBoard / W&B sinks
    seconds = time.perf_counter() - start
    return RunResult(
        label=label,
        description=description,
        guard=guard,
        report=guard.report(),
        accuracy=_accuracy(model, x_test, y_test),
        final_loss=loss_value,
        seconds=seconds,
        warnings=shown,
        sink=memory,
    )


# ---------------------------------------------------------------------------- sinks
def _tensorboard_sink(directory: Path, notes: list[str]) -> Sink | None:
    try:
        from ..integrations.tensorboard import TensorBoardSink

        sink: Sink = TensorBoardSink(str(directory))
    except ImportError as error:  # MissingDependencyError is an ImportError too
        notes.append(f"TensorBoard logs skipped: {error}")
        return None
    return sink


def _wandb_mode() -> str:
    """``WANDB_MODE`` if set; online when an API key is configured; else offline."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        if "api.wandb.ai" in netrc.read_text():
            return "online"
    except OSError:
        pass
    return "offline"


@contextmanager
def _wandb_run(
    case: str, label: str, options: DemoOptions, notes: list[str]
) -> Iterator[Sink | None]:
    if not options.wandb:
        yield None
        return
    try:
        import wandb

        from ..integrations.wandb import WandbSink
    except ImportError as error:
        raise MissingDependencyError("wandb", "wandb") from error
    mode = _wandb_mode()
    run: Any = wandb.init(
        project="gradguard-demo",
        name=f"{case}-{label}",
        group=case,
        mode=mode,  # type: ignore[arg-type]
        dir=options.logdir or ".",
        config={"case": case, "model": label, "steps": options.steps, "seed": options.seed},
    )
    try:
        yield WandbSink(run=run)
    finally:
        run.finish()
        where = getattr(getattr(run, "settings", None), "sync_dir", None)
        if mode == "offline" and where:
            upload = f"wandb sync {shlex.quote(str(where))}"
            notes.append(f"W&B run '{case}-{label}' saved offline; upload it with: {upload}")
        elif mode == "online":
            notes.append(f"W&B run '{case}-{label}': {getattr(run, 'url', '')}")


# ---------------------------------------------------------------------------- output
def _heading(title: str, out: TextIO) -> None:
    print("", file=out)
    print("=" * WIDTH, file=out)
    print(title, file=out)
    print("=" * WIDTH, file=out)


def _events_text(run: RunResult) -> str:
    counts = run.event_counts
    if not counts:
        return "none"
    return ", ".join(f"{kind} x{count}" for kind, count in counts.most_common())


def _percent(value: float) -> str:
    return "NaN (weights not finite)" if value != value else f"{100 * value:.1f}%"


def _summary(result: DemoResult, out: TextIO) -> None:
    broken, fixed = result.broken, result.fixed
    _heading("Summary", out)
    rows = [
        ("", "broken", "fixed"),
        ("test accuracy", _percent(broken.accuracy), _percent(fixed.accuracy)),
        ("last training loss", f"{broken.final_loss:.3f}", f"{fixed.final_loss:.3f}"),
        ("gradguard events", _events_text(broken), _events_text(fixed)),
        ("training time", f"{broken.seconds:.1f} s", f"{fixed.seconds:.1f} s"),
    ]
    first = max(len(r[0]) for r in rows)
    second = max(len(r[1]) for r in rows)
    for name, left, right in rows:
        print(f"  {name:<{first}}  {left:<{second}}  {right}", file=out)
    if broken.accuracy == broken.accuracy:
        gain = 100 * (fixed.accuracy - broken.accuracy)
        print(
            f"\nFixing the {result.case.problem} gained {gain:+.1f} points of test accuracy "
            f"({_percent(broken.accuracy)} -> {_percent(fixed.accuracy)}).",
            file=out,
        )
    else:
        print(
            f"\nThe broken model's weights went NaN; the fixed one reached "
            f"{_percent(fixed.accuracy)} test accuracy.",
            file=out,
        )


def run_demo(options: DemoOptions, out: TextIO | None = None) -> DemoResult:
    """Train the broken and the fixed model of ``options.case``; print what gradguard saw."""
    # The models are tiny: one thread is fastest, and it does not fight other processes
    # for the cores (several intra-op threads on a busy machine slow every step down).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run_demo(options, out if out is not None else sys.stdout)
    finally:
        torch.set_num_threads(threads)


def _run_demo(options: DemoOptions, stream: TextIO) -> DemoResult:
    case = CASES[options.case]
    data = load_digits_split()
    notes: list[str] = []
    tb_root: Path | None = None
    run_dir = Path(".")
    if options.logdir is not None:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        tb_root = Path(options.logdir)
        run_dir = tb_root / f"{stamp}-{case.name}"
    print(
        f"gradguard demo: {case.problem} on scikit-learn's digits "
        f"({data[0].shape[0]} training / {data[2].shape[0]} test images, "
        f"{options.steps} steps per model)",
        file=stream,
    )
    runs: dict[str, RunResult] = {}
    for label, description, builder, kwargs in (
        ("broken", case.broken, case.build_broken, {}),
        ("fixed", case.fixed, case.build_fixed, case.fixed_guard_kwargs),
    ):
        sinks: list[Sink] = []
        if tb_root is not None:
            tb_sink = _tensorboard_sink(run_dir / label, notes)
            if tb_sink is None:
                tb_root = None
            else:
                sinks.append(tb_sink)
        with _wandb_run(case.name, label, options, notes) as wandb_sink:
            if wandb_sink is not None:
                sinks.append(wandb_sink)
            print(f"\n[{label}] {description}", file=stream)
            stream.flush()
            runs[label] = train_one(
                label, description, builder, data, options, sinks, stream, kwargs
            )

    result = DemoResult(case, runs["broken"], runs["fixed"], tb_root, notes)
    for number, run in enumerate((result.broken, result.fixed), start=1):
        _heading(f"{number}) {run.label.upper()} model: {run.description}", stream)
        print(run.report, file=stream)
    _summary(result, stream)
    print("", file=stream)
    for note in notes:
        print(note, file=stream)
    if tb_root is not None:
        print(
            "See the per-layer gradient norms (CUSTOM SCALARS), the gradient-flow heatmap "
            "(IMAGES) and the gradient histograms (HISTOGRAMS) in TensorBoard:",
            file=stream,
        )
        print(f"  tensorboard --logdir {shlex.quote(str(tb_root))}", file=stream)
    others = [name for name in CASES if name != case.name]
    print(f"Other cases: gradguard demo --case {' | '.join(others)}", file=stream)
    return result
