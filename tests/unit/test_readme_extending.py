"""The README's "Extending" example runs as written: a custom clip strategy, detector and
sink on a real model and optimizer."""

from __future__ import annotations

import contextlib
import io
import re
import warnings
from pathlib import Path

import gradguard as gg

README = Path(__file__).resolve().parents[2] / "README.md"


def _extending_block() -> str:
    text = README.read_text()
    section = text[text.index("## Extending: your own clip strategy") :]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match is not None
    return match.group(1)


def test_the_readme_extension_example_runs_and_does_what_it_says() -> None:
    out = io.StringIO()
    namespace: dict[str, object] = {"__name__": "readme_example"}
    with contextlib.redirect_stdout(out), warnings.catch_warnings():
        warnings.simplefilter("ignore", gg.GradGuardWarning)
        exec(compile(_extending_block(), str(README), "exec"), namespace)
    guard = namespace["guard"]
    assert isinstance(guard, gg.GradGuard)
    printed = out.getvalue().splitlines()
    norms = [line for line in printed if line.split()[0].isdigit()]
    assert [line.split()[0] for line in norms] == ["0", "5"]  # PrintSink, logging steps
    assert "quiet_layer ('0',)" in printed  # the custom Event reached the custom sink
    (event,) = [e for e in guard.events if e.kind == "quiet_layer"]
    assert event.layers == ("0",) and "gradient norm under 1e-07" in event.message
    assert isinstance(guard.clip, namespace["HalveOverLimit"])  # type: ignore[arg-type]
    assert guard.clipped_steps > 0  # the norm (about 0.08) is over the limit of 0.05


def test_the_docs_extension_snippets_run_and_check_themselves() -> None:
    # Each snippet on the docs' "Extending gradguard" page asserts its own result.
    snippets = sorted((README.parent / "docs" / "snippets" / "extending").glob("*.py"))
    assert [p.name for p in snippets] == ["custom_clip.py", "custom_detector.py", "custom_sink.py"]
    for path in snippets:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore", gg.GradGuardWarning)
            exec(compile(path.read_text(), str(path), "exec"), {"__name__": "__main__"})
