"""Run a test's worker function in real processes on 127.0.0.1 and hand back what each rank saw.

``run_workers(worker, tmp_path, ...)`` starts ``world_size`` Python processes (the
environment ``torchrun`` would give them: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT`` on a free port), each of which imports the worker's module
and calls ``worker(rank, world_size, **kwargs)`` after joining a ``gloo`` process group
(unless ``init_process_group=False``: Lightning joins it itself; ``backend="nccl"`` for
a GPU). A worker returns a
JSON-serialisable dict, which comes back as one entry per rank.

Failures are loud and fast: a worker that raises fails the test with every rank's output;
when one rank dies the others are killed at once (they would wait in a collective); and a
run that outlasts ``timeout`` (a deadlock) is killed and fails the test.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
# A collective that waits longer than this raises inside the worker (gloo's own timeout).
COLLECTIVE_TIMEOUT_S = 30.0


class WorkerFailure(AssertionError):
    """A worker raised, died, or the run outlasted its timeout."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_workers(
    worker: Callable[..., dict[str, Any]],
    tmp_path: Path,
    *,
    world_size: int = 2,
    timeout: float = 60.0,
    init_process_group: bool = True,
    backend: str = "gloo",
    **kwargs: Any,
) -> list[dict[str, Any]]:
    """Run ``worker`` on ``world_size`` ranks; return each rank's dict, rank 0 first."""
    run_dir = Path(tmp_path) / f"dist-{worker.__name__}"
    run_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    spec = json.dumps(
        {
            "module": worker.__module__,
            "function": worker.__name__,
            "kwargs": kwargs,
            "out": str(run_dir),
            "init": init_process_group,
            "backend": backend,
        }
    )
    procs: list[subprocess.Popen[bytes]] = []
    logs = []
    for rank in range(world_size):
        env = dict(os.environ)
        env.update(
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            NODE_RANK="0",
            WORLD_SIZE=str(world_size),
            LOCAL_WORLD_SIZE=str(world_size),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            OMP_NUM_THREADS="1",
            PYTHONPATH=os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]),
        )
        log = open(run_dir / f"rank{rank}.log", "wb")  # noqa: SIM115 - closed below
        logs.append(log)
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "tests.distributed._launch", spec],
                cwd=REPO_ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
    deadline = time.monotonic() + timeout
    problem = ""
    try:
        while any(p.poll() is None for p in procs):
            failed = [r for r, p in enumerate(procs) if p.poll() not in (None, 0)]
            if failed:
                problem = f"rank {failed[0]} exited with code {procs[failed[0]].returncode}"
                break
            if time.monotonic() > deadline:
                problem = f"timed out after {timeout:.0f} s (a deadlock?)"
                break
            time.sleep(0.05)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        for log in logs:
            log.close()
    if not problem:
        failed = [r for r, p in enumerate(procs) if p.returncode != 0]
        if failed:
            problem = f"rank {failed[0]} exited with code {procs[failed[0]].returncode}"
    if problem:
        output = "\n".join(
            f"----- rank {r} -----\n"
            + (run_dir / f"rank{r}.log").read_text(errors="replace")[-6000:]
            for r in range(world_size)
        )
        raise WorkerFailure(f"{worker.__name__}: {problem}\n{output}")
    return [json.loads((run_dir / f"rank{r}.json").read_text()) for r in range(world_size)]


def plain(value: Any) -> Any:
    """Tensors, tuples and floats made JSON-safe: NaN/Inf become strings, tensors lists."""
    import torch

    if isinstance(value, torch.Tensor):
        return plain(value.detach().cpu().tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def _child(spec_json: str) -> None:
    started = time.monotonic()
    spec = json.loads(spec_json)
    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    worker = getattr(importlib.import_module(spec["module"]), spec["function"])
    import torch.distributed as dist

    print(f"rank {rank}: imports took {time.monotonic() - started:.1f} s", flush=True)
    if spec["init"]:
        dist.init_process_group(
            spec["backend"],
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S),
        )
    print(f"rank {rank}: joined the group at {time.monotonic() - started:.1f} s", flush=True)
    try:
        result = worker(rank, world_size, **spec["kwargs"])
        print(f"rank {rank}: worker done at {time.monotonic() - started:.1f} s", flush=True)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    out = Path(spec["out"]) / f"rank{rank}.json"
    out.write_text(json.dumps(plain(result)))
    sys.stdout.flush()
    # Skip the interpreter's slow teardown (seconds with torch loaded): the result is written.
    os._exit(0)


if __name__ == "__main__":
    _child(sys.argv[1])
