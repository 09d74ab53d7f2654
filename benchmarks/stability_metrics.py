"""What ``stability.py`` measures in one run, and how the sweep's tables show it.

The definitions (loss spike, diverged, lead time, false alarm...) are in the docstring of
``benchmarks/stability.py``; the functions here implement them, from a run's loss curves
and its guard's Events alone, so the numbers can be recomputed from the JSON output.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = [
    "DIVERGENCE_FACTOR",
    "SPIKE_FACTOR",
    "SPIKE_MIN_HISTORY",
    "SPIKE_WINDOW",
    "RunResult",
    "grad_jump_before",
    "loss_spikes",
    "render_kind_tables",
    "render_lr_table",
    "render_runs",
    "render_tables",
    "runs_to_json",
    "summarise_run",
]

SPIKE_FACTOR = 1.5  # a loss this many times the recent median is a spike
SPIKE_WINDOW = 30  # "recent": the previous 30 steps
SPIKE_MIN_HISTORY = 10  # no spike before step 10: the median of fewer steps is noise
DIVERGENCE_FACTOR = 1.0  # final val loss above this times the initial one: diverged


@dataclass
class RunResult:
    """The raw numbers of one run; ``None`` where a metric does not apply."""

    config: str
    lr: float
    seed: int
    initial_val_loss: float
    final_val_loss: float
    diverged: bool
    spike_steps: list[int]
    first_spike_step: int | None
    grad_jump_before_spike: float | None
    steps_to_target: int | None
    observed: bool
    events: list[dict[str, Any]]
    first_event_step: int | None
    first_event_kind: str | None
    lead_time: int | None
    false_alarm: bool
    seconds: float
    train_losses: list[float] = field(repr=False)
    grad_norms: list[float] = field(repr=False)
    update_ratios: list[list[float]] = field(repr=False)
    layers: list[str] = field(repr=False)
    val_losses: list[tuple[int, float]] = field(repr=False)

    @property
    def spikes(self) -> int:
        return len(self.spike_steps)

    def first_event_of(self, kind: str) -> int | None:
        """The step of the run's first Event of ``kind`` (None: no such Event)."""
        return next((int(e["step"]) for e in self.events if e["kind"] == kind), None)

    @property
    def healthy(self) -> bool:
        """Neither spiked nor diverged: a run on which every Event is a false alarm."""
        return not self.spike_steps and not self.diverged


def loss_spikes(losses: Sequence[float]) -> list[int]:
    """First steps of the loss spikes: a step whose loss exceeds ``SPIKE_FACTOR`` times the
    median of the up to ``SPIKE_WINDOW`` finite losses before it (from step
    ``SPIKE_MIN_HISTORY`` on), or is NaN/Inf. Consecutive spiking steps are one spike."""
    starts: list[int] = []
    in_spike = False
    for step, loss in enumerate(losses):
        if not math.isfinite(loss):
            if not in_spike:
                starts.append(step)
            break
        history = [v for v in losses[max(0, step - SPIKE_WINDOW) : step] if math.isfinite(v)]
        spiking = step >= SPIKE_MIN_HISTORY and loss > SPIKE_FACTOR * statistics.median(history)
        if spiking and not in_spike:
            starts.append(step)
        in_spike = spiking
    return starts


def grad_jump_before(grad_norms: Sequence[float], step: int, lookback: int = 5) -> float | None:
    """The largest ``grad_norms[t] / median(grad_norms[t - SPIKE_WINDOW : t])`` over the
    ``lookback`` steps up to and including ``step``: how loudly the gradient norm announced a
    loss spike (a norm-based detector can only warn early if this is large)."""
    jumps = []
    for t in range(max(1, step - lookback), min(step, len(grad_norms) - 1) + 1):
        history = [g for g in grad_norms[max(0, t - SPIKE_WINDOW) : t] if math.isfinite(g)]
        if history and math.isfinite(grad_norms[t]) and statistics.median(history) > 0:
            jumps.append(grad_norms[t] / statistics.median(history))
    return max(jumps) if jumps else None


def summarise_run(
    *,
    config: str,
    lr: float,
    seed: int,
    train_losses: list[float],
    grad_norms: list[float],
    val_losses: list[tuple[int, float]],
    final_val_loss: float,
    target_val_loss: float,
    events: list[dict[str, Any]] | None,
    seconds: float,
    update_ratios: list[list[float]] | None = None,
    layers: list[str] | None = None,
) -> RunResult:
    """The metrics of one run. ``val_losses`` starts with the initial weights' loss at step
    0 (on the final, larger validation set); ``events`` is ``None`` when no guard watched."""
    initial_val = val_losses[0][1]
    nonfinite = not all(math.isfinite(v) for v in train_losses)
    final_val = math.inf if nonfinite or not math.isfinite(final_val_loss) else final_val_loss
    diverged = nonfinite or final_val > DIVERGENCE_FACTOR * initial_val
    spikes = loss_spikes(train_losses)
    first_spike = spikes[0] if spikes else None
    reached = [step for step, v in val_losses[1:] if v <= target_val_loss]
    observed = events is not None
    events = events or []
    first_event = events[0] if events else None
    lead = None
    if first_spike is not None and first_event is not None:
        lead = first_spike - int(first_event["step"])
    return RunResult(
        config=config,
        lr=lr,
        seed=seed,
        initial_val_loss=initial_val,
        final_val_loss=final_val,
        diverged=diverged,
        spike_steps=spikes,
        first_spike_step=first_spike,
        grad_jump_before_spike=(
            None if first_spike is None else grad_jump_before(grad_norms, first_spike)
        ),
        steps_to_target=reached[0] if reached else None,
        observed=observed,
        events=events,
        first_event_step=int(first_event["step"]) if first_event else None,
        first_event_kind=str(first_event["kind"]) if first_event else None,
        lead_time=lead,
        false_alarm=observed and not spikes and not diverged and bool(events),
        seconds=seconds,
        train_losses=[_rounded(v) for v in train_losses],
        grad_norms=[_rounded(v) for v in grad_norms],
        update_ratios=[[_significant(v) for v in row] for row in update_ratios or []],
        layers=list(layers or []),
        val_losses=[(step, _rounded(v)) for step, v in val_losses],
    )


def _rounded(value: float) -> float:
    return round(value, 5) if math.isfinite(value) else value


def _significant(value: float) -> float:
    """Four significant digits: update ratios span orders of magnitude."""
    return float(f"{value:.4g}")


# ---------------------------------------------------------------------------- table cells


def _diverged_cell(runs: list[RunResult]) -> str:
    return f"{sum(r.diverged for r in runs)}/{len(runs)}"


def _spikes_cell(runs: list[RunResult]) -> str:
    """Mean spikes per run; the median first spike step of the runs that spiked."""
    mean = statistics.fmean(r.spikes for r in runs)
    firsts = [r.first_spike_step for r in runs if r.first_spike_step is not None]
    return f"{mean:.1f}" + (f" (first @{statistics.median(firsts):.0f})" if firsts else "")


def _loss_text(value: float) -> str:
    return f"{value:.3f}" if math.isfinite(value) else "NaN/Inf"


def _val_cell(runs: list[RunResult]) -> str:
    return _loss_text(statistics.median(r.final_val_loss for r in runs))


def _target_cell(runs: list[RunResult]) -> str:
    """Median over seeds, counting a run that never reached the target as never."""
    steps = [math.inf if r.steps_to_target is None else r.steps_to_target for r in runs]
    median = statistics.median(steps)
    reached = sum(r.steps_to_target is not None for r in runs)
    return f"{'never' if math.isinf(median) else f'{median:.0f}'} ({reached}/{len(runs)})"


def _lead_cell(runs: list[RunResult]) -> str:
    """Median lead time over runs with a spike and an Event; then the spikes it missed."""
    observed = [r for r in runs if r.observed]
    if not observed:
        return "not observed"
    spiked = [r for r in observed if r.first_spike_step is not None]
    if not spiked:
        return "no spike"
    leads = [r.lead_time for r in spiked if r.lead_time is not None]
    parts = [f"{statistics.median(leads):+.0f} (n={len(leads)})"] if leads else []
    if len(leads) < len(spiked):
        parts.append(f"missed {len(spiked) - len(leads)}/{len(spiked)}")
    return ", ".join(parts)


def _first_event_cell(runs: list[RunResult]) -> str:
    observed = [r for r in runs if r.observed]
    if not observed:
        return "not observed"
    return " ".join(
        f"{r.first_event_kind}@{r.first_event_step}" if r.first_event_kind else "–"
        for r in observed
    )


def _alarm_cell(runs: list[RunResult]) -> str:
    healthy = [r for r in runs if r.observed and r.healthy]
    if not healthy:
        return "—"
    return f"{sum(r.false_alarm for r in healthy)}/{len(healthy)}"


Cell = Callable[[list[RunResult]], str]
TABLES: list[tuple[str, str, Cell]] = [
    (
        "Diverged runs / seeds",
        "NaN/Inf loss, or a final validation loss above the initial weights' one",
        _diverged_cell,
    ),
    (
        "Loss spikes per run (mean), first spike step (median of the runs that spiked)",
        f"a spike: a training loss above {SPIKE_FACTOR}x the median of the previous "
        f"{SPIKE_WINDOW} steps",
        _spikes_cell,
    ),
    ("Final validation loss (median over seeds)", "nats per character", _val_cell),
    (
        "Steps to the target validation loss (median over seeds; runs that reached it)",
        "validation every few steps, see above; never = most seeds never reached it",
        _target_cell,
    ),
    (
        "gradguard lead time (median)",
        "first loss spike step - first Event step: + = warned before the spike, - = after; "
        "missed = runs that spiked with no Event at all",
        _lead_cell,
    ),
    ("gradguard's first Event, per seed (kind@step)", "– = no Event", _first_event_cell),
    (
        "gradguard false alarms: healthy runs with an Event / healthy runs",
        "healthy = no loss spike and not diverged; — = no healthy run",
        _alarm_cell,
    ),
]


# ---------------------------------------------------------------------------- by Event kind


def _kind_lead_cell(runs: list[RunResult], kind: str) -> str:
    """Median lead time of the first Event of ``kind``, over the runs that spiked."""
    spiked = [r for r in runs if r.observed and r.first_spike_step is not None]
    if not spiked:
        return "no spike"
    leads = [
        r.first_spike_step - step
        for r in spiked
        if r.first_spike_step is not None and (step := r.first_event_of(kind)) is not None
    ]
    if not leads:
        return f"0/{len(spiked)}"
    return f"{statistics.median(leads):+.0f} ({len(leads)}/{len(spiked)})"


def _kind_alarm_cell(runs: list[RunResult], kind: str) -> str:
    healthy = [r for r in runs if r.observed and r.healthy]
    if not healthy:
        return "—"
    return f"{sum(r.first_event_of(kind) is not None for r in healthy)}/{len(healthy)}"


KIND_TABLES: list[tuple[str, str, Callable[[list[RunResult], str], str]]] = [
    (
        "Lead time by Event kind (median over the runs that spiked; detected/spiked)",
        "first loss spike step - step of the first Event of that kind, every configuration "
        "and seed of the rate together: + = before the spike, 0 = at it, - = after it",
        _kind_lead_cell,
    ),
    (
        "False alarms by Event kind: healthy runs with an Event of that kind / healthy runs",
        "every configuration and seed of the rate together; healthy = no loss spike and not "
        "diverged",
        _kind_alarm_cell,
    ),
]


def render_kind_tables(
    results: Sequence[RunResult], kinds: Sequence[str], lrs: Sequence[float]
) -> str:
    """A row per Event kind seen (in ``kinds`` order, others after), a column per rate."""
    seen = {e["kind"] for r in results for e in r.events}
    rows = [k for k in kinds if k in seen] + sorted(seen - set(kinds))
    header = "| Event kind | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |"
    rule = "|---|" + "---:|" * len(lrs)
    lines: list[str] = []
    for title, note, cell in KIND_TABLES:
        lines += [f"### {title}", "", f"({note})", "", header, rule]
        for kind in rows:
            cells = [cell([r for r in results if r.lr == lr], kind) for lr in lrs]
            lines.append(f"| `{kind}` | " + " | ".join(cells) + " |")
        if not rows:
            lines.append("| (no Event) | " + " | ".join("–" for _ in lrs) + " |")
        lines.append("")
    return "\n".join(lines)


def render_lr_table(results: Sequence[RunResult], lrs: Sequence[float]) -> str:
    """``lr_too_high`` judged against the sweep itself: is a rate it flags worse than the
    best rate? A run can be free of spikes and still learn worse at a rate 10x too high, so
    the spike-based "healthy" above calls those Events false alarms; this table shows
    whether a lower rate did better."""
    observed = [r for r in results if r.observed]
    medians = {
        lr: statistics.median([r.final_val_loss for r in observed if r.lr == lr])
        for lr in lrs
        if any(r.lr == lr for r in observed)
    }
    if not medians:
        return ""
    best = min(medians.values())
    flagged = [
        f"{sum(r.first_event_of('lr_too_high') is not None for r in observed if r.lr == lr)}"
        f"/{sum(r.lr == lr for r in observed)}"
        for lr in medians
    ]
    header = "| | " + " | ".join(f"lr {lr:g}" for lr in medians) + " |"
    return "\n".join(
        [
            "### Learning rate too high, judged against the sweep",
            "",
            "(runs with an `lr_too_high` Event / runs, and the rate's median final validation "
            "loss minus the best rate's: a flag on a rate that learns worse than a lower one "
            "is right, spikes or not)",
            "",
            header,
            "|---|" + "---:|" * len(medians),
            "| runs flagged | " + " | ".join(flagged) + " |",
            "| final validation loss vs the best rate | "
            + " | ".join(f"{medians[lr] - best:+.2f}" for lr in medians)
            + " |",
            "",
        ]
    )


# ---------------------------------------------------------------------------- rendering


def render_tables(
    results: Sequence[RunResult], labels: Mapping[str, str], lrs: Sequence[float]
) -> str:
    """One Markdown table per metric: a row per configuration (``labels``: name -> label,
    in row order), a column per learning rate."""
    header = "| configuration | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |"
    rule = "|---|" + "---:|" * len(lrs)
    lines: list[str] = []
    for title, note, cell in TABLES:
        lines += [f"### {title}", "", f"({note})", "", header, rule]
        for config, label in labels.items():
            cells = [cell([r for r in results if r.config == config and r.lr == lr]) for lr in lrs]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def render_runs(results: Sequence[RunResult]) -> str:
    """Every run on one line, to read the story behind a cell."""
    lines = [
        "| configuration | lr | seed | diverged | spikes | first spike | final val "
        "| to target | grad-norm jump | first Event | lead | Events |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---|---:|---|",
    ]
    for r in results:
        event = f"{r.first_event_kind}@{r.first_event_step}" if r.first_event_kind else "–"
        lines.append(
            f"| {r.config} | {r.lr:g} | {r.seed} | {'yes' if r.diverged else 'no'} "
            f"| {r.spikes} | {_optional(r.first_spike_step)} | {_loss_text(r.final_val_loss)} "
            f"| {_optional(r.steps_to_target)} | {_jump_text(r.grad_jump_before_spike)} "
            f"| {event if r.observed else 'not observed'} | {_optional(r.lead_time)} "
            f"| {_event_counts(r) if r.observed else '–'} |"
        )
    return "\n".join(lines) + "\n"


def _optional(value: int | None) -> str:
    return "–" if value is None else str(value)


def _jump_text(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}x"


def _event_counts(r: RunResult) -> str:
    """``kind xN`` per Event kind, in order of first appearance."""
    counts: dict[str, int] = {}
    for event in r.events:
        counts[event["kind"]] = counts.get(event["kind"], 0) + 1
    return ", ".join(f"{kind} x{n}" for kind, n in counts.items()) or "none"


def runs_to_json(results: Sequence[RunResult], header: Mapping[str, Any]) -> str:
    """``header`` (machine, command, settings) and every run's raw numbers. NaN/Inf become
    ``null``: JSON has no such numbers."""

    def clean(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    definitions = {
        "spike_factor": SPIKE_FACTOR,
        "spike_window": SPIKE_WINDOW,
        "spike_min_history": SPIKE_MIN_HISTORY,
        "divergence_factor": DIVERGENCE_FACTOR,
    }
    payload = {**header, "definitions": definitions, "runs": [asdict(r) for r in results]}
    return json.dumps(clean(payload), separators=(",", ":"))
