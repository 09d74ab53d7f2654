"""Smoke tests: `gradguard demo`, the examples and the benchmark run and print what they should.

Each one runs in a subprocess, as a user would run it, with small arguments.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(args: list[str], cwd: Path, timeout: float = 240.0) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")  # several test processes share the machine
    env["WANDB_MODE"] = "offline"
    env["WANDB_SILENT"] = "true"
    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stdout


def _has_tensorboard_sink() -> bool:
    return importlib.util.find_spec("gradguard.integrations.tensorboard") is not None


# ---------------------------------------------------------------------------- demo
@pytest.mark.slow
def test_demo_default_case_names_vanishing_and_the_fix(tmp_path: Path) -> None:
    out = _ok(
        _run(
            ["-m", "gradguard", "demo", "--no-progress", "--logdir", str(tmp_path / "tb")],
            cwd=tmp_path,
        )
    )
    broken = out.split("1) BROKEN model")[1].split("2) FIXED model")[0]
    assert "vanishing gradients" in broken.lower()
    assert "relu" in broken.lower() and "he (kaiming) init" in broken.lower()  # the remedy
    events_row = next(line for line in out.splitlines() if "gradguard events" in line)
    assert events_row.split()[2:] == ["vanishing", "x1", "none"]  # broken | fixed
    assert "gained +" in out  # the fixed model is more accurate
    if _has_tensorboard_sink():
        assert f"tensorboard --logdir {tmp_path / 'tb'}" in out
        assert list((tmp_path / "tb").rglob("events.out.tfevents.*"))
    else:
        assert "TensorBoard logs skipped" in out


@pytest.mark.slow
def test_demo_with_progress_bars_and_wandb_offline(tmp_path: Path) -> None:
    pytest.importorskip("wandb")
    logdir = tmp_path / "logs"
    args = ["demo", "--case", "dead", "--steps", "40", "--wandb", "--logdir", str(logdir)]
    result = _run(["-m", "gradguard", *args], cwd=tmp_path)
    out = _ok(result)
    assert "1) BROKEN model" in out and "2) FIXED model" in out
    assert "broken" in result.stderr and "40/40" in result.stderr  # one progress bar per model
    assert out.count("saved offline; upload it with: wandb sync") == 2
    runs = list((logdir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 2 and all(run.stat().st_size > 0 for run in runs)


def test_demo_exploding_case_without_logs(tmp_path: Path) -> None:
    args = ["demo", "--case", "exploding", "--steps", "40", "--no-progress", "--logdir", "none"]
    out = _ok(_run(["-m", "gradguard", *args], cwd=tmp_path))
    assert "1) BROKEN model" in out and "2) FIXED model" in out
    assert "test accuracy" in out
    assert "tensorboard --logdir" not in out  # --logdir none writes no logs
    assert not (tmp_path / "runs").exists()


def test_demo_without_scikit_learn_says_what_to_install(tmp_path: Path) -> None:
    # sklearn is installed here; hide it the way a missing package looks to an import.
    code = (
        "import sys; sys.modules['sklearn'] = None; "
        "from gradguard.__main__ import main; sys.exit(main(['demo', '--no-progress']))"
    )
    result = _run(["-c", code], cwd=tmp_path)
    assert result.returncode == 1
    assert "scikit-learn" in result.stderr
    assert "pip install 'gradguard[demo]'" in result.stderr


def test_the_demo_extra_brings_what_the_demo_imports() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    names = {re.split(r"[<>=!~\[ ]", spec, maxsplit=1)[0] for spec in extras["demo"]}
    # The digits, the TensorBoard logs, and the figures in them.
    assert {"scikit-learn", "tensorboard", "matplotlib"} <= names


def test_cli_without_a_command_prints_help(tmp_path: Path) -> None:
    result = _run(["-m", "gradguard"], cwd=tmp_path)
    assert result.returncode == 2
    assert "demo" in result.stdout


# ---------------------------------------------------------------------------- examples
def test_plain_loop_example_skips_the_poisoned_step(tmp_path: Path) -> None:
    out = _ok(
        _run(
            [str(ROOT / "examples" / "plain_loop.py"), "--steps", "80", "--poison-step", "40"],
            cwd=tmp_path,
        )
    )
    assert "skipped by gradguard: 1" in out
    assert "weights finite: True" in out
    assert "NaN/Inf" in out  # the report explains the skipped step


def test_amp_example_trains_in_bf16_on_cpu(tmp_path: Path) -> None:
    out = _ok(
        _run([str(ROOT / "examples" / "amp.py"), "--device", "cpu", "--steps", "60"], cwd=tmp_path)
    )
    assert "autocast dtype: bfloat16" in out
    assert "optimizer steps seen by gradguard: 60" in out
    norm = float(out.split("last logged total grad norm (unscaled):")[1].split()[0])
    assert 0.0 < norm < 100.0


# ---------------------------------------------------------------------------- benchmark
@pytest.mark.slow
def test_benchmark_quick_writes_a_markdown_table(tmp_path: Path) -> None:
    table = tmp_path / "results.md"
    out = _ok(
        _run(
            [
                str(ROOT / "benchmarks" / "overhead.py"),
                "--quick",
                "--models",
                "stress",
                "--configs",
                "gradguard,gradguard-normclip,composer-style",
                "--markdown",
                str(table),
            ],
            cwd=tmp_path,
        )
    )
    text = table.read_text()
    assert text == out.rstrip("\n") + "\n" or text.strip() in out
    assert "torch " in text and "device: cpu" in text
    row = next(line for line in text.splitlines() if line.startswith("| gradguard, defaults"))
    ratio = float(row.split("|")[2].strip().rstrip("×"))
    assert ratio > 0.0
    assert "| bare step, absolute |" in text
    assert "Composer" in text
