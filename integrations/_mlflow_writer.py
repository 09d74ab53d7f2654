"""The MLflow sink's background writer: MLflow's client blocks (HTTP retries, a slow
store), so the sink hands its writes to one daemon thread and never stalls training."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["MAX_PENDING", "Batch", "Job", "Writer"]

MAX_ENTITIES_PER_CALL = 1000  # MLflow's log_batch limits
MAX_TAGS_PER_CALL = 100
MAX_PENDING = 1000  # writes waiting before the sink gives up on an unresponsive store


@dataclass
class Batch:
    """Metrics and tags for ``log_batch``; consecutive batches are merged while they fit."""

    metrics: list[Any] = field(default_factory=list)
    tags: list[Any] = field(default_factory=list)

    def fits_with(self, other: Batch) -> bool:
        tags = len(self.tags) + len(other.tags)
        if {t.key for t in self.tags} & {t.key for t in other.tags}:
            return False  # one call must not set a tag twice
        return tags <= MAX_TAGS_PER_CALL and (
            len(self.metrics) + len(other.metrics) + tags <= MAX_ENTITIES_PER_CALL
        )


Job = Batch | Callable[[], None]


class Writer:
    """One daemon thread that performs the sink's writes in the order they were queued.

    The first failure is kept and every later write dropped: the sink raises it on its next
    call, on the training thread, where the guard turns it into one warning.
    """

    def __init__(self, send_batch: Callable[[Batch], None]) -> None:
        self._send_batch = send_batch
        self._jobs: deque[Job] = deque()
        self._busy = False
        self._stopping = False
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def put(self, job: Job) -> bool:
        """Queue ``job``; False (and nothing queued) when ``MAX_PENDING`` writes wait."""
        with self._changed:
            if len(self._jobs) >= MAX_PENDING:
                return False
            last = self._jobs[-1] if self._jobs else None
            if isinstance(job, Batch) and isinstance(last, Batch) and last.fits_with(job):
                last.metrics.extend(job.metrics)  # one call for several logging steps
                last.tags.extend(job.tags)
            else:
                self._jobs.append(job)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._loop, name="gradguard-mlflow", daemon=True
                )
                self._thread.start()
            self._changed.notify_all()
        return True

    @property
    def pending(self) -> int:
        with self._changed:
            return len(self._jobs) + self._busy

    def wait_idle(self, timeout: float) -> bool:
        """Wait until every queued write is done (or one failed); False on timeout."""
        with self._changed:
            return self._changed.wait_for(
                lambda: self.error is not None or (not self._jobs and not self._busy), timeout
            )

    def stop(self, *, drop: bool = False) -> None:
        """The thread ends once the queue is empty (at once after the current write: drop)."""
        with self._changed:
            self._stopping = True
            if drop:
                self._jobs.clear()
            self._changed.notify_all()

    def _loop(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: bool(self._jobs) or self._stopping)
                if not self._jobs:
                    return
                job = self._jobs.popleft()
                self._busy = True
            try:
                if isinstance(job, Batch):
                    self._send_batch(job)
                else:
                    job()
            except BaseException as error:  # kept, raised on the training thread
                with self._changed:
                    self.error = error
                    self._jobs.clear()
            finally:
                with self._changed:
                    self._busy = False
                    self._changed.notify_all()
