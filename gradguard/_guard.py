"""GradGuard: attach and detach, the adapter API, the state that survives a resume.

The per-step flow itself lives in ``_step.py`` (device work before the optimizer step),
``_hostside.py`` (each step's packet on the host: counters, detectors, logging steps),
``_publish.py`` (a logging step's bulk copy) and the detectors; this class wires them to
an optimizer and keeps the counters, the Events and the sinks.
"""

from __future__ import annotations

import logging
import math
import warnings
import weakref
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from typing_extensions import Unpack

from ._announce import Announcer
from ._binding import Binding
from ._config import GuardConfig, GuardOptions
from ._debounce import Finding
from ._dist import distributed, is_rank_zero
from ._errors import (
    ConfigurationError,
    GradGuardError,
    GradGuardWarning,
    GradientAlarmError,
    user_stacklevel,
)
from ._hooks import register_step_hooks
from ._hostside import GuardHostSide
from ._keys import MetricKeys
from ._layers import discover_layers
from ._packet import HostMirror
from ._policy import StepDecision
from ._publish import PendingLog, snapshot_params
from ._readout import GuardReadout
from ._sinks import Sink, SinkSet
from ._state import StateSchema
from ._stats import LoggedStats, StepStats
from ._wrappers import compile_wrapper, unwrap_model, unwrap_optimizer
from .activations.monitor import compiled
from .detect.base import Detector
from .detect.nonfinite import NonfiniteDetector
from .recover.ladder import RecoveryLadder, StepPlan
from .recover.snapshot import has_sharded_state

__all__ = ["GradGuard", "attach"]

log = logging.getLogger("gradguard")

_watched_optimizers: weakref.WeakSet[torch.optim.Optimizer] = weakref.WeakSet()


class GradGuard(GuardHostSide, GuardReadout):
    """Watches gradients (and sampled activations) around each optimizer step.

    Args:
        clip: ``None`` (observe only), a float (global max norm), or a clip strategy:
            ``NormClip``, ``ValueClip``, ``AutoClip``, ``ZClip``, ``AGC``.
        on_nonfinite: what to do with a NaN/Inf gradient. ``"warn"`` (default) costs no host
            sync: the warning arrives at most one step late. ``"skip"`` leaves the weights and
            the optimizer state untouched; it reads ONE flag per step back to the host (a
            sync), except on fused optimizers (``fused=True``), where it is sync-free.
            ``"raise"`` raises ``GradientAlarmError`` before the step (one sync per step).
        on_spike: ``"ignore"``, ``"warn"`` (default, sync-free) or ``"skip"`` (same cost as
            ``on_nonfinite="skip"``; both together still read one flag).
        spike: the ``SpikeDetector`` (threshold, EMA, warm-up) used by ``on_spike``.
        activations: ``True`` (an ``ActivationMonitor`` with defaults), ``False``, or an
            ``ActivationMonitor``.
        log_every_n_steps: statistics are copied to the host and sent to the sinks on steps
            0, N, 2N, ... (one bulk copy each).
        sinks: where scalars and Events go (``MemorySink``, ``LoggingSink``,
            ``TensorBoardSink``, ``WandbSink`` or your own ``Sink``).
        detectors: the host-side detectors (default: ``gg.default_detectors()``: gradient
            flow, symmetric units, learning rate, clipping done elsewhere, loss spikes,
            trends, update spikes, the stability score, NaN forensics); NaN/Inf, spikes and
            activations have their own knobs.
        histograms: ``True`` or a ``gg.Histograms(...)``: per-layer histograms of log10
            |gradient| counted on the device on logging steps (off by default).
        update_ratio: log ``||update|| / ||param||`` per layer on logging steps. It copies the
            parameters for that step; ``"auto"`` does so for models up to 128M elements.
        prefix: the first part of every metric key.
        warn: emit ``GradGuardWarning`` for Events (rank zero only, rate-limited per kind).
        repeat_every: steps between two reminders of a condition that persists.
        on_instability: ``None`` (default) or ``gg.Recover(...)``: the recovery ladder
            (skip, then lower the learning rate, then roll back to an in-memory snapshot).
            It implies ``on_nonfinite="skip"`` and ``on_spike="skip"`` (unless
            ``"ignore"``). Cost: one flag read per step as for a skip (none on fused
            optimizers), a wait for the previous step's packet (normally already there),
            and a host copy of model and optimizer state every ``snapshot_every`` steps.

    Every argument is checked here, at construction (``ConfigurationError`` names it).
    Adapters for training frameworks use ``bind``, ``before_step``, ``after_step`` and
    ``add_sink`` instead of ``attach``.
    """

    def __init__(self, **options: Unpack[GuardOptions]) -> None:
        config = GuardConfig.from_options(options)
        self.config = config
        self.sinks = SinkSet(config.sinks)
        self._announcer = Announcer(config, self.sinks)
        self._keys = MetricKeys(config.prefix)
        self._nonfinite = NonfiniteDetector()
        self._detectors: list[Detector] = [self._nonfinite]
        if config.on_spike != "ignore":
            self._detectors.append(config.spike)
        self._detectors += config.detectors
        if config.activations is not None:
            self._detectors.append(config.activations)
        # Detectors that look at every step (the base class's on_step finds nothing).
        stepping = [d for d in self._detectors if d.every_step()]
        looking = [d for d in stepping if type(d).on_step is not Detector.on_step]
        self._step_detectors = [d for d in looking if not d.batched]
        self._batched_detectors = [d for d in looking if d.batched]
        self._batch: list[StepStats] = []
        # ...and those that want to hear when a step ends (the others do nothing there).
        self._step_end_detectors = [
            d for d in stepping if type(d).on_step_end is not Detector.on_step_end
        ]
        self._step = 0
        self._skipped_steps = 0
        self._nonfinite_steps = 0
        self._clipped_steps = 0
        self._binding: Binding | None = None
        self._pending_state: dict[str, Any] | None = None
        self._pending_log: PendingLog | None = None
        self._last_stats: LoggedStats | None = None
        self._last_scalars: dict[str, float] = {}
        self._in_step = False
        self._depth_source = "registration"
        self._compiled = False
        self._last_layers: list[str] = []
        self._last_blind_spots: list[str] = []
        self._loss: torch.Tensor | None = None
        self._loss_parts = 0
        self._mirror = HostMirror(self._on_packet, self._flush_batched)
        recover = config.on_instability
        self._ladder = RecoveryLadder(recover) if recover is not None else None
        if self._ladder is not None:
            self._ladder.shown_step = self._announcer.shown

    def _all_detectors(self) -> list[Detector]:
        """Every detector the guard runs, built-in ones first (fixed at construction)."""
        return self._detectors

    # ------------------------------------------------------------------ attach / detach
    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> GradGuard:
        """Watch ``model``/``optimizer``: optimizer step hooks, activation sampling."""
        self.bind(model, optimizer)
        binding = self._binding
        assert binding is not None
        try:
            binding.handles += register_step_hooks(
                binding.optimizer, self.before_step, self.after_step
            )
        except BaseException:
            self.detach()  # whatever raised, attach leaves nothing behind
            raise
        return self

    def bind(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> GradGuard:
        """Everything ``attach`` does except the optimizer hooks: for adapters that call
        ``before_step`` and ``after_step`` themselves. Nothing is left behind if it fails."""
        if self._binding is not None:
            raise GradGuardError("this GradGuard is already attached; call detach() first")
        if not isinstance(model, nn.Module):
            raise ConfigurationError.bad_value("model", model, "expected a torch.nn.Module")
        self._compiled = compiled(model)
        eager_through = compile_wrapper(model)
        model = unwrap_model(model)
        optimizer = unwrap_optimizer(optimizer)
        layout = discover_layers(model, optimizer)
        if self._ladder is not None and has_sharded_state(model):
            raise ConfigurationError(
                "on_instability=gg.Recover(...) cannot snapshot sharded (FSDP2/DTensor) "
                "parameters yet: use it with single-device or DDP models"
            )
        if optimizer in _watched_optimizers:
            raise ConfigurationError(
                f"optimizer={type(optimizer).__name__} is already watched by another GradGuard: "
                "call detach() on that guard first (one guard per optimizer)"
            )
        parts: list[Any] = [self.config.clip, *self._all_detectors()]
        claimed: list[Any] = []
        try:
            for part in parts:
                if part is not None:
                    part.claim(self)
                    claimed.append(part)
            self._binding = Binding.create(
                self.config,
                self._all_detectors(),
                model,
                optimizer,
                layout,
                compiled=self._compiled,
                eager_through=eager_through,
                shown_step=self._announcer.shown,
            )
            _watched_optimizers.add(optimizer)
            if self._ladder is not None:
                world = torch.distributed.get_world_size() if distributed() else 1
                self._ladder.bind(world_size=world)
            if self._pending_state is not None:
                state, self._pending_state = self._pending_state, None
                self._apply_state(state)
            for detector in self._all_detectors():
                detector.on_step_end(self._step)
        except BaseException:
            binding, self._binding = self._binding, None
            if binding is not None:
                binding.release(self._all_detectors())
            for part in claimed:
                part.release(self)
            _watched_optimizers.discard(optimizer)
            raise
        if self._binding.rank_zero and self._binding.watched.unowned:
            warnings.warn(
                f"the optimizer holds {self._binding.watched.unowned} parameter(s) that the "
                "model does not own: gradguard cannot watch them (they are in no norm, clip or "
                "NaN check). Attach to the model that owns every parameter the optimizer updates.",
                GradGuardWarning,
                stacklevel=user_stacklevel(),
            )
        return self

    def detach(self) -> None:
        """Remove every hook gradguard added and flush the sinks. Safe to call twice.

        The guard keeps its state and sinks: ``attach`` again continues where it stopped.
        ``close()`` (or leaving a ``with`` block) also closes the sinks.
        """
        binding = self._binding
        if binding is None:
            return
        self._mirror.drain(block=True)
        self._in_step = False
        self._pending_log = None
        if self._ladder is not None:
            self._ladder.release()
        binding.release(self._all_detectors())
        for part in (self.config.clip, *self._all_detectors()):
            if part is not None:
                part.release(self)
        _watched_optimizers.discard(binding.optimizer)
        self._last_layers = list(binding.layout.names)
        self._last_blind_spots = binding.blind_spots(self.config)  # the report after detach
        self._binding = None
        if binding.rank_zero:
            self.sinks.flush()

    def close(self) -> None:
        """``detach()``, then close the sinks (a closed sink writes no more)."""
        rank_zero = self._binding.rank_zero if self._binding is not None else is_rank_zero()
        self.detach()
        if rank_zero:
            self.sinks.close()

    def __enter__(self) -> GradGuard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add_sink(self, sink: Sink) -> None:
        """Send output to one more sink (adapters add their framework's loggers)."""
        if not isinstance(sink, Sink) or isinstance(sink, type):
            raise ConfigurationError.bad_value(
                "sink", sink, "expected a sink instance (log_scalars, log_event, flush, close)"
            )
        self.sinks.add(sink)

    def remove_sink(self, sink: Sink) -> None:
        """Stop sending output to ``sink`` (not closed: its owner closes it)."""
        self.sinks.remove(sink)

    # ------------------------------------------------------------------ the adapter API
    def before_step(
        self,
        *,
        found_inf: torch.Tensor | None = None,
        sink_step: int | None = None,
        apply_skip: bool = True,
        log: bool | None = None,
    ) -> StepDecision:
        """Measure, detect, clip and maybe skip, right before the optimizer updates.

        ``found_inf``: the ``GradScaler``'s overflow flag for this step (a device tensor),
        for adapters whose framework unscales AMP gradients before calling this; an
        overflow step belongs to the scaler and is not reported as non-finite.
        ``sink_step``: the step the sinks and Events use for this optimizer step (under
        Lightning, ``trainer.global_step``); the guard's own step by default.
        ``apply_skip=False``: leave a sync-free skip to the caller (it hands
        ``decision.skip_flag`` to the optimizer itself, e.g. through the scaler).
        ``log``: publish this step (True) or not (False) whatever ``log_every_n_steps``
        says, for adapters that follow their framework's logging schedule; by default a
        step is published when ``step % log_every_n_steps == 0``.
        """
        binding = self._binding
        if binding is None:
            raise GradGuardError("GradGuard is not attached: call attach(model, optimizer) first")
        if self._in_step:
            # The last step never finished (optimizer.step raised, or was interrupted):
            # restore found_inf first, or a stale skip flag would skip every later step.
            self.after_step()
        # With the ladder on, every packet up to the last step is read now (normally already
        # there): an incident at step s is acted on at step s + 1 on every device and rank.
        self._mirror.drain(block=self._ladder is not None)
        binding = self._refresh(binding)
        step = self._step
        shown = self._announcer.map_step(step, sink_step)
        loss, self._loss, self._loss_parts = self._loss, None, 0
        plan = self._begin_recovery(binding, step)
        if plan is not None and plan.skip:
            return self._drop_update(binding, step)
        try:
            out = binding.pipeline.run(step, found_inf=found_inf, apply_skip=apply_skip, loss=loss)
        except GradientAlarmError as alarm:
            self._step = step + 1
            self._nonfinite_steps += 1
            finding = Finding("nonfinite", alarm.layers, math.nan, str(alarm), "", "error")
            self._announce(finding, step, warn=False)
            raise
        note = (out.spec, out.decision.skip, out.norms.present_host, binding.names, out.host_values)
        self._mirror.push(step, out.packet, note)
        if (step % self.config.log_every_n_steps == 0) if log is None else log:
            snapshot = snapshot_params(binding.layout) if binding.track_updates else None
            self._pending_log = PendingLog(step, shown, out.norms, out.clip, snapshot)
        self._step = step + 1
        self._in_step = True
        if plan is not None and plan.lr_factor != 1.0 and self._ladder is not None:
            self._ladder.lr.apply(binding.optimizer, plan.lr_factor)
        return out.decision

    def _begin_recovery(self, binding: Binding, step: int) -> StepPlan | None:
        """The ladder's actions for this step (None when it is off); raises when it is
        exhausted and told to."""
        ladder = self._ladder
        if ladder is None:
            return None
        plan = ladder.begin_step(step, binding.model, binding.optimizer, self.config.clip)
        for finding in plan.findings:
            self._announce(finding, step, warn=plan.alarm is None)
        if plan.alarm is not None:
            self._step = step + 1
            raise plan.alarm
        return plan

    def _drop_update(self, binding: Binding, step: int) -> StepDecision:
        """A step whose update the ladder drops (the one that rolled back, and those after
        it): its gradients belong to weights that no longer exist. Nothing is measured, so
        no clip history or detector sees it; the optimizer sees no gradient."""
        binding.optimizer.zero_grad(set_to_none=True)
        self._skipped_steps += 1
        self._step = step + 1
        self._in_step = True
        return StepDecision(step, True, None)

    def observe_loss(self, loss: torch.Tensor | float) -> None:
        """Hand the guard this step's training loss, for the loss-aware detectors.

        No host sync: a tensor stays on the device and travels with the step's packet.
        Call it once per forward pass (under gradient accumulation, once per micro-batch:
        the step's loss is their mean). The Lightning adapter calls it for you.
        """
        if isinstance(loss, torch.Tensor):
            value = loss.detach().float().reshape(())
        else:  # a fill on the device: no host->device copy
            device = self._binding.device if self._binding is not None else torch.device("cpu")
            value = torch.full((), float(loss), device=device)
        if self._loss is None or self._loss_parts == 0:
            self._loss, self._loss_parts = value, 1
        else:
            parts = self._loss_parts
            self._loss = torch.lerp(self._loss, value.to(self._loss.device), 1.0 / (parts + 1))
            self._loss_parts = parts + 1

    def after_step(self) -> None:
        """Finish the step: restore optimizer attributes, log, schedule activation windows."""
        if not self._in_step:
            return
        self._in_step = False
        if self._ladder is not None:
            self._ladder.lr.restore()
        binding = self._binding
        if binding is None:
            return
        binding.pipeline.found_inf.restore()
        if self._pending_log is not None:
            pending, self._pending_log = self._pending_log, None
            self._publish(binding, pending)
        for detector in self._step_end_detectors:
            detector.on_step_end(self._step)

    def _refresh(self, binding: Binding) -> Binding:
        """Follow what changed since the last step; a few attribute reads when nothing did."""
        if binding.depth is not None and binding.depth.seen_any:
            self._mirror.drain(block=True)  # once: read the old layout's packets first
            if binding.learn_depth(self.config):
                self._depth_source = "forward"
        changed, moved = binding.outdated()
        if not (changed or moved):
            return binding
        self._mirror.drain(block=True)  # rare: read the old layout's packets first
        if self._ladder is not None:
            self._ladder.forget_snapshots()
        rebuilt = binding.rebuilt(self.config, self._all_detectors(), compiled=self._compiled)
        if changed:
            log.info(
                "gradguard: the optimizer's trainable parameters changed; now watching %d layers",
                rebuilt.layout.num_layers,
            )
        self._binding = rebuilt
        return rebuilt

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Everything a resume needs: tensors, numbers, strings, lists and dicts only."""
        if self._pending_state is not None and self._binding is None:
            return dict(self._pending_state)
        self._mirror.drain(block=True)
        return StateSchema.save(self)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a ``state_dict``; before ``attach`` it is kept and applied at attach.

        The whole state is checked first: a state that cannot be loaded raises
        ``ConfigurationError`` and changes nothing.
        """
        checked = StateSchema.check(self, state)
        if self._binding is None:
            self._pending_state = checked
            self._step = int(checked["step"])
            return
        self._apply_state(checked)

    def _apply_state(self, state: dict[str, Any]) -> None:
        self._mirror.drain(block=True)
        StateSchema.apply(self, state)

    def __repr__(self) -> str:
        where = f"attached, step={self._step}" if self.attached else "detached"
        return (
            f"GradGuard(clip={self.config.clip!r}, on_nonfinite={self.config.on_nonfinite!r}, "
            f"on_spike={self.config.on_spike!r}, "
            f"log_every_n_steps={self.config.log_every_n_steps}, {where})"
        )


def attach(
    model: nn.Module, optimizer: torch.optim.Optimizer, **options: Unpack[GuardOptions]
) -> GradGuard:
    """``GradGuard(**options).attach(model, optimizer)``: watch a plain PyTorch loop.

    Takes the keyword arguments of ``GradGuard`` (see there).
    """
    return GradGuard(**options).attach(model, optimizer)
