"""GradGuardCallback in a real Hugging Face Trainer on CPU: a tiny GPT-2 built from a config
(no download), token data made here, TensorBoard reporting read back from its event files."""

from __future__ import annotations

import logging
import math
import os
import runpy
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from gradguard.integrations.transformers import STATE_FILE, GradGuardCallback
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

import gradguard as gg
from tests.syncs import count_syncs

os.environ.setdefault("HF_HUB_OFFLINE", "1")
LAYER = "transformer.h.0.attn.c_attn"
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


class Tokens(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    """Random token sequences; the labels are the inputs (next-token prediction)."""

    def __init__(self, count: int = 64, length: int = 16) -> None:
        gen = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, 64, (count, length), generator=gen)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    # GPT-2's token ids 50256 lie outside this vocabulary: 0 stands in for them.
    config = GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=2,
        vocab_size=64,
        n_positions=32,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(config)


def make_trainer(
    tmp_path: Path, callbacks: list[Any], model: torch.nn.Module | None = None, **overrides: Any
) -> Trainer:
    settings: dict[str, Any] = {
        "output_dir": str(tmp_path / "out"),
        "per_device_train_batch_size": 4,
        "max_steps": 6,
        "logging_steps": 2,
        "learning_rate": 1e-3,
        "report_to": [],
        "save_strategy": "no",
        "use_cpu": True,
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
    }
    settings.update(overrides)
    return Trainer(
        model=model if model is not None else tiny_gpt2(),
        args=TrainingArguments(**settings),
        train_dataset=Tokens(),
        callbacks=callbacks,
    )


def tensorboard(out: Path) -> dict[str, list[tuple[int, float]]]:
    (folder,) = {path.parent for path in out.rglob("events.out.tfevents*")}
    accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {
        tag: [(event.step, event.value) for event in accumulator.Scalars(tag)]
        for tag in accumulator.Tags()["scalars"]
    }


class PoisonStep(TrainerCallback):
    """Makes every micro-batch of optimizer step ``step`` produce NaN gradients."""

    def __init__(self, model: torch.nn.Module, step: int) -> None:
        self.step, self.on = step, False
        self.before: dict[str, torch.Tensor] = {}
        self.changed: dict[int, int] = {}
        model.transformer.h[0].register_forward_hook(self._poison)

    def _poison(self, module: Any, inputs: Any, output: Any) -> Any:
        if not self.on:
            return None
        if isinstance(output, tuple):
            return (output[0] * math.nan, *output[1:])
        return output * math.nan

    def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.on = state.global_step == self.step

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.before = {n: p.detach().clone() for n, p in kw["model"].named_parameters()}

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        after = dict(kw["model"].named_parameters())
        self.changed[state.global_step] = sum(
            not torch.equal(self.before[n], p) for n, p in after.items()
        )


class LossRecorder(gg.Detector):
    """Records the loss each optimizer step hands the detectors."""

    def __init__(self) -> None:
        self.losses: dict[int, float | None] = {}

    def on_step(self, stats: gg.StepStats) -> list[gg.Finding]:
        self.losses[stats.step] = stats.loss
        return []


# ---------------------------------------------------------------------------- metrics
def test_pre_clip_metrics_reach_tensorboard_at_the_trainers_steps(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    callback = GradGuardCallback()
    run = make_trainer(tmp_path, [callback], report_to=["tensorboard"], max_grad_norm=0.05)
    with caplog.at_level(logging.INFO, logger="gradguard"):
        run.train()
    scalars = tensorboard(tmp_path / "out")

    ours, theirs = scalars["train/gradguard/grad_norm_total"], scalars["train/grad_norm"]
    assert [step for step, _ in ours] == [2, 4, 6]  # the Trainer's logging steps
    # The Trainer logs the pre-clip norm; gradguard measured the same gradients.
    assert [v for _, v in ours] == pytest.approx([v for _, v in theirs], rel=1e-5)
    assert all(value > 0.05 for _, value in ours)  # pre-clip: above the clip
    assert [v for _, v in scalars["train/gradguard/clip/threshold"]] == pytest.approx([0.05] * 3)
    assert all(v < 1 for _, v in scalars["train/gradguard/clip/coef"])
    assert f"train/gradguard/grad_norm/{LAYER}" in scalars
    assert f"train/gradguard/param_norm/{LAYER}" in scalars
    # The console line stays the Trainer's own; the user's arguments are as they were.
    assert "'loss'" in capsys.readouterr().out and "gradguard" not in capsys.readouterr().out
    assert run.args.max_grad_norm == 0.05
    assert "gg.NormClip(0.05) in place of the Trainer's max_grad_norm=0.05" in caplog.text


def test_taking_over_the_trainers_clip_trains_the_same_model(tmp_path: Path) -> None:
    alone = make_trainer(tmp_path / "a", [], max_grad_norm=0.05)
    alone.train()
    watched = make_trainer(tmp_path / "b", [GradGuardCallback()], max_grad_norm=0.05)
    watched.train()
    for (name, a), b in zip(alone.model.named_parameters(), watched.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)


def test_gradguard_clip_replaces_the_default_max_grad_norm(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sink = gg.MemorySink()
    callback = GradGuardCallback(clip=gg.NormClip(0.02), sinks=[sink])
    run = make_trainer(tmp_path, [callback], logging_steps=1)  # max_grad_norm: default 1.0
    with caplog.at_level(logging.INFO, logger="gradguard"):
        run.train()
    assert "the Trainer's default max_grad_norm=1.0 is turned off" in caplog.text
    logged = [row["grad_norm"] for row in run.state.log_history if "grad_norm" in row]
    totals = [value for _, value in sink.scalars["gradguard/grad_norm_total"]]
    assert totals == pytest.approx(logged, rel=1e-5)  # both pre-clip
    assert [v for _, v in sink.scalars["gradguard/clip/threshold"]] == pytest.approx([0.02] * 6)
    assert [step for step, _ in sink.scalars["gradguard/grad_norm_total"]] == [1, 2, 3, 4, 5, 6]
    assert run.args.max_grad_norm == 1.0


def test_two_clips_are_refused_when_the_trainer_is_built(tmp_path: Path) -> None:
    with pytest.raises(
        gg.ConfigurationError, match=r"max_grad_norm=0\.5.*clip the gradients twice"
    ):
        make_trainer(tmp_path, [GradGuardCallback(clip=gg.ZClip())], max_grad_norm=0.5)


def test_observing_without_any_clip_adds_no_clip(tmp_path: Path) -> None:
    sink = gg.MemorySink()
    run = make_trainer(tmp_path, [GradGuardCallback(sinks=[sink])], max_grad_norm=0.0)
    run.train()
    assert "gradguard/clip/threshold" not in sink.scalars
    assert [step for step, _ in sink.scalars["gradguard/grad_norm_total"]] == [1, 2, 4, 6]


def test_one_callback_in_two_trainers_follows_each_ones_arguments(tmp_path: Path) -> None:
    sink = gg.MemorySink()
    callback = GradGuardCallback(sinks=[sink], log_every_n_steps=1)
    make_trainer(tmp_path / "a", [callback], max_grad_norm=0.05, max_steps=2).train()
    assert sink.latest("gradguard/clip/threshold") == pytest.approx(0.05)
    make_trainer(tmp_path / "b", [callback], max_grad_norm=0.0, max_steps=2).train()
    assert callback.guard.clip is None  # the second Trainer does not clip: neither does gradguard


# ---------------------------------------------------------------------------- NaN skip
@pytest.mark.parametrize("optim", ["adamw_torch_fused", "adamw_torch"])
def test_nan_step_is_skipped_under_accumulation(tmp_path: Path, optim: str) -> None:
    model = tiny_gpt2()
    poison = PoisonStep(model, step=2)
    callback = GradGuardCallback(on_nonfinite="skip", clip=gg.ZClip())
    run = make_trainer(
        tmp_path,
        [poison, callback],
        model=model,
        optim=optim,
        gradient_accumulation_steps=2,
        max_grad_norm=0.0,
        report_to=["tensorboard"],
    )
    with pytest.warns(gg.GradGuardWarning, match=r"step 3\].*NaN") as caught:
        run.train()
    assert len([w for w in caught if "NaN" in str(w.message)]) == 1
    assert poison.changed == {0: 28, 1: 28, 2: 0, 3: 28, 4: 28, 5: 28}  # step 2: untouched
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert callback.guard.skipped_steps == 1 and callback.guard.step == 6
    (event,) = callback.events
    assert event.kind == "nonfinite" and event.step == 3  # the Trainer's global_step
    scalars = tensorboard(tmp_path / "out")
    assert scalars["train/gradguard/events/nonfinite"] == [(4, 1.0), (6, 1.0)]
    assert scalars["train/gradguard/skipped_steps"][-1] == (6, 1.0)


# ---------------------------------------------------------------------------- resume
def test_resume_restores_the_clip_history_bit_exactly(tmp_path: Path) -> None:
    settings: dict[str, Any] = {"save_strategy": "steps", "save_steps": 3, "logging_steps": 1}
    whole = GradGuardCallback(clip=gg.ZClip(warmup_steps=2))
    make_trainer(tmp_path, [whole], **settings).train()
    checkpoint = tmp_path / "out" / "checkpoint-3"
    saved = torch.load(checkpoint / STATE_FILE, weights_only=True)
    assert saved["guard"]["step"] == 3

    resumed = GradGuardCallback(clip=gg.ZClip(warmup_steps=2))
    make_trainer(tmp_path, [resumed], **settings).train(resume_from_checkpoint=str(checkpoint))
    assert resumed.guard.step == whole.guard.step == 6
    a, b = whole.guard.state_dict()["clip"], resumed.guard.state_dict()["clip"]
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


def test_resume_without_gradguard_state_says_so(tmp_path: Path) -> None:
    settings: dict[str, Any] = {"save_strategy": "steps", "save_steps": 3}
    make_trainer(tmp_path, [GradGuardCallback()], **settings).train()
    checkpoint = tmp_path / "out" / "checkpoint-3"
    (checkpoint / STATE_FILE).unlink()
    callback = GradGuardCallback()
    with pytest.warns(gg.GradGuardWarning, match="without gradguard's state"):
        make_trainer(tmp_path, [callback], **settings).train(resume_from_checkpoint=str(checkpoint))
    assert callback.guard.step == 3  # the steps it watched itself


# ---------------------------------------------------------------------------- loss
@pytest.mark.parametrize("accumulation", [1, 2])
def test_each_steps_loss_reaches_the_detectors(tmp_path: Path, accumulation: int) -> None:
    recorder = LossRecorder()
    callback = GradGuardCallback(detectors=[recorder])
    run = make_trainer(
        tmp_path, [callback], logging_steps=1, gradient_accumulation_steps=accumulation
    )
    run.train()
    logged = [row["loss"] for row in run.state.log_history if "grad_norm" in row]
    assert [recorder.losses[step] for step in range(6)] == pytest.approx(logged, rel=1e-4)


# ---------------------------------------------------------------------------- the example
def test_example_skips_the_blow_up_and_logs_pre_clip_norms(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    args = ["--steps", "6", "--poison-step", "3", "--logging-steps", "2"]
    monkeypatch.setattr(sys, "argv", ["hf_trainer.py", *args])
    with pytest.warns(gg.GradGuardWarning, match=r"step 4\].*NaN/Inf"):
        runpy.run_path(str(EXAMPLES / "hf_trainer.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "optimizer steps: 6, skipped by gradguard: 1" in out
    assert "weights finite: True" in out
    gradguard_norm, trainer_norm = out.split("last pre-clip total norm: gradguard ")[1].split(
        ", Trainer "
    )
    assert float(gradguard_norm) == pytest.approx(float(trainer_norm.split()[0]), abs=1e-4)
    assert "tensorboard --logdir hf_runs" in out
    assert list((tmp_path / "hf_runs").rglob("events.out.tfevents*"))


# ---------------------------------------------------------------------------- cost
class CountingCallback(GradGuardCallback):
    """GradGuardCallback whose per-step events count the host syncs they make."""

    syncs: dict[int, int]

    def _counted(self, event: str, args: Any, state: Any, control: Any, **kw: Any) -> None:
        with count_syncs() as counter:
            getattr(super(), event)(args, state, control, **kw)
        self.syncs[state.global_step] = self.syncs.get(state.global_step, 0) + counter.count

    def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self._counted("on_step_begin", args, state, control, **kw)

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self._counted("on_pre_optimizer_step", args, state, control, **kw)

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self._counted("on_optimizer_step", args, state, control, **kw)


@pytest.mark.parametrize(
    ("on_nonfinite", "optim", "syncs"),
    [
        ("warn", "adamw_torch_fused", 0),
        ("skip", "adamw_torch_fused", 0),
        ("skip", "adamw_torch", 1),
    ],
)
def test_host_syncs_on_steps_that_do_not_log(
    tmp_path: Path, on_nonfinite: str, optim: str, syncs: int
) -> None:
    callback = CountingCallback(on_nonfinite=on_nonfinite)  # type: ignore[arg-type]
    callback.syncs = {}
    # The Trainer logs after global steps 3 and 6 (gradguard's 2 and 5), and gradguard always
    # logs its step 0. A skip reads one flag per step, except on a fused optimizer.
    make_trainer(tmp_path, [callback], logging_steps=3, max_grad_norm=0.5, optim=optim).train()
    assert set(callback.syncs) == set(range(6))
    assert [callback.syncs[step] for step in (1, 3, 4)] == [syncs] * 3


# ---------------------------------------------------------------------------- failures
class BrokenDetector(gg.Detector):
    def bind(self, context: gg.GuardContext) -> None:
        raise RuntimeError("this detector cannot bind")


def _forward_hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_a_failed_start_leaves_nothing_behind(tmp_path: Path) -> None:
    model = tiny_gpt2()
    before = _forward_hooks(model)
    run = make_trainer(tmp_path, [GradGuardCallback(detectors=[BrokenDetector()])], model=model)
    with pytest.raises(RuntimeError, match="cannot bind"):
        run.train()
    assert _forward_hooks(model) == before
    inner = run.optimizer.optimizer
    assert not inner._optimizer_step_pre_hooks and not inner._optimizer_step_post_hooks
    assert run.args.max_grad_norm == 1.0
    again = GradGuardCallback()
    make_trainer(tmp_path / "again", [again], model=model).train()
    assert again.guard.step == 6


def test_a_grad_scalers_overflow_flag_is_read_after_unscaling() -> None:
    # The Trainer's fp16 path needs CUDA; its GradScaler bookkeeping is the same on CPU.
    from gradguard.integrations.transformers import _scaler_found_inf

    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    assert _scaler_found_inf(None) is None
    for value, overflow in ((1.0, 0.0), (math.inf, 1.0)):
        optimizer.zero_grad()
        scaler.scale(model(torch.full((2, 4), value)).sum()).backward()
        scaler.unscale_(optimizer)
        flag = _scaler_found_inf(scaler)
        assert flag is not None and float(flag) == overflow
        scaler.step(optimizer)
        scaler.update()


def test_without_transformers_the_error_names_the_extra() -> None:
    # transformers is installed here; hide it the way a missing package looks to an import.
    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "from gradguard.integrations.transformers import GradGuardCallback\n"
        "try:\n    GradGuardCallback()\n"
        "except ImportError as error:\n    print(type(error).__name__, error)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("MissingDependencyError")
    assert "pip install 'gradguard[transformers]'" in out.stdout
