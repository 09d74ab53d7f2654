"""gradguard in a Hugging Face Trainer: one line, ``callbacks=[GradGuardCallback(...)]``.

A tiny GPT-2 (built from a config: no download) learns random token sequences. At
``--poison-step`` a forward hook turns the first block's output into NaN, as a numerical
blow-up would: with ``on_nonfinite="skip"`` gradguard skips that optimizer step, so the
weights stay finite and training carries on. ZClip clips gradient spikes; the Trainer's
default ``max_grad_norm=1.0`` stands down for it (gradguard measures before it clips). The
metrics go into the Trainer's logs, so every ``report_to`` backend charts them at the
Trainer's own steps (TensorBoard: ``train/gradguard/...``).

Run it (CPU, a few seconds):

    python examples/hf_trainer.py
    tensorboard --logdir hf_runs        # the train/gradguard/... charts
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
from typing import Any

import torch
from gradguard.integrations.transformers import GradGuardCallback
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

import gradguard as gg

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is made locally


class Tokens(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    """Random token sequences; the labels are the inputs (next-token prediction)."""

    def __init__(self, count: int = 256, length: int = 32, vocabulary: int = 128) -> None:
        self.ids = torch.randint(0, vocabulary, (count, length), generator=torch.Generator())

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


class BlowUpAt(TrainerCallback):
    """Simulates a numerical blow-up: NaN activations during one optimizer step."""

    def __init__(self, model: GPT2LMHeadModel, step: int) -> None:
        self.step, self.active = step, False
        model.transformer.h[0].register_forward_hook(self._hook)

    def _hook(self, module: Any, inputs: Any, output: Any) -> Any:
        if not self.active:
            return None
        return (
            (output[0] * math.nan, *output[1:]) if isinstance(output, tuple) else output * math.nan
        )

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.active = state.global_step == self.step


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--poison-step", type=int, default=30, help="-1: no blow-up")
    parser.add_argument("--logging-steps", type=int, default=10)
    parser.add_argument("--output-dir", default="hf_runs")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=2,
        n_embd=64,
        n_head=4,
        vocab_size=128,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = GPT2LMHeadModel(config)
    memory = gg.MemorySink()
    # The one gradguard line. The defaults only observe; these options make it act.
    guard_callback = GradGuardCallback(clip=gg.ZClip(), on_nonfinite="skip", sinks=[memory])
    tensorboard = importlib.util.find_spec("tensorboard") is not None
    trainer = Trainer(
        model=model,
        args=TrainingArguments(
            output_dir=args.output_dir,
            max_steps=args.steps,
            per_device_train_batch_size=8,
            gradient_accumulation_steps=2,
            learning_rate=3e-3,
            logging_steps=args.logging_steps,
            report_to=["tensorboard"] if tensorboard else [],
            save_strategy="no",
            use_cpu=True,
            disable_tqdm=True,
        ),
        train_dataset=Tokens(),
        callbacks=[BlowUpAt(model, args.poison_step), guard_callback],
    )
    trainer.train()

    guard = guard_callback.guard
    print(guard.report())
    finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    print(f"optimizer steps: {guard.step}, skipped by gradguard: {guard.skipped_steps}")
    print(f"weights finite: {finite}")
    keys = [key for key in memory.scalars if key.startswith("gradguard/grad_norm/")]
    print(f"per-layer gradient norms logged for {len(keys)} layers, e.g. {keys[0]}")
    trainer_norm = [row["grad_norm"] for row in trainer.state.log_history if "grad_norm" in row]
    print(
        f"last pre-clip total norm: gradguard {memory.latest('gradguard/grad_norm_total'):.4f}, "
        f"Trainer {trainer_norm[-1]:.4f}"
    )
    if tensorboard:
        print(f"see the charts: tensorboard --logdir {args.output_dir}")


if __name__ == "__main__":
    main()
