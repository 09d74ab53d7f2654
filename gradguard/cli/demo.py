"""``gradguard demo``: a broken model and the same model fixed, side by side, on digits.

Each case trains two small MLPs on scikit-learn's bundled 8x8 digits (no download): one
with a known problem and one repaired the way gradguard's advice says. Both are watched
by a ``GradGuard``; the demo prints both reports and the accuracy they reached, writes
TensorBoard logs (and W&B runs with ``--wandb``) and prints the command that opens them.
"""

from __future__ import annotations

import math
import os
import shlex
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from itertools import pairwise
from pathlib import Path
from typing import Any, Protocol, TextIO

import torch
from torch import nn

from .._errors import GradGuardWarning, MissingDependencyError
from .._guard import GradGuard
from .._histograms import Histograms
from .._sinks import MemorySink, Sink

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

Digits = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
Builder = Callable[[int], tuple[nn.Module, torch.optim.Optimizer]]


# ---------------------------------------------------------------------------- data
def load_digits_split(test_fraction: float = 0.2) -> Digits:
    """scikit-learn's bundled digits as (x_train, y_train, x_test, y_test), standardised.

    The split is fixed (it does not depend on the demo's seed), so runs compare alike.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise MissingDependencyError("scikit-learn", "demo") from error
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32)
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(12345))
    n_test = round(x.shape[0] * test_fraction)
    test, train = order[:n_test], order[n_test:]
    mean, std = x[train].mean(0), x[train].std(0) + 1e-6
    x = (x - mean) / std
    return x[train], y[train], x[test], y[test]


# ---------------------------------------------------------------------------- models
def _mlp(sizes: list[int], activation: Callable[[], nn.Module]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(pairwise(sizes)):
        layers.append(nn.Linear(fan_in, fan_out))
        if i < len(sizes) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)


def _linears(model: nn.Module) -> Iterator[nn.Linear]:
    return (m for m in model.modules() if isinstance(m, nn.Linear))


def _he_init(model: nn.Module) -> nn.Module:
    """He (Kaiming) normal weights for ReLU layers, zero biases."""
    with torch.no_grad():
        for linear in _linears(model):
            nn.init.kaiming_normal_(linear.weight, nonlinearity="relu")
            nn.init.zeros_(linear.bias)
    return model


DEEP = [64] + [32] * 10 + [10]


def vanishing_broken(seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = _mlp(DEEP, nn.Sigmoid)
    return model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)


def vanishing_fixed(seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = _he_init(_mlp(DEEP, nn.ReLU))
    return model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)


DEAD = [64, 128, 128, 128, 10]
DEAD_BIAS = -1.5


def dead_broken(seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = _mlp(DEAD, nn.ReLU)
    with torch.no_grad():
        for linear in list(_linears(model))[:-1]:
            nn.init.constant_(linear.bias, DEAD_BIAS)
    return model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


def dead_fixed(seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = _he_init(_mlp(DEAD, nn.ReLU))
    return model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


EXPLODING = [64] + [64] * 8 + [10]
EXPLODING_GAIN = 3.0


def exploding_broken(seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = _mlp(EXPLODING, nn.ReLU)
    with torch.no_grad():
        for linear in _linears(model):
            # EXPLODING_GAIN times the He scale: every layer multiplies the signal (forward)
            # and the gradient (backward) by about EXPLODING_GAIN.
            nn.init.normal_(linear.weight, std=EXPLODING_GAIN * math.sqrt(2.0 / linear.in_features))
    # Adam bounds each update, so the weights do not turn NaN at once: the model trains on,
    # badly, with gradients 10^4 times their healthy size.
    return model, torch.optim.Adam(model.parameters(), lr=1e-3)


def exploding_fixed(seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = _he_init(_mlp(EXPLODING, nn.ReLU))
    return model, torch.optim.Adam(model.parameters(), lr=1e-3)


@dataclass(frozen=True)
class DemoCase:
    """One problem: how to build the broken and the fixed model, and what differs."""

    name: str
    problem: str
    broken: str
    fixed: str
    build_broken: Builder
    build_fixed: Builder
    fixed_guard_kwargs: dict[str, Any] = field(default_factory=dict)


CASES: dict[str, DemoCase] = {
    "vanishing": DemoCase(
        name="vanishing",
        problem="vanishing gradients",
        broken=(
            "10 hidden layers of 32 sigmoid units, PyTorch's default init, "
            "SGD(lr=0.01, momentum=0.9)"
        ),
        fixed="the same 10 hidden layers with ReLU and He (Kaiming) init, same optimizer",
        build_broken=vanishing_broken,
        build_fixed=vanishing_fixed,
    ),
    "dead": DemoCase(
        name="dead",
        problem="dead ReLU units",
        broken=(
            f"3 hidden ReLU layers of 128 units whose biases start at {DEAD_BIAS}, "
            "SGD(lr=0.05, momentum=0.9)"
        ),
        fixed="the same layers with He init and zero biases, same optimizer",
        build_broken=dead_broken,
        build_fixed=dead_fixed,
    ),
    "exploding": DemoCase(
        name="exploding",
        problem="exploding gradients",
        broken=(
            f"8 hidden ReLU layers of 64 units initialised {EXPLODING_GAIN:g}x too large, "
            "Adam(lr=1e-3)"
        ),
        fixed="the same layers with He init, same optimizer",
        build_broken=exploding_broken,
        build_fixed=exploding_fixed,
    ),
}


# ---------------------------------------------------------------------------- progress
class Progress(Protocol):
    def update(self, loss: float | None) -> None: ...

    def write(self, text: str) -> None: ...

    def close(self) -> None: ...


class _NoProgress:
    def __init__(self, out: TextIO) -> None:
        self._out = out

    def update(self, loss: float | None) -> None:
        pass

    def write(self, text: str) -> None:
        print(text, file=self._out)

    def close(self) -> None:
        pass


class _SimpleProgress:
    """A one-line bar on stderr for when tqdm is not installed."""

    def __init__(self, total: int, label: str) -> None:
        self.total, self.label, self.done = total, label, 0
        self._last_drawn = -1

    def update(self, loss: float | None) -> None:
        self.done += 1
        tick = self.done * 40 // self.total
        if tick != self._last_drawn or self.done == self.total:
            self._last_drawn = tick
            bar = "#" * tick + "." * (40 - tick)
            tail = f" loss {loss:.3f}" if loss is not None else ""
            sys.stderr.write(f"\r{self.label} [{bar}] {self.done}/{self.total}{tail}")
            sys.stderr.flush()

    def write(self, text: str) -> None:
        sys.stderr.write("\r" + " " * 100 + "\r")
        print(text, file=sys.stderr)

    def close(self) -> None:
        sys.stderr.write("\n")
        sys.stderr.flush()


class _TqdmProgress:
    def __init__(self, total: int, label: str) -> None:
        from tqdm import tqdm

        self._bar = tqdm(total=total, desc=label, unit="step", leave=True, dynamic_ncols=True)

    def update(self, loss: float | None) -> None:
        if loss is not None:
            self._bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
        self._bar.update(1)

    def write(self, text: str) -> None:
        self._bar.write(text, file=sys.stderr)

    def close(self) -> None:
        self._bar.close()


def make_progress(total: int, label: str, enabled: bool, out: TextIO) -> Progress:
    if not enabled:
        return _NoProgress(out)
    try:
        return _TqdmProgress(total, label)
    except ImportError:
        return _SimpleProgress(total, label)


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
