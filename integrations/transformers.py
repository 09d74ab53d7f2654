"""Hugging Face ``Trainer`` adapter: one line in a ``Trainer``.

    from gradguard.integrations.transformers import GradGuardCallback
    trainer = Trainer(..., callbacks=[GradGuardCallback(clip=gg.ZClip(), on_nonfinite="skip")])

``GradGuardCallback`` takes the keyword arguments of ``gg.GradGuard`` and drives one core
``GradGuard``. Where it hooks in, and why (checked on transformers 5.24, accelerate 1.15):

* Measure, clip, skip: in ``on_pre_optimizer_step``, once per optimizer step (after the last
  micro-batch under gradient accumulation). The Trainer clips (``max_grad_norm``) BEFORE
  that event and no callback event falls in between, so whenever the Trainer would clip,
  the callback turns the Trainer's clip off for the step (``args.max_grad_norm = 0`` from
  ``on_step_begin`` to ``on_step_end``; the user's value is back in place for the rest of the
  step, for checkpoints and at the end) and gradguard clips instead, after measuring:

  - ``clip=`` given, ``max_grad_norm`` left at its default 1.0: gradguard's clip replaces it
    (said once, at INFO on the ``gradguard`` logger);
  - ``clip=`` given and another ``max_grad_norm > 0`` set: refused (``ConfigurationError``):
    two clips;
  - no ``clip=``, ``max_grad_norm > 0``: gradguard clips with ``gg.NormClip(max_grad_norm)``,
    the same rule as the Trainer's ``clip_grad_norm_`` (said once, at INFO).

  So the norms are always pre-clip. The Trainer still logs its own ``grad_norm`` (it computes
  it with ``clip_grad_norm_(params, inf)`` when its clip is off): the same pre-clip value.
* After the step: ``on_optimizer_step`` (restores a fused optimizer's ``found_inf``, publishes
  the logging step's metrics).
* Metrics: gradguard publishes on the optimizer steps after which the Trainer logs (its
  ``logging_steps``, ``logging_first_step``; or every ``log_every_n_steps`` of
  ``state.global_step`` when given), and the callback adds them to the Trainer's ``logs``, so
  every ``report_to`` backend stores them at ``state.global_step`` (TensorBoard shows
  ``train/gradguard/...``). Reporting callbacks read ``logs`` in list order and a user's
  callbacks come after them, so the callback puts a small helper just before the first
  reporting callback (it adds the metrics) and one just after the last (it takes them out
  again, so the console line stays the Trainer's own). Event counts go in as
  ``gradguard/events/<kind>``; the Events themselves are ``GradGuardWarning`` s. With
  ``logging_strategy="epoch"`` the Trainer's logs get no gradguard metrics (gradguard still
  publishes every 50 steps to its own ``sinks``).
* Loss: no callback event carries the step's loss, so a forward hook on the model reads the
  ``loss`` the model returns (labels in the batch) in training mode, and the step's loss
  (micro-batches averaged, or summed when the Trainer normalised them by
  ``num_items_in_batch``) goes to ``guard.observe_loss``. A loss computed outside the model
  (``compute_loss_func``, label smoothing) is not seen.
* NaN/Inf skip (``on_nonfinite="skip"``): the step leaves the weights and the optimizer state
  untouched (the Trainer's default fused AdamW: sync-free). The learning-rate scheduler
  still advances on a skipped step: the Trainer steps it unless a ``GradScaler`` skipped.
* Checkpoints: ``gradguard.pt`` (``torch.save`` of the guard's state; loadable with
  ``weights_only=True``) in each ``checkpoint-<global_step>`` folder, read back when
  ``trainer.train(resume_from_checkpoint=...)`` starts at that step.
* Several processes: every rank measures and decides alike (the gradients are already
  reduced at ``on_pre_optimizer_step``); warnings, log lines and the checkpoint file come
  from rank zero only.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle
from typing_extensions import Unpack

import gradguard as gg
from gradguard._dist import is_rank_zero
from gradguard._errors import user_stacklevel

from ._trainer_logs import TrainerLogs, logging_interval, trainer_logs_after

__all__ = ["STATE_FILE", "GradGuardCallback"]

STATE_FILE = "gradguard.pt"
"""The file, in each ``checkpoint-<global_step>`` folder, that holds the guard's state."""
STATE_VERSION = 1
# Without log_every_n_steps and without step-based Trainer logging (logging_strategy="epoch").
_FALLBACK_EVERY = 50

log = logging.getLogger("gradguard")

_IMPORT_ERROR: ImportError | None = None
if TYPE_CHECKING:
    from transformers import TrainerCallback as _CallbackBase
    from transformers import TrainerControl, TrainerState, TrainingArguments
else:
    try:
        from transformers import TrainerCallback as _CallbackBase
    except ImportError as _exc:  # the module stays importable; construction says what to install
        _CallbackBase = object
        _IMPORT_ERROR = _exc


class GradGuardCallback(_CallbackBase):
    """Watches gradients in a Hugging Face ``Trainer``:
    ``Trainer(..., callbacks=[GradGuardCallback()])``.

    Takes the keyword arguments of ``gg.GradGuard`` (see there) and validates them here.
    Without ``log_every_n_steps`` it publishes on the Trainer's logging steps. See the module
    docstring for how it lines up with the Trainer (clipping, logs, checkpoints).

    After (or during) training: ``callback.guard``, ``callback.events``, ``callback.report()``.

    Raises:
        MissingDependencyError: transformers is not installed
            (``pip install 'gradguard[transformers]'``).
        ConfigurationError: a bad argument; when the Trainer is built or starts training,
            ``TrainingArguments(max_grad_norm=...)`` other than the default together with
            ``clip=`` (two clips).
    """

    def __init__(self, **options: Unpack[gg.GuardOptions]) -> None:
        if _IMPORT_ERROR is not None:
            raise gg.MissingDependencyError("transformers", "transformers") from _IMPORT_ERROR
        every: Any = options.pop("log_every_n_steps", None)
        self._every: int | None = every
        self._options: dict[str, Any] = dict(options)
        # Built now so that every argument is validated at construction.
        self.guard = _new_guard(self._options, every if every is not None else _FALLBACK_EVERY)
        self._user_clip = self.guard.clip
        self._logs = TrainerLogs(self.guard.prefix)
        self._handles: list[RemovableHandle] = []
        self._nominal_every = self.guard.log_every_n_steps
        self._user_max_grad_norm = 0.0  # the Trainer's clip that gradguard stands in for
        self._zeroed: Any = None  # the TrainingArguments whose max_grad_norm we set to 0
        self._said: set[str] = set()
        self._scaler: Any = None
        self._loss: torch.Tensor | None = None
        self._loss_parts = 0
        self._loss_summed = False

    # ------------------------------------------------------------------ readouts
    @property
    def events(self) -> list[gg.Event]:
        """The guard's Events so far, oldest first."""
        return list(self.guard.events)

    def report(self) -> str:
        """The guard's plain-text diagnosis (``guard.report()``)."""
        return self.guard.report()

    def __repr__(self) -> str:
        return f"GradGuardCallback({self.guard!r})"

    # ------------------------------------------------------------------ Trainer events
    def on_init_end(
        self, args: TrainingArguments, state: TrainerState, control: Any, **kw: Any
    ) -> None:
        self._plan_clipping(args, announce=False)  # refuse two clips when the Trainer is built
        self._place_helpers()

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        **kw: Any,
    ) -> None:
        self._detach()  # a previous train() that raised never reached on_train_end
        if model is None or optimizer is None:
            raise gg.GradGuardError("GradGuardCallback needs the Trainer's model and optimizer")
        self._place_helpers()
        self._plan_clipping(args, announce=True)
        self._nominal_every = self._every or logging_interval(args, state, _FALLBACK_EVERY)
        self.guard.log_every_n_steps = self._nominal_every
        if state.global_step > 0:
            self._load_checkpoint(args, state)
        self.guard.add_sink(self._logs)
        try:
            self.guard.bind(model, optimizer)
        except BaseException:
            self.guard.remove_sink(self._logs)
            raise
        self._scaler = getattr(optimizer, "scaler", None)  # accelerate's GradScaler (CUDA fp16)
        self._handles.append(model.register_forward_hook(self._read_loss, with_kwargs=True))

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: Any, **kw: Any
    ) -> None:
        if self._user_max_grad_norm > 0:
            args.max_grad_norm = 0.0  # the Trainer clips before on_pre_optimizer_step: not now
            self._zeroed = args

    def on_pre_optimizer_step(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        optimizer: torch.optim.Optimizer | None = None,
        **kw: Any,
    ) -> None:
        guard = self.guard
        if not guard.attached:
            return
        if self._user_max_grad_norm > 0 and args.max_grad_norm:
            self._say(
                "late",
                "the Trainer clipped this step's gradients before gradguard measured them "
                "(on_step_begin did not run before it): this step's norms are post-clip",
                warn=True,
            )
        self._feed_loss()
        found_inf = _scaler_found_inf(self._scaler)
        publish = (state.global_step + 1) % self._nominal_every == 0
        if self._every is None:
            publish = publish or trainer_logs_after(args, state)
        # The Trainer logs after other steps than gradguard would (global_step N, 2N:
        # gradguard's N-1, 2N-1): say which ones; the first step is always published.
        try:
            decision = guard.before_step(
                found_inf=found_inf,
                sink_step=state.global_step + 1,
                apply_skip=found_inf is None,
                log=publish or guard.step == 0,
            )
        except BaseException:
            # The Trainer has no exception event: on_step_end and on_train_end will not run.
            # Put the user's max_grad_norm back and take every hook off before it propagates.
            self._restore_args()
            self._detach()
            raise
        # Under a GradScaler the scaler owns optimizer.found_inf: skip by dropping the
        # gradients instead (one flag read, the cost of a skip on any non-fused optimizer).
        flag = decision.skip_flag
        if found_inf is not None and flag is not None and bool(flag.item()):
            assert optimizer is not None
            for group in optimizer.param_groups:
                for param in group["params"]:
                    param.grad = None

    def on_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: Any, **kw: Any
    ) -> None:
        self.guard.after_step()

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: Any, **kw: Any
    ) -> None:
        self.guard.after_step()  # no-op unless the optimizer never stepped
        self._restore_args()  # checkpoints and evaluation see the user's max_grad_norm

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: Any, **kw: Any
    ) -> None:
        if not state.is_world_process_zero or not self.guard.attached:
            return
        folder = os.path.join(str(args.output_dir), f"checkpoint-{state.global_step}")
        if not os.path.isdir(folder):
            self._say(
                "no-folder",
                f"no checkpoint folder {folder}: gradguard's state is not saved with it",
                warn=True,
            )
            return
        saved = {"version": STATE_VERSION, "guard": self.guard.state_dict()}
        torch.save(saved, os.path.join(folder, STATE_FILE))

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: Any, **kw: Any
    ) -> None:
        self._detach()
        self._restore_args()

    # ------------------------------------------------------------------ clipping
    def _plan_clipping(self, args: TrainingArguments, *, announce: bool) -> None:
        """Decide who clips (see the module docstring); raise on two clips."""
        self._restore_args()  # a train() that raised mid-step left our 0 in place
        trainer_clip = float(getattr(args, "max_grad_norm", 0.0) or 0.0)
        if not (trainer_clip > 0 and math.isfinite(trainer_clip)):
            trainer_clip = 0.0
        if self._user_clip is not None and trainer_clip not in (0.0, _default_max_grad_norm()):
            raise gg.ConfigurationError(
                f"TrainingArguments(max_grad_norm={trainer_clip!r}) and GradGuardCallback(clip="
                f"{self._user_clip!r}) would clip the gradients twice, which is never what you "
                "want. Keep one: max_grad_norm=0 (gradguard clips, after measuring the real "
                "gradients), or clip=None (gradguard takes over the Trainer's clip with "
                f"gg.NormClip({trainer_clip!r}), the same rule, and measures before it)."
            )
        self._user_max_grad_norm = trainer_clip
        if self._user_clip is None:
            # Observing only: gradguard stands in for the Trainer's clip, if there is one.
            wanted = gg.NormClip(trainer_clip) if trainer_clip > 0 else None
            if not _same_clip(self.guard.clip, wanted):
                old = self.guard
                old.detach()
                options = {**self._options, "clip": wanted}
                self.guard = _new_guard(options, old.log_every_n_steps)
                # Sinks added to the old guard (guard.add_sink) go along; read
                # callback.guard after building the Trainer, as it may be a new object.
                for sink in old.sinks.sinks:
                    if sink is not self._logs and sink not in self.guard.sinks.sinks:
                        self.guard.add_sink(sink)
        if trainer_clip == 0.0 or not announce:
            return
        if self._user_clip is not None:
            self._say(
                "clip",
                f"gradguard clips with {self._user_clip!r}; the Trainer's default "
                f"max_grad_norm={trainer_clip!r} is turned off during the steps",
            )
        else:
            self._say(
                "clip",
                f"gradguard clips with gg.NormClip({trainer_clip!r}) in place of the Trainer's "
                f"max_grad_norm={trainer_clip!r} (the same clip), so that it measures the "
                "gradients before they are clipped",
            )

    def _place_helpers(self) -> None:
        if not self._logs.place(self):
            self._say(
                "no-handler",
                "GradGuardCallback could not reach the Trainer's callback list: its metrics "
                "reach only the sinks given to it, not the report_to backends",
                warn=True,
            )

    # ------------------------------------------------------------------ loss
    def _read_loss(self, module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        if not module.training or not torch.is_grad_enabled():
            return
        loss = output.get("loss") if isinstance(output, Mapping) else None
        if not isinstance(loss, torch.Tensor) or not loss.is_floating_point():
            return
        value = loss.detach().float().mean()  # no sync: it stays on the device
        self._loss = value if self._loss is None else self._loss + value
        self._loss_parts += 1
        # Normalised by the whole step's token count: the micro-batch losses add up.
        self._loss_summed = kwargs.get("num_items_in_batch") is not None

    def _feed_loss(self) -> None:
        loss, parts, self._loss, self._loss_parts = self._loss, self._loss_parts, None, 0
        if loss is not None and parts:
            self.guard.observe_loss(loss if self._loss_summed else loss / parts)

    # ------------------------------------------------------------------ state
    def _load_checkpoint(self, args: TrainingArguments, state: TrainerState) -> None:
        folders = [os.path.join(str(args.output_dir), f"checkpoint-{state.global_step}")]
        resume = getattr(args, "resume_from_checkpoint", None)
        if isinstance(resume, str):
            folders.append(resume)
        for folder in folders:
            path = os.path.join(folder, STATE_FILE)
            if os.path.isfile(path):
                saved = torch.load(path, map_location="cpu", weights_only=True)
                if int(saved.get("version", 0)) > STATE_VERSION:
                    raise gg.ConfigurationError(
                        f"{path} was written by a newer gradguard (state version "
                        f"{saved['version']}); upgrade gradguard to resume from it"
                    )
                self.guard.load_state_dict(saved["guard"])
                return
        self._say(
            "no-state",
            f"resuming at step {state.global_step} without gradguard's state (no {STATE_FILE} "
            f"in {' or '.join(folders)}): its clip history and statistics start afresh",
            warn=True,
        )

    # ------------------------------------------------------------------ internals
    def _say(self, key: str, text: str, *, warn: bool = False) -> None:
        """Once per callback, on rank zero: a GradGuardWarning (``warn``) or an INFO line."""
        if key in self._said or not is_rank_zero():
            return
        self._said.add(key)
        if warn:
            warnings.warn(text, gg.GradGuardWarning, stacklevel=user_stacklevel())
        else:
            log.info("%s", text)

    def _restore_args(self) -> None:
        if self._zeroed is not None:
            self._zeroed.max_grad_norm = self._user_max_grad_norm
            self._zeroed = None

    def _detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._loss, self._loss_parts = None, 0
        if self.guard.attached:
            self.guard.after_step()
            self.guard.detach()
        self.guard.remove_sink(self._logs)


def _new_guard(options: dict[str, Any], log_every_n_steps: int) -> gg.GradGuard:
    full: gg.GuardOptions = {**options, "log_every_n_steps": log_every_n_steps}  # type: ignore[typeddict-item]
    return gg.GradGuard(**full)


def _default_max_grad_norm() -> float:
    from transformers import TrainingArguments

    for field in dataclasses.fields(TrainingArguments):
        if field.name == "max_grad_norm":
            return float(field.default)  # type: ignore[arg-type]
    return 1.0


def _same_clip(clip: Any, wanted: gg.NormClip | None) -> bool:
    if wanted is None or clip is None:
        return clip is wanted
    return isinstance(clip, gg.NormClip) and not clip.per_layer and clip.max_norm == wanted.max_norm


def _scaler_found_inf(scaler: Any) -> torch.Tensor | None:
    """The GradScaler's overflow flag for this step (CUDA fp16), read after the Trainer's
    ``clip_grad_norm_`` unscaled the gradients; None without a scaler."""
    if not isinstance(scaler, torch.amp.GradScaler) or not scaler.is_enabled():
        return None
    try:
        # GradScaler's per-optimizer record (private but stable since torch 1.6).
        states = scaler._per_optimizer_states
        found = [t for s in states.values() for t in s["found_inf_per_device"].values()]
    except (AttributeError, KeyError):
        return None
    if not found:
        return None
    total: torch.Tensor = found[0].float()
    for flag in found[1:]:
        total = total + flag.to(total.device).float()
    return total
