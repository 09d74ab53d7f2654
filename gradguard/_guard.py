"""GradGuard: attach and detach, the adapter API, the state that survives a resume.

The per-step flow itself lives in ``_step.py`` (device work before the optimizer step),
``_publish.py`` (a logging step) and the detectors (host work on the step packet); this
class wires them to an optimizer and keeps the counters, the Events and the sinks.
"""

from __future__ import annotations

import logging
import math
import warnings
import weakref
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle
from typing_extensions import Unpack

from ._config import GuardConfig, GuardOptions
from ._debounce import Debouncer, Finding
from ._depth import DepthRecorder
from ._dist import is_rank_zero, local_tensor
from ._errors import ConfigurationError, GradGuardError, GradGuardWarning, GradientAlarmError
from ._events import Event
from ._keys import MetricKeys
from ._layers import LayerLayout, WatchedSet, discover_layers, merge_depth_order
from ._norms import GradNormComputer
from ._packet import HostMirror, PacketSpec
from ._policy import StepDecision
from ._publish import PendingLog, collect, snapshot_params
from ._ratelimit import RateLimiter
from ._sinks import Sink, SinkSet
from ._state import StateSchema
from ._stats import (
    CLIP_COEF,
    CLIPPED_STEPS,
    NONFINITE_STEPS,
    SKIPPED_STEPS,
    LoggedStats,
    StepStats,
)
from ._step import SCALER_OVERFLOW, SKIP, StepPipeline
from ._wrappers import unwrap_model, unwrap_optimizer
from .activations.monitor import compiled
from .detect.base import Detector, GuardContext
from .detect.nonfinite import NonfiniteDetector

__all__ = ["GradGuard", "attach"]

log = logging.getLogger("gradguard")

# Update ratios need a copy of the parameters on logging steps; "auto" takes it only for
# models up to this many trainable elements (128M: 512 MB in fp32).
AUTO_UPDATE_RATIO_MAX_ELEMENTS = 2**27
# How many guard-step -> sink-step entries are remembered (packets arrive a step or two late).
_STEP_MAP_SIZE = 64

_watched_optimizers: weakref.WeakSet[torch.optim.Optimizer] = weakref.WeakSet()


@dataclass
class _Binding:
    """Everything that exists only while the guard is attached."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    layout: LayerLayout
    watched: WatchedSet
    computer: GradNormComputer
    pipeline: StepPipeline
    context: GuardContext
    device: torch.device
    rank_zero: bool
    track_updates: bool
    depth: DepthRecorder | None
    on_meta: bool
    handles: list[RemovableHandle] = field(default_factory=list)


class GradGuard:
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
        detectors: the host-side detectors (default: ``gg.default_detectors()``, the
            gradient-flow detector); NaN/Inf, spikes and activations have their own knobs.
        update_ratio: log ``||update|| / ||param||`` per layer on logging steps. It copies the
            parameters for that step; ``"auto"`` does so for models up to 128M elements.
        prefix: the first part of every metric key.
        warn: emit ``GradGuardWarning`` for Events (rank zero only, rate-limited per kind).
        repeat_every: steps between two reminders of a condition that persists.

    Every argument is checked here, at construction (``ConfigurationError`` names it).
    Adapters for training frameworks use ``bind``, ``before_step``, ``after_step`` and
    ``add_sink`` instead of ``attach``.
    """

    def __init__(self, **options: Unpack[GuardOptions]) -> None:
        config = GuardConfig.from_options(options)
        self.config = config
        self.sinks = SinkSet(config.sinks)
        self.events: deque[Event] = deque(maxlen=10_000)
        self._keys = MetricKeys(config.prefix)
        self._nonfinite = NonfiniteDetector()
        self._step = 0
        self._skipped_steps = 0
        self._nonfinite_steps = 0
        self._clipped_steps = 0
        self._debouncer = Debouncer()
        self._warnings = RateLimiter(config.repeat_every)
        self._binding: _Binding | None = None
        self._pending_state: dict[str, Any] | None = None
        self._sink_steps: dict[int, int] = {}
        self._pending_log: PendingLog | None = None
        self._last_stats: LoggedStats | None = None
        self._last_scalars: dict[str, float] = {}
        self._in_step = False
        self._depth_source = "registration"
        self._compiled = False
        self._last_layers: list[str] = []
        self._mirror = HostMirror(self._on_packet)

    # ------------------------------------------------------------------ configuration
    @property
    def clip(self) -> Any:
        return self.config.clip

    @property
    def on_nonfinite(self) -> str:
        return self.config.on_nonfinite

    @property
    def on_spike(self) -> str:
        return self.config.on_spike

    @property
    def spike(self) -> Any:
        return self.config.spike

    @property
    def activations(self) -> Any:
        return self.config.activations

    @property
    def detectors(self) -> list[Detector]:
        return self.config.detectors

    @property
    def prefix(self) -> str:
        return self.config.prefix

    @prefix.setter
    def prefix(self, value: str) -> None:
        if self._binding is not None:
            raise GradGuardError("set the prefix before attach()")
        self.config.prefix = value
        self._keys = MetricKeys(value)

    @property
    def log_every_n_steps(self) -> int:
        return self.config.log_every_n_steps

    @log_every_n_steps.setter
    def log_every_n_steps(self, value: int) -> None:
        from ._errors import check_positive_int

        self.config.log_every_n_steps = check_positive_int("log_every_n_steps", value)

    def _all_detectors(self) -> list[Detector]:
        found: list[Detector] = [self._nonfinite]
        if self.config.on_spike != "ignore":
            found.append(self.config.spike)
        found += self.config.detectors
        if self.config.activations is not None:
            found.append(self.config.activations)
        return found

    # ------------------------------------------------------------------ attach / detach
    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> GradGuard:
        """Watch ``model``/``optimizer``: optimizer step hooks, activation sampling."""
        self.bind(model, optimizer)
        binding = self._binding
        assert binding is not None
        binding.handles.append(binding.optimizer.register_step_pre_hook(self._pre_hook))
        binding.handles.append(binding.optimizer.register_step_post_hook(self._post_hook))
        return self

    def bind(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> GradGuard:
        """Everything ``attach`` does except the optimizer hooks: for adapters that call
        ``before_step`` and ``after_step`` themselves. Nothing is left behind if it fails."""
        if self._binding is not None:
            raise GradGuardError("this GradGuard is already attached; call detach() first")
        if not isinstance(model, nn.Module):
            raise ConfigurationError.bad_value("model", model, "expected a torch.nn.Module")
        self._compiled = compiled(model)
        model = unwrap_model(model)
        optimizer = unwrap_optimizer(optimizer)
        layout = discover_layers(model, optimizer)
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
            self._binding = self._build(model, optimizer, layout)
            _watched_optimizers.add(optimizer)
            if self._pending_state is not None:
                state, self._pending_state = self._pending_state, None
                self._apply_state(state)
            for detector in self._all_detectors():
                detector.on_step_end(self._step)
        except BaseException:
            binding, self._binding = self._binding, None
            if binding is not None:
                self._unbind_parts(binding)
            for part in claimed:
                part.release(self)
            _watched_optimizers.discard(optimizer)
            raise
        self._warn_about_blind_spots()
        return self

    def _build(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, layout: LayerLayout
    ) -> _Binding:
        """Bind every part to ``layout`` (at attach, and again when the layout changes)."""
        computer = GradNormComputer(layout, model)
        device = computer.device
        if self.config.update_ratio == "auto":
            # The global size (DTensor.numel()): every rank must decide alike, since the
            # update norms of sharded parameters are all-reduced on logging steps.
            numel = sum(p.numel() for p in layout.params)
            track_updates = numel <= AUTO_UPDATE_RATIO_MAX_ELEMENTS
        else:
            track_updates = bool(self.config.update_ratio)
        context = GuardContext(
            model=model,
            layout=layout,
            device=device,
            log_every_n_steps=self.config.log_every_n_steps,
            repeat_every=self.config.repeat_every,
            on_nonfinite=self.config.on_nonfinite,
            on_spike=self.config.on_spike,
            clip=self.config.clip,
            compiled=self._compiled,
        )
        if self.config.clip is not None:
            # First: a strategy may reject the layout (AGC's exclude).
            self.config.clip.bind(layout, device)
        for detector in self._all_detectors():
            detector.bind(context)
        depth = None
        if not layout.depth_known and not context.compiled:
            depth = DepthRecorder(model, layout)
        return _Binding(
            model=model,
            optimizer=optimizer,
            layout=layout,
            watched=WatchedSet(model, optimizer, layout),
            computer=computer,
            pipeline=StepPipeline(self.config, layout, computer, optimizer),
            context=context,
            device=device,
            rank_zero=is_rank_zero(),
            track_updates=track_updates,
            depth=depth,
            on_meta=device.type == "meta",
        )

    def _unbind_parts(self, binding: _Binding, *, hooks: bool = True) -> None:
        binding.pipeline.found_inf.restore()
        if hooks:
            for handle in binding.handles:
                handle.remove()
            binding.handles.clear()
        if binding.depth is not None:
            binding.depth.remove()
        for detector in self._all_detectors():
            if detector.context is not None:
                detector.unbind()

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
        self._unbind_parts(binding)
        for part in (self.config.clip, *self._all_detectors()):
            if part is not None:
                part.release(self)
        _watched_optimizers.discard(binding.optimizer)
        self._last_layers = list(binding.layout.names)
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

    # ------------------------------------------------------------------ what it watches
    @property
    def attached(self) -> bool:
        return self._binding is not None

    @property
    def layers(self) -> list[str]:
        """Watched layer names in depth order, input first (kept after ``detach``)."""
        if self._binding is not None:
            return list(self._binding.layout.names)
        return list(self._last_layers)

    @property
    def depth_source(self) -> str:
        """Where the depth order comes from: ``"forward"`` (the first training forward
        pass), ``"saved"`` (a loaded state) or ``"registration"`` (module order)."""
        return self._depth_source

    @property
    def step(self) -> int:
        """Optimizer steps seen so far (skipped ones included); the first step is step 0."""
        return self._step

    @property
    def skipped_steps(self) -> int:
        """Optimizer steps gradguard skipped so far (not those a GradScaler skipped)."""
        self._mirror.drain(block=True)
        return self._skipped_steps

    @property
    def nonfinite_steps(self) -> int:
        self._mirror.drain(block=True)
        return self._nonfinite_steps

    @property
    def clipped_steps(self) -> int:
        """Optimizer steps whose gradients the clip strategy scaled down."""
        self._mirror.drain(block=True)
        return self._clipped_steps

    def _warn_about_blind_spots(self) -> None:
        binding = self._binding
        if binding is None or not binding.rank_zero:
            return
        unowned = binding.watched.unowned
        if unowned:
            warnings.warn(
                f"the optimizer holds {unowned} parameter(s) that the model does not own: "
                "gradguard cannot watch them (they are in no norm, clip or NaN check). "
                "Attach to the model that owns every parameter the optimizer updates.",
                GradGuardWarning,
                stacklevel=4,
            )

    def blind_spots(self) -> list[str]:
        """What this guard cannot observe on its model, in plain words."""
        binding = self._binding
        if binding is None:
            return []
        spots = []
        model = binding.model
        if self._compiled:
            spots.append(
                "the model runs through torch.compile: activations are not sampled and the "
                "depth order is the modules' registration order"
            )
        fused_rnn = sorted({type(m).__name__ for m in model.modules() if isinstance(m, nn.RNNBase)})
        if fused_rnn and self.config.activations is not None:
            spots.append(f"{'/'.join(fused_rnn)} activations run inside fused kernels: not sampled")
        if binding.watched.unowned:
            spots.append(
                f"{binding.watched.unowned} optimizer parameter(s) outside the model: not watched"
            )
        return spots

    # ------------------------------------------------------------------ optimizer hooks
    def _pre_hook(
        self, optimizer: torch.optim.Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        closure, where = _find_closure(optimizer, args, kwargs)
        if closure is None:
            self.before_step()
            return None
        # step(closure): the pre-hook runs before the closure computes the gradients, so
        # gradguard runs right after the closure's first call (LBFGS calls it again later).
        called = False

        def guarded_closure() -> Any:
            nonlocal called
            loss = closure()
            if not called:
                called = True
                self.before_step()
            return loss

        new_args, new_kwargs = list(args), dict(kwargs)
        if isinstance(where, int):
            new_args[where] = guarded_closure
        else:
            new_kwargs["closure"] = guarded_closure
        return tuple(new_args), new_kwargs

    def _post_hook(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.after_step()

    # ------------------------------------------------------------------ the adapter API
    def before_step(
        self,
        *,
        found_inf: torch.Tensor | None = None,
        sink_step: int | None = None,
        apply_skip: bool = True,
    ) -> StepDecision:
        """Measure, detect, clip and maybe skip, right before the optimizer updates.

        ``found_inf``: the ``GradScaler``'s overflow flag for this step (a device tensor),
        for adapters whose framework unscales AMP gradients before calling this; an
        overflow step belongs to the scaler and is not reported as non-finite.
        ``sink_step``: the step the sinks and Events use for this optimizer step (under
        Lightning, ``trainer.global_step``); the guard's own step by default.
        ``apply_skip=False``: leave a sync-free skip to the caller (it hands
        ``decision.skip_flag`` to the optimizer itself, e.g. through the scaler).
        """
        binding = self._binding
        if binding is None:
            raise GradGuardError("GradGuard is not attached: call attach(model, optimizer) first")
        if self._in_step:
            # The last step never finished (optimizer.step raised, or was interrupted):
            # restore found_inf first, or a stale skip flag would skip every later step.
            self.after_step()
        self._mirror.drain(block=False)
        binding = self._refresh(binding)
        step = self._step
        self._sink_steps[step] = step if sink_step is None else int(sink_step)
        self._sink_steps.pop(step - _STEP_MAP_SIZE, None)
        try:
            out = binding.pipeline.run(step, found_inf=found_inf, apply_skip=apply_skip)
        except GradientAlarmError as alarm:
            self._step = step + 1
            self._nonfinite_steps += 1
            finding = Finding("nonfinite", alarm.layers, math.nan, str(alarm), "", "error")
            self._announce(finding, step, warn=False)
            raise
        note = (out.spec, out.decision.skip, out.norms.present_host, tuple(binding.layout.names))
        self._mirror.push(step, out.packet, note)
        if step % self.config.log_every_n_steps == 0:
            snapshot = snapshot_params(binding.layout) if binding.track_updates else None
            self._pending_log = PendingLog(
                step, self._sink_steps[step], out.norms, out.clip, snapshot
            )
        self._step = step + 1
        self._in_step = True
        return out.decision

    def after_step(self) -> None:
        """Finish the step: restore optimizer attributes, log, schedule activation windows."""
        if not self._in_step:
            return
        self._in_step = False
        binding = self._binding
        if binding is None:
            return
        binding.pipeline.found_inf.restore()
        if self._pending_log is not None:
            pending, self._pending_log = self._pending_log, None
            self._publish(binding, pending)
        for detector in self._all_detectors():
            detector.on_step_end(self._step)

    def _relayout(self, binding: _Binding) -> None:
        """The layout was reordered in place: rebuild what indexes layers by position."""
        binding.computer = GradNormComputer(binding.layout, binding.model)
        binding.pipeline = StepPipeline(
            self.config, binding.layout, binding.computer, binding.optimizer
        )
        if self.config.clip is not None:
            self.config.clip.bind(binding.layout, binding.device)

    def _refresh(self, binding: _Binding) -> _Binding:
        """Follow what changed since the last step; a few attribute reads when nothing did.

        The first forward's depth order reorders the layout in place; layers unfrozen or
        added (``WatchedSet``) and parameters moved to another device (``meta`` ->
        ``to_empty``) rebuild the binding with the state of every part carried over.
        """
        if binding.depth is not None:
            order = binding.depth.finish(binding.layout)
            if order is not None:
                binding.depth = None
                self._depth_source = "forward"
                binding.layout.depth_known = True
                if order != binding.layout.names:
                    self._mirror.drain(block=True)  # rare: read the old layout's packets first
                    binding.layout.reorder(order)
                    self._relayout(binding)
        if binding.on_meta:
            _check_materialised(binding)
        moved = local_tensor(binding.layout.params[0]).device != binding.device
        changed = binding.watched.changed()
        if not (moved or changed):
            return binding
        self._mirror.drain(block=True)  # rare: read the old layout's packets first
        layout = discover_layers(binding.model, binding.optimizer)
        if changed:
            log.info(
                "gradguard: the optimizer's trainable parameters changed; now watching %d layers",
                layout.num_layers,
            )
        layout.reorder(merge_depth_order(binding.layout.names, layout.names))
        layout.depth_known = binding.layout.depth_known
        self._unbind_parts(binding, hooks=False)
        rebuilt = self._build(binding.model, binding.optimizer, layout)
        rebuilt.handles = binding.handles
        self._binding = rebuilt
        return rebuilt

    # ------------------------------------------------------------------ the host side
    def _on_packet(self, step: int, values: list[float], note: Any) -> None:
        spec, host_skip, present, layers = note
        assert isinstance(spec, PacketSpec)
        total, layer_norms, extras = spec.unpack(values)
        overflow = extras.get(SCALER_OVERFLOW, 0.0) > 0
        nonfinite = not math.isfinite(total) and not overflow
        skipped = host_skip if host_skip is not None else extras.get(SKIP, 0.0) > 0.5
        self._skipped_steps += bool(skipped)
        self._nonfinite_steps += nonfinite
        coef = extras.get(CLIP_COEF)
        self._clipped_steps += coef is not None and coef < 1.0
        stats = StepStats(
            step, tuple(layers), total, tuple(layer_norms), present, nonfinite, skipped, extras
        )
        for detector in self._all_detectors():
            for finding in detector.on_step(stats):
                self._announce(finding, step)

    def _publish(self, binding: _Binding, pending: PendingLog) -> None:
        self._mirror.drain(block=True)
        host: dict[str, float] = {
            SKIPPED_STEPS: float(self._skipped_steps),
            NONFINITE_STEPS: float(self._nonfinite_steps),
        }
        if self.config.clip is not None:
            host[CLIPPED_STEPS] = float(self._clipped_steps)
        detectors = self._all_detectors()
        stats = collect(
            pending, binding.layout, binding.computer, [d.metrics() for d in detectors], host
        )
        self._last_stats = stats
        metrics = self._keys.flatten(stats)
        self._last_scalars = dict(metrics)
        if binding.rank_zero:
            self.sinks.log_scalars(metrics, stats.sink_step)
        for detector in detectors:
            for finding in detector.on_log(stats):
                self._announce(finding, pending.step)

    def _announce(self, finding: Finding, step: int, *, warn: bool = True) -> None:
        event = self._debouncer.admit(finding, step, self._sink_steps.get(step, step))
        if event is None:
            return
        self.events.append(event)
        binding = self._binding
        rank_zero = binding.rank_zero if binding is not None else is_rank_zero()
        if not rank_zero:
            return
        self.sinks.log_event(event)
        if warn and self.config.warn and self._warnings.admit(event.kind, event.step) is not None:
            warnings.warn(str(event), GradGuardWarning, stacklevel=2)

    # ------------------------------------------------------------------ reporting
    @property
    def last_scalars(self) -> dict[str, float]:
        """The metrics of the latest logging step, by key (host values)."""
        return dict(self._last_scalars)

    @property
    def last_stats(self) -> LoggedStats | None:
        """The latest logging step's statistics, typed (per layer in depth order)."""
        return self._last_stats

    def active_conditions(self) -> dict[str, int]:
        """Conditions still present: Event kind -> the step it was first reported."""
        self._mirror.drain(block=True)
        return self._debouncer.active(self._step - 1)

    def occurrences(self) -> dict[str, int]:
        """How often each Event kind's condition was seen (reported or folded)."""
        self._mirror.drain(block=True)
        return self._debouncer.seen()

    def report(self) -> str:
        """A diagnosis a person can act on: verdict, gradient flow per layer, Events, remedies."""
        from .report import build_report

        self._mirror.drain(block=True)
        return build_report(self)

    def summary(self) -> dict[str, Any]:
        """The data behind ``report()``."""
        from .report import build_summary

        self._mirror.drain(block=True)
        return build_summary(self)

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


def _check_materialised(binding: _Binding) -> None:
    """Parameters watched on ``meta`` must have been materialised in place."""
    if any(local_tensor(p).device.type == "meta" for p in binding.layout.params):
        raise GradGuardError(
            "the optimizer steps parameters that are still on the 'meta' device: the model "
            "was materialised (to_empty()) after the optimizer was built, which makes new "
            "parameter objects. Build the optimizer after to_empty() (and attach then), or "
            "call torch.__future__.set_swap_module_params_on_conversion(True) before it."
        )
    binding.on_meta = False


def _find_closure(
    optimizer: torch.optim.Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[Callable[[], Any] | None, int | str]:
    if kwargs.get("closure") is not None:
        return kwargs["closure"], "kwargs"
    # The pre-hook's positional args may start with the optimizer itself.
    start = 1 if args and args[0] is optimizer else 0
    if len(args) > start and callable(args[start]):
        return args[start], start
    return None, -1


def attach(
    model: nn.Module, optimizer: torch.optim.Optimizer, **options: Unpack[GuardOptions]
) -> GradGuard:
    """``GradGuard(**options).attach(model, optimizer)``: watch a plain PyTorch loop.

    Takes the keyword arguments of ``GradGuard`` (see there).
    """
    return GradGuard(**options).attach(model, optimizer)
