"""Lightning adapter: one line in a ``Trainer``.

    from gradguard.integrations.lightning import GradGuardCallback
    trainer = Trainer(callbacks=[GradGuardCallback(clip=gg.AutoClip(), on_nonfinite="skip")])

``GradGuardCallback`` takes the keyword arguments of ``gg.GradGuard`` and drives one core
``GradGuard`` per optimizer; it adds no statistics of its own. Where it hooks in, and why:

* ``on_before_optimizer_step``: Lightning calls it after the backward (after the last
  micro-batch when ``accumulate_grad_batches`` > 1, so one decision per optimizer step),
  after AMP unscaling and before its own gradient clipping. gradguard measures, clips and
  decides to skip there, so it sees the gradients the optimizer will use. The hook also fires
  under manual optimisation (``self.manual_backward`` + ``opt.step()``).
* After the step: Lightning has no hook between ``optimizer.step()`` and the next batch, and
  ``on_train_batch_end`` is wrong under manual optimisation (several ``opt.step()`` calls per
  batch). So the callback registers a step post-hook on the torch optimizer itself: it runs
  right after the parameters changed, once per real step, which is what update ratios need.
  A step the optimizer never took (a ``GradScaler`` overflow under ``16-mixed``) is closed at
  the next ``on_before_optimizer_step`` or at ``on_train_batch_end``, whichever comes first.
* Several optimizers (manual optimisation): one ``GradGuard`` per optimizer, each watching the
  layers its optimizer holds, with its own clip state; their metric keys get the prefix
  ``gradguard/optimizer_<i>/`` so they never mix. One optimizer keeps the plain keys.
* Metrics go to every logger of the Trainer (``logger.log_metrics(scalars, step)`` on rank
  zero), keyed by ``trainer.global_step`` at that optimizer step, on gradguard's logging
  steps (every ``log_every_n_steps``, the Trainer's own value unless given). A
  ``TensorBoardLogger`` or ``WandbLogger`` gets gradguard's dashboard sink
  (``TensorBoardSink`` / ``WandbSink`` on the logger's own writer or run: custom scalars,
  figures, alerts) in place of the plain ``log_metrics`` route, so nothing is written twice.
  The Trainer's loggers are borrowed: flushed at the end of fit, never closed.
* Clipping: ``Trainer(gradient_clip_val=...)`` together with ``clip=`` is refused at setup
  (``ConfigurationError``), before the first step. With ``clip=None`` gradguard only observes
  and Lightning's clipping runs after it, so the logged norms are the pre-clip norms.
* Precision: ``bf16-mixed`` needs nothing special. ``16-mixed`` (CUDA): Lightning unscales
  before the hook; a step the ``GradScaler`` is about to skip for overflow is the scaler's
  business, so gradguard does not report it as NaN/Inf (it still counts in ``guard.step``).
  For fused optimizers (``fused=True``), which Lightning leaves scaled, the callback calls
  ``scaler.unscale_(optimizer)`` itself first (one extra pass over the gradients) and hands
  a skip decision to the fused kernel through the scaler's ``found_inf``: still sync-free.
* Checkpoints: ``state_dict`` holds the guards' state (tensors, numbers, strings, lists,
  dicts: loadable with ``weights_only=True``). Lightning calls ``load_state_dict`` before the
  optimizers exist; the state is kept and applied when the guards attach at fit start.
* The guards attach at ``on_fit_start`` and detach at the end of fit, on teardown and on an
  exception. Warnings and sink writes happen on rank zero only.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.hooks import RemovableHandle
from typing_extensions import Unpack

import gradguard as gg
from gradguard._errors import user_stacklevel

__all__ = ["GradGuardCallback"]

STATE_VERSION = 1

_LIGHTNING_IMPORT_ERROR: ImportError | None = None
if TYPE_CHECKING:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback as _CallbackBase
else:
    try:
        from lightning.pytorch.callbacks import Callback as _CallbackBase
    except ImportError as _exc:  # the module stays importable; construction says what to install
        _CallbackBase = object
        _LIGHTNING_IMPORT_ERROR = _exc


class _TrainerLoggerSink:
    """Sends gradguard's scalars to one of the Trainer's loggers (borrowed: never closed)."""

    def __init__(self, logger: Any) -> None:
        self.logger = logger

    def log_scalars(self, scalars: Any, step: int) -> None:
        self.logger.log_metrics(dict(scalars), step=step)

    def log_event(self, event: gg.Event) -> None:
        # A plain logger has no place for text; Events reach warnings and dashboard sinks.
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass

    def __repr__(self) -> str:
        return f"_TrainerLoggerSink({type(self.logger).__name__})"


def _dashboard_sink(logger: Any) -> gg.Sink | None:
    """gradguard's own sink for a TensorBoard, W&B or MLflow logger, on its writer or run."""
    from lightning.pytorch.loggers import MLFlowLogger, TensorBoardLogger, WandbLogger

    try:
        if isinstance(logger, TensorBoardLogger):
            from gradguard.integrations.tensorboard import TensorBoardSink

            sink: gg.Sink = TensorBoardSink(writer=logger.experiment)
            return sink
        if isinstance(logger, WandbLogger):
            from gradguard.integrations.wandb import WandbSink

            sink = WandbSink(run=logger.experiment)
            return sink
        if isinstance(logger, MLFlowLogger):
            from gradguard.integrations.mlflow import MlflowSink

            # The logger's run is not MLflow's active run: tell the sink which run, and how.
            sink = MlflowSink(run_id=logger.run_id, client=logger.experiment)
            return sink
    except (ImportError, AttributeError, TypeError):
        # The dashboard sink is missing or older than this adapter: plain log_metrics it is.
        return None
    return None


def _sinks_for(loggers: Iterable[Any]) -> list[gg.Sink]:
    sinks: list[gg.Sink] = []
    for logger in loggers:
        sink = _dashboard_sink(logger)
        sinks.append(sink if sink is not None else _TrainerLoggerSink(logger))
    return sinks


@dataclass
class _Watch:
    """One optimizer watched by one guard, and the adapter's bookkeeping around its steps."""

    guard: gg.GradGuard
    optimizer: torch.optim.Optimizer
    borrowed: list[gg.Sink]
    handles: list[RemovableHandle] = field(default_factory=list)
    inside_step: bool = False
    measured_in_step: bool = False
    scaler_skip: torch.Tensor | None = None


class GradGuardCallback(_CallbackBase):
    """Watches gradients in a Lightning ``Trainer``: ``Trainer(callbacks=[GradGuardCallback()])``.

    Takes the keyword arguments of ``gg.GradGuard`` (see there) and validates them here, at
    construction. Without ``log_every_n_steps`` it follows the Trainer's
    ``log_every_n_steps``. ``sinks`` are added to the Trainer's own loggers, which always
    receive the metrics. See the module docstring for how the hooks line up with Lightning.

    After (or during) ``fit``: ``callback.guard`` is the guard of the first optimizer,
    ``callback.guards`` one per optimizer; ``callback.report()`` and ``callback.events``.

    Raises:
        MissingDependencyError: lightning is not installed (``pip install 'gradguard[lightning]'``).
        ConfigurationError: a bad argument; at setup, a Trainer that also clips
            (``gradient_clip_val``) while gradguard clips.
    """

    def __init__(self, **options: Unpack[gg.GuardOptions]) -> None:
        if _LIGHTNING_IMPORT_ERROR is not None:
            raise gg.MissingDependencyError("lightning", "lightning") from _LIGHTNING_IMPORT_ERROR
        super().__init__()
        every: Any = options.pop("log_every_n_steps", None)
        self._log_every_n_steps: int | None = every
        self._user_sinks = list(options.pop("sinks", ()))
        # Constructed now so that every argument is validated at construction.
        self.guard = self._new_guard(dict(options), every if every is not None else 50)
        # A pristine copy for the guards of further optimizers (each needs its own clip,
        # spike and detector state), taken before the first guard starts mutating them.
        self._template: dict[str, Any] | None = None
        self._template_error: Exception | None = None
        try:
            self._template = copy.deepcopy(dict(options))  # before the guard mutates state
        except Exception as exc:  # an option that cannot be copied only matters for 2+ optimizers
            self._template_error = exc
        self._prefix = self.guard.prefix
        self.guards: list[gg.GradGuard] = [self.guard]
        self._watches: list[_Watch] = []
        self._by_optimizer: dict[int, _Watch] = {}
        self._pending_states: list[dict[str, Any]] | None = None
        self._scaler: torch.amp.GradScaler | None = None

    # ------------------------------------------------------------------ identity
    @property
    def state_key(self) -> str:
        return self._generate_state_key(prefix=self._prefix)

    def __repr__(self) -> str:
        return f"GradGuardCallback({self.guard!r}, optimizers={len(self._watches)})"

    @property
    def events(self) -> list[gg.Event]:
        """Every guard's Events, oldest first."""
        found = [event for guard in self.guards for event in guard.events]
        return sorted(found, key=lambda event: event.step)

    def report(self) -> str:
        """The diagnosis of each guard (one per optimizer)."""
        if len(self.guards) == 1:
            return self.guard.report()
        return "\n\n".join(
            f"optimizer {index}:\n{guard.report()}" for index, guard in enumerate(self.guards)
        )

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._check_trainer(trainer)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check_trainer(trainer)
        self._attach(trainer, pl_module)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        watch = self._by_optimizer.get(id(optimizer))
        if watch is None:
            return
        if watch.inside_step and watch.measured_in_step:
            return  # the closure ran again inside one step (LBFGS): one decision per step
        found_inf = None
        fused_under_scaler = False
        if self._scaler is not None:
            found_inf = self._scaler_found_inf(watch.optimizer)
            fused_under_scaler = found_inf is not None and bool(
                getattr(watch.optimizer, "_step_supports_amp_scaling", False)
            )
        # Fused optimizer under a GradScaler: scaler.step() sets optimizer.found_inf itself
        # (it would overwrite gradguard's skip flag) and deletes it after the step. So the
        # flag travels to our step pre-hook, which merges it into the scaler's.
        decision = watch.guard.before_step(
            found_inf=found_inf, sink_step=trainer.global_step, apply_skip=not fused_under_scaler
        )
        if fused_under_scaler and decision.skip is None:
            watch.scaler_skip = decision.skip_flag
        watch.measured_in_step = watch.inside_step

    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor
    ) -> None:
        # Every micro-batch's loss: the loss-aware detectors see the optimizer step's mean.
        # Under automatic optimisation Lightning has already divided it by
        # accumulate_grad_batches: undo that, so messages quote the loss the user logs.
        if pl_module.automatic_optimization and trainer.accumulate_grad_batches > 1:
            loss = loss.detach() * trainer.accumulate_grad_batches
        for watch in self._watches:
            watch.guard.observe_loss(loss)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        for watch in self._watches:
            watch.guard.after_step()  # no-op unless a step was never taken (scaler overflow)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._detach()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._detach()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._detach()

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        if self._pending_states is not None and not self._watches:
            return {"version": STATE_VERSION, "guards": copy.deepcopy(self._pending_states)}
        return {"version": STATE_VERSION, "guards": [guard.state_dict() for guard in self.guards]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        states = state_dict.get("guards") if isinstance(state_dict, dict) else None
        if not isinstance(states, list) or not all(isinstance(s, dict) for s in states):
            raise gg.ConfigurationError.bad_value(
                "state_dict", type(state_dict).__name__, "expected a GradGuardCallback state_dict"
            )
        if int(state_dict.get("version", 0)) > STATE_VERSION:
            raise gg.ConfigurationError(
                f"GradGuardCallback state version {state_dict['version']} is newer than this "
                f"gradguard understands ({STATE_VERSION}); upgrade gradguard"
            )
        if self._watches:
            # Some strategies restore callbacks after fit start: the guards are attached.
            for state, watch in zip(states, self._watches):
                watch.guard.load_state_dict(state)
        else:
            self._pending_states = [dict(s) for s in states]

    # ------------------------------------------------------------------ internals
    def _check_trainer(self, trainer: pl.Trainer) -> None:
        clip_val = getattr(trainer, "gradient_clip_val", None)
        if self.guard.clip is not None and clip_val is not None and float(clip_val) > 0:
            raise gg.ConfigurationError(
                f"Trainer(gradient_clip_val={clip_val!r}) and GradGuardCallback(clip="
                f"{self.guard.clip!r}) would clip the gradients twice, which is never what you "
                "want. Keep one: drop gradient_clip_val (gradguard clips and logs the threshold "
                "and the coefficient), or pass clip=None (gradguard observes and Lightning clips)."
            )

    def _guards_for(self, count: int) -> list[gg.GradGuard]:
        while len(self.guards) < count:
            if self._template is None:
                raise gg.ConfigurationError(
                    f"GradGuardCallback needs one guard per optimizer ({count} optimizers), but "
                    f"its options could not be copied for the extra ones: {self._template_error!r}"
                )
            options = copy.deepcopy(self._template)
            self.guards.append(self._new_guard(options, self.guard.log_every_n_steps))
        return self.guards[:count]

    def _new_guard(self, options: dict[str, Any], log_every_n_steps: int) -> gg.GradGuard:
        full: gg.GuardOptions = {
            **options,  # type: ignore[typeddict-item]
            "sinks": self._user_sinks,
            "log_every_n_steps": log_every_n_steps,
        }
        return gg.GradGuard(**full)

    def _attach(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._detach()
        optimizers = [o for o in trainer.optimizers if type(o).__name__ != "_MockOptimizer"]
        if not optimizers:
            if trainer.is_global_zero:
                warnings.warn(
                    "GradGuardCallback found no optimizer (configure_optimizers returned none): "
                    "it watches nothing in this run",
                    gg.GradGuardWarning,
                    stacklevel=user_stacklevel(),
                )
            return
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        self._scaler = scaler if isinstance(scaler, torch.amp.GradScaler) else None
        guards = self._guards_for(len(optimizers))
        states = self._pending_states
        self._pending_states = None
        if states is not None and len(states) != len(guards) and trainer.is_global_zero:
            warnings.warn(
                f"the checkpoint holds gradguard state for {len(states)} optimizer(s), this run "
                f"has {len(guards)}: the state is restored in order, for as many as match",
                gg.GradGuardWarning,
                stacklevel=user_stacklevel(),
            )
        loggers = list(trainer.loggers) if trainer.is_global_zero else []
        for index, (optimizer, guard) in enumerate(zip(optimizers, guards)):
            guard.prefix = (
                self._prefix if len(optimizers) == 1 else f"{self._prefix}/optimizer_{index}"
            )
            if self._log_every_n_steps is None:
                # Set on the Trainer at init; 0 (barebones: no logging) keeps gradguard's 50.
                trainer_every = int(getattr(trainer, "log_every_n_steps", 0) or 0)
                guard.log_every_n_steps = trainer_every if trainer_every > 0 else 50
            if states is not None and index < len(states):
                guard.load_state_dict(states[index])  # kept by the guard, applied at bind
            watch = _Watch(guard=guard, optimizer=optimizer, borrowed=_sinks_for(loggers))
            for sink in watch.borrowed:
                guard.add_sink(sink)
            guard.bind(pl_module, optimizer)
            watch.handles.append(optimizer.register_step_pre_hook(self._make_pre_hook(watch)))
            watch.handles.append(optimizer.register_step_post_hook(self._make_post_hook(watch)))
            self._watches.append(watch)
            self._by_optimizer[id(optimizer)] = watch

    @staticmethod
    def _make_pre_hook(watch: _Watch) -> Any:
        def pre_hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            watch.inside_step = True
            watch.measured_in_step = False
            flag, watch.scaler_skip = watch.scaler_skip, None
            current = optimizer.__dict__.get("found_inf")
            if flag is not None and isinstance(current, torch.Tensor):
                # Set by GradScaler.step() just before this: 1 skips the fused kernel's update.
                merged = torch.maximum(current, flag.to(current.device, current.dtype))
                optimizer.found_inf = merged  # type: ignore[attr-defined]

        return pre_hook

    @staticmethod
    def _make_post_hook(watch: _Watch) -> Any:
        def post_hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            watch.inside_step = False
            watch.measured_in_step = False
            watch.guard.after_step()

        return post_hook

    def _scaler_found_inf(self, optimizer: torch.optim.Optimizer) -> torch.Tensor | None:
        """The GradScaler's overflow flag for this step (unscaling a fused optimizer first)."""
        scaler = self._scaler
        if scaler is None or not scaler.is_enabled():
            return None
        from torch.amp.grad_scaler import OptState

        try:
            # GradScaler's per-optimizer record (private but stable since torch 1.6).
            state = scaler._per_optimizer_states[id(optimizer)]
            if (
                getattr(optimizer, "_step_supports_amp_scaling", False)
                and state["stage"] is OptState.READY
                and any(p.grad is not None for g in optimizer.param_groups for p in g["params"])
            ):
                # Lightning leaves a fused optimizer's gradients scaled (the kernel unscales);
                # unscale now so gradguard measures and clips the real gradients. The scaler
                # then tells the kernel that they are unscaled already.
                scaler.unscale_(optimizer)
            found = [t for t in state["found_inf_per_device"].values()]
        except (AttributeError, KeyError, RuntimeError):
            return None
        if not found:
            return None
        total: torch.Tensor = found[0].float()
        for flag in found[1:]:
            total = total + flag.to(total.device).float()
        return total

    def _detach(self) -> None:
        for watch in self._watches:
            for handle in watch.handles:
                handle.remove()
            guard = watch.guard
            guard.after_step()
            guard.detach()  # flushes every sink
            for sink in watch.borrowed:
                # Borrowed from the Trainer's loggers: flushed, never closed (Lightning is).
                guard.remove_sink(sink)
        self._watches.clear()
        self._by_optimizer.clear()
