"""MlflowSink: gradguard's metrics, Events and gradient-flow figure in an MLflow run.

    import mlflow
    from gradguard.integrations.mlflow import MlflowSink
    with mlflow.start_run():
        guard = gg.attach(model, optimizer, sinks=[MlflowSink()])   # the active run
        ...train...
        guard.close()
    # or a run you address by id (Lightning: MLFlowLogger's run and client)
    MlflowSink(run_id=logger.run_id, client=logger.experiment)

What lands in the run:

- Metrics: every gradguard key (``gradguard/grad_norm/<layer>``, ...) with the logging step
  as its MLflow ``step``, one ``log_batch`` per logging step (split in calls of at most
  1000 metrics, MLflow's batch limit). MLflow keys allow letters, digits, ``_ - . /`` and
  spaces, so gradguard's keys (``encoder.layers.0.linear1`` included) are kept as they are.
  Any other character (from an odd ``ModuleDict`` key, say) becomes ``_``; empty, ``.`` and
  ``..`` path segments, which MLflow refuses, too; a key over 250 characters is cut and ends
  with a hash. Renamed keys are announced once, in a ``GradGuardWarning``. NaN is stored
  and read back as NaN. MLflow's SQL stores (the default ``sqlite:///mlflow.db`` and the
  server's database) cannot hold Inf: they store +-Inf as +-1.797e308 (the largest float).
- Tags, for the runs table and search (``tags."gradguard.status" = 'error'``):
  ``gradguard.status`` is ``ok`` from the first logging step, ``warning`` after a warning
  Event, ``error`` after an error Event (NaN/Inf gradients); it never goes back.
  ``gradguard.last_event.<kind>`` (``nonfinite``, ``spike``, ...) holds the latest Event of
  that kind: its step, severity, what was found and what to try.
- ``gradguard/events.jsonl``, an artifact: every Event, one JSON object a line
  (``kind, step, layers, value, severity, message, advice, details``; NaN and Inf spelled
  ``"NaN"``, ``"Infinity"``, ``"-Infinity"``, so the file is strict JSON). Artifacts are
  files that cannot be appended to, so the file is rewritten at most once per logging step
  while new Events arrive (at once for error Events, so a crash does not lose them), and at
  ``flush()``. Events are debounced by the guard: a run has a handful, not one per step.
- Two figures as time-stepped images (the run's "Images" charts, with a step slider;
  stored under ``images/``): ``gradguard/gradient_flow``, one bar per layer, input to
  output, log scale, NaN/Inf in red; and ``gradguard/gradient_flow_heatmap``, the run so
  far, layers x logging steps, colour = log10 gradient norm (NaN/Inf red, no gradient
  grey, exactly 0 black). Logged on the first logging step, then every
  ``figure_every_n_logs`` logging steps, and for the last logging step at ``flush()``.
  Without matplotlib (``pip install 'gradguard[mlflow]'``) the sink says so once and logs
  everything else. MLflow has no histogram chart: ``gg.Histograms`` are not sent here.
- ``log_report(guard.report())`` (yours to call) writes ``gradguard/report.txt``.

Training never waits for MLflow. Writes go, in order, to one background thread (which also
draws the figures); the training thread only queues them, and consecutive logging steps
still queued are merged into one ``log_batch``. ``flush()`` (``detach()``, ``guard.close()``,
the end of a Lightning fit) waits until everything is written, at most ``flush_timeout_s``
seconds. A failing store (disk full, a deleted run, a server that refuses) raises a
``GradGuardError`` with MLflow's error on the sink's next call; a server that does not
answer raises one at ``flush()`` when the time is up, or once 1000 writes wait. The guard
then disables the sink with one warning, and the sink writes nothing more. Writes still
queued when the process ends without ``guard.close()`` get up to 10 more seconds.

The run is found on the first write: ``mlflow.active_run()``, or the ``run_id`` you gave.
No active run is an error (the guard disables the sink with a warning naming what to do):
the sink never starts a run, because the run belongs to whoever trains (you, Lightning's
``MLFlowLogger``, transformers' callback), and a run started behind their back would split
one training into two runs. It never ends a run either: whoever started it ends it. Only
rank zero writes (the guard calls sinks there only; the sink checks too).
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import math
import re
import time
import warnings
import weakref
from collections import deque
from collections.abc import Mapping
from typing import Any, NoReturn

from gradguard._dist import is_rank_zero
from gradguard._errors import (
    ConfigurationError,
    GradGuardError,
    GradGuardWarning,
    MissingDependencyError,
    check_number,
    check_positive_int,
    user_stacklevel,
)
from gradguard._events import Event
from gradguard._keys import MetricKeys

from ._figures import (
    GradientFlow,
    figures_available,
    gradient_flow,
    prefix_of,
    render_gradient_flow,
)
from ._heatmap import FlowColumn, FlowHistory, render_heatmap
from ._mlflow_writer import MAX_ENTITIES_PER_CALL as _MAX_ENTITIES_PER_CALL
from ._mlflow_writer import MAX_PENDING as _MAX_PENDING
from ._mlflow_writer import Batch as _Batch
from ._mlflow_writer import Job as _Job
from ._mlflow_writer import Writer as _Writer

__all__ = ["MlflowSink", "event_record", "metric_key"]

EVENTS_ARTIFACT = "gradguard/events.jsonl"
REPORT_ARTIFACT = "gradguard/report.txt"
STATUS_TAG = "gradguard.status"
EVENT_TAG = "gradguard.last_event."
# MLflow's limits (mlflow.utils.validation): per log_batch call, per key, per tag value
# (8000 characters in MLflow 3.17; we stay under 5000, the limit of older servers).
_MAX_KEY_LENGTH = 250
_MAX_TAG_VALUE_LENGTH = 5000
_EXIT_TIMEOUT_S = 10.0  # at interpreter exit, when nobody closed the sink
_SEVERITY_RANK = {"ok": 0, "warning": 1, "error": 2}
# Characters MLflow accepts in metric keys on every OS (colons are refused on Windows).
_BAD_KEY_CHARS = re.compile(r"[^\w./\- ]")
_BAD_IMAGE_KEY_CHARS = re.compile(r"[^a-zA-Z0-9_\-./ ]")  # log_image(key=) is ASCII only


def metric_key(key: str) -> str:
    """``key`` as MLflow accepts it: unchanged for every key gradguard writes by default.

    Characters outside letters, digits, ``_ - . /`` and space become ``_``; empty, ``.``
    and ``..`` path segments (MLflow refuses names that normalise to another path) too;
    a key over 250 characters keeps its first 241 and ends with 8 hex digits of its hash.
    """
    segments = _BAD_KEY_CHARS.sub("_", key).split("/")
    cleaned = "/".join("_" * max(1, len(s)) if s in ("", ".", "..") else s for s in segments)
    if len(cleaned) > _MAX_KEY_LENGTH:
        digest = hashlib.sha1(key.encode("utf-8")).hexdigest()[:8]
        cleaned = f"{cleaned[: _MAX_KEY_LENGTH - 9]}-{digest}"
    return cleaned


def _strict_json(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {str(k): _strict_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_strict_json(v) for v in value]
    return value


def event_record(event: Event) -> str:
    """One line of ``gradguard/events.jsonl``: the Event as strict JSON."""
    return json.dumps(_strict_json(event.to_dict()), ensure_ascii=False, default=str)


def _tag_text(event: Event) -> str:
    text = f"step {event.step} ({event.severity}): {event.message} Try: {event.advice}"
    return text if len(text) <= _MAX_TAG_VALUE_LENGTH else text[: _MAX_TAG_VALUE_LENGTH - 3] + "..."


def _flush_at_exit(sink_ref: weakref.ref[MlflowSink]) -> None:
    sink = sink_ref()
    if sink is not None and not sink._closed:
        with contextlib.suppress(Exception):  # the process is ending: nothing to disable
            sink._flush(min(sink.flush_timeout_s, _EXIT_TIMEOUT_S))


# ---------------------------------------------------------------------- the sink
class MlflowSink:
    """Sends gradguard's output to an MLflow run (see the module docstring for what and where).

    Args:
        run_id: the run to write to. ``None`` (default): the active run
            (``mlflow.active_run()``, i.e. ``mlflow.start_run()``), read on the first write.
        client: an ``MlflowClient`` for ``run_id`` (Lightning: ``MLFlowLogger.experiment``).
        tracking_uri: or the tracking URI of ``run_id``'s store (``MlflowClient(tracking_uri)``).
            By default the current one (``mlflow.get_tracking_uri()``). ``client`` and
            ``tracking_uri`` go with ``run_id``: the active run lives in the current store.
        figure_every_n_logs: log the figures (bar chart and heatmap) on the first logging
            step, then every this many logging steps (``0``: never).
        prefix: the metric-key prefix; by default read from the keys the guard sends.
        flush_timeout_s: how long ``flush()``/``close()`` wait for MLflow to take the queued
            writes before raising (the guard then disables the sink; training goes on).
    """

    def __init__(
        self,
        run_id: str | None = None,
        *,
        client: Any = None,
        tracking_uri: str | None = None,
        figure_every_n_logs: int = 10,
        prefix: str | None = None,
        flush_timeout_s: float = 60.0,
    ) -> None:
        try:
            import mlflow
            from mlflow.entities import Metric, RunTag
        except ImportError as error:
            raise MissingDependencyError("mlflow", "mlflow") from error
        self._mlflow: Any = mlflow
        self._metric: Any = Metric
        self._tag: Any = RunTag
        if run_id is not None and (not isinstance(run_id, str) or not run_id):
            raise ConfigurationError.bad_value("run_id", run_id, "expected a run id string")
        if client is not None and tracking_uri is not None:
            raise ConfigurationError(
                "pass client= or tracking_uri=, not both: the client already has its URI"
            )
        if run_id is None and (client is not None or tracking_uri is not None):
            raise ConfigurationError(
                "client= and tracking_uri= need run_id=: without it MlflowSink writes to the "
                "active run, which lives in the current store (mlflow.get_tracking_uri())"
            )
        self.figure_every_n_logs = check_positive_int(
            "figure_every_n_logs", figure_every_n_logs, allow_zero=True
        )
        self.flush_timeout_s = check_number("flush_timeout_s", flush_timeout_s, low=0.0)
        self._figures_on = self.figure_every_n_logs > 0 and figures_available(
            "MlflowSink", "mlflow", "Metrics, tags and the Events file"
        )
        self.run_id = run_id
        self.prefix = prefix
        self._client: Any = client
        self._tracking_uri = tracking_uri
        self._writer = _Writer(self._send_batch)
        self._keys: dict[str, str] = {}
        self._used_keys: set[str] = set()
        self._renamed: list[tuple[str, str]] = []  # not yet announced
        self._status: str | None = None
        self._events: list[str] = []
        self._events_written = 0
        self._logs = 0
        self._unpainted: GradientFlow | None = None
        self._history = FlowHistory()
        self._notices: deque[str] = deque()  # from the writer thread, warned on the caller's
        self._exit_hook = False
        self._closed = False

    # ------------------------------------------------------------------ the run
    @property
    def client(self) -> Any:
        """The ``MlflowClient`` written through (created on the first write)."""
        if self._client is None:
            self._client = self._mlflow.MlflowClient(tracking_uri=self._tracking_uri)
        return self._client

    def _resolve_run(self) -> str:
        if self.run_id is None:
            active = self._mlflow.active_run()
            if active is None:
                raise GradGuardError(
                    "MlflowSink found no active MLflow run: train inside "
                    "`with mlflow.start_run():`, or pass MlflowSink(run_id=...) (Lightning's "
                    "MLFlowLogger: MlflowSink(run_id=logger.run_id, client=logger.experiment))"
                )
            self.run_id = str(active.info.run_id)
        self.client  # noqa: B018 - created here, on the caller's thread, with today's URI
        if not self._exit_hook:
            self._exit_hook = True
            # Queued writes are not lost when nobody calls guard.close(); runs before
            # MLflow's own exit hook (registered earlier) ends the active run.
            atexit.register(_flush_at_exit, weakref.ref(self))
        return self.run_id

    # ------------------------------------------------------------------ Sink protocol
    def log_scalars(self, scalars: Mapping[str, float], step: int) -> None:
        """Queue one logging step's metrics for the run (rank zero only; the writer thread
        sends them, so training does not wait on the tracking server)."""
        self._check_open()
        if not scalars or not is_rank_zero():
            return
        self._check_writer()
        self._resolve_run()
        if self.prefix is None:
            self.prefix = prefix_of(scalars)
        now = int(time.time() * 1000)
        batch = _Batch(
            metrics=[self._metric(self._key(k), float(v), now, step) for k, v in scalars.items()]
        )
        self._announce_renames()
        if self._status is None:
            self._status = "ok"
            batch.tags.append(self._tag(STATUS_TAG, "ok"))
        self._put(batch)
        self._queue_events_file()
        self._logs += 1
        self._unpainted = None
        if not self._figures_on:
            return
        flow = gradient_flow(scalars, step)
        if flow is None:
            return
        self._history.add(flow)
        if (self._logs - 1) % self.figure_every_n_logs == 0:
            columns = self._history.columns()  # a snapshot: the thread draws it later
            self._put(lambda: self._log_figure(flow, columns, now))
        else:
            self._unpainted = flow

    def log_event(self, event: Event) -> None:
        """Queue one Event for the run (rank zero only): the tag
        ``gradguard.last_event.<kind>``, ``gradguard.status`` when it is the worst severity
        so far, and a line of the ``gradguard/events.jsonl`` artifact."""
        self._check_open()
        if not is_rank_zero():
            return
        self._check_writer()
        self._resolve_run()
        batch = _Batch(tags=[self._tag(EVENT_TAG + event.kind, _tag_text(event))])
        if _SEVERITY_RANK[event.severity] > _SEVERITY_RANK.get(self._status or "ok", 0):
            self._status = event.severity
            batch.tags.append(self._tag(STATUS_TAG, event.severity))
        self._put(batch)
        self._events.append(event_record(event))
        if event.severity == "error":
            self._queue_events_file()

    def flush(self) -> None:
        """Queue the pending figure and events file, then wait until MLflow has everything."""
        self._flush(self.flush_timeout_s)

    def _flush(self, timeout: float) -> None:
        if self._closed or self.run_id is None or self._client is None:
            return
        self._check_writer()
        if self._unpainted is not None and self._figures_on:
            flow, self._unpainted = self._unpainted, None
            now = int(time.time() * 1000)
            columns = self._history.columns()
            self._put(lambda: self._log_figure(flow, columns, now))
        self._queue_events_file()
        done = self._writer.wait_idle(timeout)
        self._check_writer()
        if not done:
            self._fail(
                f"MLflow did not take gradguard's writes within {timeout:g} s "
                f"({self._writer.pending} pending): is the tracking store at "
                f"{self.client.tracking_uri} reachable?"
            )

    def close(self) -> None:
        """Flush, and stop the writer thread. The run stays open: whoever started it ends it."""
        if self._closed:
            return
        self.flush()  # on failure, _fail has closed the sink
        self._closed = True
        self._writer.stop()

    # ------------------------------------------------------------------ text artifacts
    def log_text(self, text: str, artifact_file: str) -> None:
        """Write ``text`` to the run as the artifact ``artifact_file`` (``"dir/name.txt"``).

        Synchronous (it returns once MLflow has the file, raising MLflow's error if not),
        and it works after ``close()``: the run is still there.
        """
        if not is_rank_zero():
            return
        self.client.log_text(self._resolve_run(), text, artifact_file)

    def log_report(self, report: str) -> None:
        """Write gradguard's diagnosis to ``gradguard/report.txt``: pass ``guard.report()``.

        The sink never sees the guard, so it cannot write the report by itself; call this
        before or after ``guard.close()``.
        """
        self.log_text(report, REPORT_ARTIFACT)

    # ------------------------------------------------------------------ internals
    def _check_open(self) -> None:
        if self._closed:
            raise GradGuardError(
                "this MlflowSink is closed (guard.close() closes the sinks): give the guard a "
                "new MlflowSink, or use guard.detach() to keep them open"
            )

    def _check_writer(self) -> None:
        while self._notices:
            warnings.warn(self._notices.popleft(), GradGuardWarning, stacklevel=user_stacklevel())
        error = self._writer.error
        if error is not None:
            self._fail(f"MLflow refused gradguard's write ({type(error).__name__}: {error})", error)

    def _put(self, job: _Job) -> None:
        if not self._writer.put(job):
            self._fail(
                f"MLflow has not taken gradguard's last {_MAX_PENDING} writes: is the tracking "
                f"store at {self.client.tracking_uri} reachable?"
            )

    def _fail(self, message: str, cause: BaseException | None = None) -> NoReturn:
        """Give up: write nothing more (the guard disables the sink on this error)."""
        self._closed = True
        self._writer.stop(drop=True)
        raise GradGuardError(message) from cause

    def _key(self, key: str) -> str:
        found = self._keys.get(key)
        if found is None:
            found = base = metric_key(key)
            n = 2
            while found in self._used_keys:  # two keys that clean to one: keep both
                found = f"{base}_{n}"
                n += 1
            self._keys[key] = found
            self._used_keys.add(found)
            if found != key:
                self._renamed.append((key, found))
        return found

    def _announce_renames(self) -> None:
        renamed, self._renamed = self._renamed, []
        if not renamed:
            return
        shown = ", ".join(f"{k!r} -> {v!r}" for k, v in renamed[:5])
        more = f" and {len(renamed) - 5} more" if len(renamed) > 5 else ""
        warnings.warn(
            f"MlflowSink renamed metric keys that MLflow would refuse: {shown}{more}.",
            GradGuardWarning,
            stacklevel=user_stacklevel(),
        )

    def _queue_events_file(self) -> None:
        if len(self._events) == self._events_written:
            return
        self._events_written = len(self._events)
        text = "\n".join(self._events) + "\n"  # a snapshot: the thread never reads _events
        run_id, client = self.run_id, self.client
        self._put(lambda: client.log_text(run_id, text, EVENTS_ARTIFACT))

    def _send_batch(self, batch: _Batch) -> None:
        """One ``log_batch`` per 1000 entities (tags ride in the first call)."""
        metrics, tags = batch.metrics, batch.tags
        first = True
        while first or metrics:
            room = _MAX_ENTITIES_PER_CALL - len(tags)
            self.client.log_batch(self.run_id, metrics=metrics[:room], tags=tags, synchronous=True)
            metrics, tags, first = metrics[room:], [], False

    def _log_figure(
        self, flow: GradientFlow, columns: tuple[FlowColumn, ...], timestamp: int
    ) -> None:
        """On the writer thread: draw and log the figures; a failure turns figures off."""
        if not self._figures_on:
            return
        keys = MetricKeys(self.prefix or "gradguard")
        try:
            for name, pixels in (
                ("gradient_flow", render_gradient_flow(flow)),
                ("gradient_flow_heatmap", render_heatmap(columns)),
            ):
                key = _BAD_IMAGE_KEY_CHARS.sub("_", keys.figure(name))
                self.client.log_image(
                    self.run_id, pixels, key=key, step=flow.step, timestamp=timestamp
                )
        except Exception as error:  # a figure never costs the metrics
            self._figures_on = False
            self._notices.append(
                f"gradguard could not log the gradient-flow figures ({type(error).__name__}: "
                f"{error}); MlflowSink goes on without figures."
            )

    def __repr__(self) -> str:
        return f"MlflowSink(run_id={self.run_id!r})"
