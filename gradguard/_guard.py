"""GradGuard: the per-step pipeline, the hooks, and the state that survives a resume."""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ._advice import nonfinite_text, spike_text
from ._clipping import ClipContext, ClipResult, ClipStrategy, resolve_clip
from ._errors import (
    ConfigurationError,
    GradGuardError,
    GradGuardWarning,
    GradientAlarmError,
    check_choice,
    check_positive_int,
)
from ._events import Event, EventThrottle
from ._hostmirror import HostMirror
from ._layers import LayerLayout, discover_layers
from ._protocols import Detector, HostView, Monitor
from ._sinks import Sink, SinkSet
from ._spike import SpikeDetector
from ._stats import GradNormComputer, GradNorms
from ._stats import local_tensor as _local

__all__ = ["GradGuard", "attach"]

NonfinitePolicy = Literal["warn", "skip", "raise"]
SpikePolicy = Literal["ignore", "warn", "skip"]

STATE_VERSION = 1
# Update ratios need a copy of the parameters on logging steps; "auto" takes it only for
# models up to this many trainable elements (128M: 512 MB in fp32).
AUTO_UPDATE_RATIO_MAX_ELEMENTS = 2**27
# Header of the per-step flag packet, followed by the per-layer norms.
_TOTAL, _ZSCORE, _NONFINITE, _SPIKE, _SKIPPED, _RUNNING = range(6)
_HEADER = 6

_watched_optimizers: weakref.WeakSet[torch.optim.Optimizer] = weakref.WeakSet()


def _rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return int(torch.distributed.get_rank())
    return int(os.environ.get("RANK", "0") or 0)


@dataclass
class _LogStep:
    """What the pre-step part of a logging step hands to its post-step part."""

    step: int
    norms: GradNorms
    clip: ClipResult | None
    zscore: torch.Tensor
    snapshot: list[torch.Tensor] | None


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
        update_ratio: log ``||update|| / ||param||`` per layer on logging steps. It copies the
            parameters for that step; ``"auto"`` does so for models up to 128M elements.
        prefix: the first part of every metric key.
        warn: emit ``GradGuardWarning`` for Events (rank zero only, rate-limited per kind).
    """

    def __init__(
        self,
        *,
        clip: float | ClipStrategy | None = None,
        on_nonfinite: NonfinitePolicy = "warn",
        on_spike: SpikePolicy = "warn",
        spike: SpikeDetector | None = None,
        activations: bool | Monitor = True,
        log_every_n_steps: int = 50,
        sinks: Iterable[Sink] = (),
        detectors: Sequence[Detector] | None = None,
        update_ratio: bool | Literal["auto"] = "auto",
        prefix: str = "gradguard",
        warn: bool = True,
        repeat_every: int = 100,
    ) -> None:
        self.clip = resolve_clip(clip)
        check_choice("on_nonfinite", on_nonfinite, ("warn", "skip", "raise"))
        check_choice("on_spike", on_spike, ("ignore", "warn", "skip"))
        self.on_nonfinite: NonfinitePolicy = on_nonfinite
        self.on_spike: SpikePolicy = on_spike
        if spike is not None and not isinstance(spike, SpikeDetector):
            raise ConfigurationError.bad_value(
                "spike", spike, "expected a gg.SpikeDetector or None"
            )
        self.spike = spike if spike is not None else SpikeDetector()
        self.activations = _resolve_activations(activations)
        self.log_every_n_steps = check_positive_int("log_every_n_steps", log_every_n_steps)
        sink_list = list(sinks)
        for sink in sink_list:
            if not isinstance(sink, Sink):
                raise ConfigurationError.bad_value(
                    "sinks", sink, "each sink needs log_scalars, log_event, flush and close"
                )
        self.sinks = SinkSet(sink_list)
        self.detectors: list[Detector] = (
            list(detectors) if detectors is not None else _default_detectors()
        )
        if update_ratio not in (True, False, "auto"):
            raise ConfigurationError.not_one_of("update_ratio", update_ratio, (True, False, "auto"))
        self.update_ratio = update_ratio
        if not isinstance(prefix, str) or not prefix or prefix.endswith("/"):
            raise ConfigurationError.bad_value(
                "prefix", prefix, "expected a non-empty str not ending in '/'"
            )
        self.prefix = prefix
        self.warn = bool(warn)
        self.repeat_every = check_positive_int("repeat_every", repeat_every)

        self.events: deque[Event] = deque(maxlen=10_000)
        self._step = 0
        self._skipped_steps = 0
        self._nonfinite_steps = 0
        self._spike_steps = 0
        self._throttle = EventThrottle(repeat_every=self.repeat_every)
        self._warned_at: dict[str, int] = {}
        self._model: nn.Module | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._layout: LayerLayout | None = None
        self._computer: GradNormComputer | None = None
        self._device = torch.device("cpu")
        self._handles: list[RemovableHandle] = []
        self._order_handles: list[RemovableHandle] = []
        self._arrival: list[str] = []
        self._flags = HostMirror(self._handle_flags)
        self._log_step: _LogStep | None = None
        self._found_inf_saved: tuple[bool, Any] | None = None
        self._clipped_steps: torch.Tensor | None = None
        self._pending_state: dict[str, Any] | None = None
        self._track_updates = False
        self._is_rank_zero = True
        self._last_scalars: dict[str, float] = {}
        self.sink_step: Callable[[int], int] = _same_step  # a function, not a lambda: picklable
        self._in_step = False

    # ------------------------------------------------------------------ attach / detach
    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> GradGuard:
        """Register the optimizer hooks (and activation sampling) on ``model``/``optimizer``."""
        self._bind(model, optimizer)
        self._handles.append(optimizer.register_step_pre_hook(self._pre_hook))
        self._handles.append(optimizer.register_step_post_hook(self._post_hook))
        return self

    def _bind(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Everything ``attach`` does except the optimizer hooks (adapters call the steps)."""
        if self._optimizer is not None:
            raise GradGuardError("this GradGuard is already attached; call detach() first")
        layout = discover_layers(model, optimizer)
        if optimizer in _watched_optimizers:
            raise ConfigurationError(
                f"optimizer={type(optimizer).__name__} is already watched by another GradGuard: "
                "call detach() on that guard first (one guard per optimizer)"
            )
        if self.clip is not None:
            # Before anything is registered: a strategy may reject the layout (AGC's exclude).
            self.clip.bind(layout, layout.params[0].device)
        _watched_optimizers.add(optimizer)
        self._model, self._optimizer, self._layout = model, optimizer, layout
        try:
            self._bind_rest(model, layout)
        except BaseException:
            # Leave nothing half-attached: the optimizer may be watched again after a fix.
            for handle in self._handles + self._order_handles:
                handle.remove()
            self._handles.clear()
            self._order_handles.clear()
            _watched_optimizers.discard(optimizer)
            self._model = self._optimizer = None
            raise

    def _bind_rest(self, model: nn.Module, layout: LayerLayout) -> None:
        self._device = layout.params[0].device
        self._computer = GradNormComputer(layout, model)
        self._is_rank_zero = _rank() == 0
        self.spike.bind(self._device)
        for detector in self.detectors:
            # Optional: a detector may learn layer kinds/shapes from the model (no sync).
            bind = getattr(detector, "bind", None)
            if callable(bind):
                bind(model, layout)
        if self._clipped_steps is None:
            self._clipped_steps = torch.zeros((), device=self._device)
        else:  # attached again: keep counting
            self._clipped_steps = self._clipped_steps.to(self._device)
        if self.update_ratio == "auto":
            # The global size (DTensor.numel()): every rank must decide alike, since the
            # update norms of sharded parameters are all-reduced on logging steps.
            numel = sum(p.numel() for p in layout.params)
            self._track_updates = numel <= AUTO_UPDATE_RATIO_MAX_ELEMENTS
        else:
            self._track_updates = bool(self.update_ratio)
        if self._pending_state is not None:
            state, self._pending_state = self._pending_state, None
            self._apply_state(state)
        if not layout.depth_from_backward:
            self._record_backward_order()
        if self.activations is not None:
            self.activations.bind(model, layout)
            self.activations.on_step_end(self._step)

    def detach(self) -> None:
        """Remove every hook gradguard added and flush the sinks. Safe to call twice.

        The guard keeps its state and sinks: ``attach`` again continues where it stopped.
        ``close()`` (or leaving a ``with`` block) also closes the sinks.
        """
        if self._optimizer is None:
            return
        self._flags.drain(block=True)
        for handle in self._handles + self._order_handles:
            handle.remove()
        self._handles.clear()
        self._order_handles.clear()
        if self.activations is not None:
            self.activations.unbind()
        _watched_optimizers.discard(self._optimizer)
        self._optimizer = None
        self._model = None
        if self._is_rank_zero:
            self.sinks.flush()

    def close(self) -> None:
        """``detach()``, then close the sinks (a closed sink writes no more)."""
        self.detach()
        if self._is_rank_zero:
            self.sinks.close()

    def __enter__(self) -> GradGuard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def attached(self) -> bool:
        return self._optimizer is not None

    @property
    def layers(self) -> list[str]:
        """Watched layer names in depth order, input first."""
        return list(self._layout.names) if self._layout is not None else []

    @property
    def step(self) -> int:
        """Optimizer steps seen so far (skipped ones included); the first step is step 0."""
        return self._step

    @property
    def skipped_steps(self) -> int:
        """Optimizer steps gradguard skipped so far (not those a GradScaler skipped)."""
        self._flags.drain(block=True)
        return self._skipped_steps

    @property
    def nonfinite_steps(self) -> int:
        self._flags.drain(block=True)
        return self._nonfinite_steps

    # ------------------------------------------------------------------ depth order
    def _record_backward_order(self) -> None:
        """Learn depth from the first backward: the layer nearest the loss gets grads first."""
        layout = self._layout
        assert layout is not None

        def make_hook(name: str) -> Callable[[torch.Tensor], None]:
            def hook(_: torch.Tensor) -> None:
                if name not in self._seen_arrival:
                    self._seen_arrival.add(name)
                    self._arrival.append(name)

            return hook

        self._seen_arrival: set[str] = set()
        for param, layer_index in zip(layout.params, layout.param_layer):
            if hasattr(param, "register_post_accumulate_grad_hook"):
                hook = make_hook(layout.names[layer_index])
                handle = param.register_post_accumulate_grad_hook(hook)  # type: ignore[no-untyped-call]
                self._order_handles.append(handle)

    def _finish_backward_order(self) -> None:
        layout = self._layout
        assert layout is not None and self._computer is not None
        for handle in self._order_handles:
            handle.remove()
        self._order_handles.clear()
        if self._arrival:
            order = list(reversed(self._arrival))
            order += [name for name in layout.names if name not in self._seen_arrival]
            if order != layout.names:
                layout.reorder(order)
                self._computer = GradNormComputer(layout, self._model)
            layout.depth_from_backward = True
        self._arrival = []

    # ------------------------------------------------------------------ optimizer hooks
    def _pre_hook(
        self, optimizer: torch.optim.Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        closure, where = _find_closure(optimizer, args, kwargs)
        if closure is None:
            self.before_optimizer_step()
            return None
        # step(closure): the pre-hook runs before the closure computes the gradients, so
        # gradguard runs right after the closure's first call (LBFGS calls it again later).
        called = False

        def guarded_closure() -> Any:
            nonlocal called
            loss = closure()
            if not called:
                called = True
                self.before_optimizer_step()
            return loss

        new_args, new_kwargs = list(args), dict(kwargs)
        if isinstance(where, int):
            new_args[where] = guarded_closure
        else:
            new_kwargs["closure"] = guarded_closure
        return tuple(new_args), new_kwargs

    def _post_hook(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.after_optimizer_step()

    # ------------------------------------------------------------------ the pipeline
    def before_optimizer_step(self, *, found_inf: torch.Tensor | None = None) -> bool | None:
        """Measure, detect, clip and maybe skip, right before the optimizer updates.

        Returns True/False when the skip decision was read on the host this step, None when
        it stayed on the device (observe-only, or a fused optimizer).

        ``found_inf``: for adapters whose framework unscales AMP gradients before calling
        this (Lightning): the GradScaler's overflow flag for this step, a device tensor. An
        overflow step belongs to the scaler (it skips it): not reported as non-finite.
        """
        optimizer, layout, computer = self._optimizer, self._layout, self._computer
        if optimizer is None or layout is None or computer is None:
            raise GradGuardError("GradGuard is not attached: call attach(model, optimizer) first")
        if self._in_step:
            # The last step never finished (optimizer.step raised): restore found_inf first,
            # or a stale skip flag would be taken for the scaler's and skip every later step.
            self.after_optimizer_step()
        self._flags.drain(block=False)
        if self._order_handles or self._arrival:
            self._finish_backward_order()
            computer = self._computer
            assert computer is not None
        step = self._step
        logging_step = step % self.log_every_n_steps == 0
        fused = bool(getattr(optimizer, "_step_supports_amp_scaling", False))
        grad_scale = getattr(optimizer, "grad_scale", None) if fused else None
        scaler_found_inf = getattr(optimizer, "found_inf", None) if fused else None
        if found_inf is not None:
            scaler_found_inf = found_inf

        norms = computer.compute(grad_scale if isinstance(grad_scale, torch.Tensor) else None)
        nonfinite = ~torch.isfinite(norms.total)
        if isinstance(scaler_found_inf, torch.Tensor):
            # A GradScaler already handles its own overflow steps: not gradguard's business.
            nonfinite = nonfinite & (scaler_found_inf.to(self._device) == 0)
        if self.on_spike != "ignore":
            # The running mean the z-score is measured against, for the message (1 kernel).
            running = self.spike.running_norm()
            zscore, spike = self.spike.update(norms.total, warm=step >= self.spike.warmup_steps)
        else:
            running = zscore = torch.zeros((), device=self._device)
            spike = torch.zeros((), dtype=torch.bool, device=self._device)

        clip_result = None
        if self.clip is not None:
            ctx = ClipContext(
                norms=norms,
                layout=layout,
                device=self._device,
                finite=~nonfinite,
                grad_scale=grad_scale if isinstance(grad_scale, torch.Tensor) else None,
            )
            clip_result = self.clip.clip_(ctx)
            assert self._clipped_steps is not None
            self._clipped_steps = self._clipped_steps + clip_result.clipped

        skip_flag = torch.zeros((), dtype=torch.bool, device=self._device)
        if self.on_nonfinite == "skip":
            skip_flag = skip_flag | nonfinite
        if self.on_spike == "skip":
            skip_flag = skip_flag | spike
        decided: bool | None = None
        if self.on_nonfinite == "raise" or (
            not fused and (self.on_nonfinite == "skip" or self.on_spike == "skip")
        ):
            raise_flag = nonfinite if self.on_nonfinite == "raise" else torch.zeros_like(nonfinite)
            # Deliberate host sync: ONE combined flag per step decides skip/raise now.
            code = int((raise_flag.int() * 2 + skip_flag.int()).item())
            if code & 2:
                self._raise_nonfinite(step, norms)
            decided = bool(code & 1)
            if decided:
                optimizer.zero_grad(set_to_none=True)
        elif fused and (self.on_nonfinite == "skip" or self.on_spike == "skip"):
            # Sync-free skip: fused kernels leave params and state untouched when found_inf=1.
            had = "found_inf" in optimizer.__dict__
            previous = optimizer.__dict__.get("found_inf")
            self._found_inf_saved = (had, previous)
            flag = skip_flag.float()
            if isinstance(previous, torch.Tensor):
                flag = torch.maximum(previous.to(flag.device, flag.dtype), flag).to(previous.device)
            optimizer.found_inf = flag  # type: ignore[attr-defined]

        packet = torch.cat(
            [
                torch.stack(
                    [
                        norms.total,
                        zscore.float(),
                        nonfinite.float(),
                        spike.float(),
                        skip_flag.float(),
                        running.float(),
                    ]
                ),
                norms.layer,
            ]
        )
        self._flags.push(step, packet)

        if logging_step:
            snapshot = None
            if self._track_updates:
                snapshot = list(
                    torch._foreach_mul([_local(p.detach()) for p in layout.params], 1.0)
                )
            self._log_step = _LogStep(step, norms, clip_result, zscore, snapshot)
        self._step = step + 1
        self._in_step = True
        return decided

    def after_optimizer_step(self) -> None:
        """Finish the step: restore optimizer attributes, log, sample activations."""
        if not self._in_step:
            return
        self._in_step = False
        optimizer = self._optimizer
        if self._found_inf_saved is not None and optimizer is not None:
            had, previous = self._found_inf_saved
            self._found_inf_saved = None
            if had:
                optimizer.found_inf = previous  # type: ignore[attr-defined]
            else:
                optimizer.__dict__.pop("found_inf", None)
        if self._log_step is not None:
            log_step, self._log_step = self._log_step, None
            self._publish(log_step)
        if self.activations is not None:
            self.activations.on_step_end(self._step)

    # ------------------------------------------------------------------ flags (sync-free)
    def _handle_flags(self, step: int, values: list[float]) -> None:
        layout = self._layout
        assert layout is not None
        nonfinite = values[_NONFINITE] > 0.5
        spike = values[_SPIKE] > 0.5
        skipped = values[_SKIPPED] > 0.5
        if skipped:
            self._skipped_steps += 1
        if nonfinite:
            self._nonfinite_steps += 1
            layer_norms = values[_HEADER:]
            bad = [
                layout.names[i]
                for i in reversed(range(layout.num_layers))
                if not math.isfinite(layer_norms[i])
            ]
            folded = self._throttle.admit("nonfinite", step)
            if folded is not None:
                message, advice = nonfinite_text(bad, layout.num_layers, self.on_nonfinite, skipped)
                if folded > 1:
                    message += f" ({folded} steps with NaN/Inf since the last report.)"
                self._emit(
                    Event(
                        kind="nonfinite",
                        step=step,
                        layers=tuple(bad),
                        value=values[_TOTAL],
                        severity="error",
                        message=message,
                        advice=advice,
                        details={"skipped": skipped, "occurrences": folded},
                    )
                )
        elif spike:
            self._spike_steps += 1
            folded = self._throttle.admit("spike", step)
            if folded is not None and self.on_spike != "ignore":
                running = values[_RUNNING]
                message, advice = spike_text(values[_TOTAL], running, values[_ZSCORE], skipped)
                if folded > 1:
                    message += f" ({folded} spikes since the last report.)"
                layer_norms = values[_HEADER:]
                worst = sorted(
                    range(layout.num_layers), key=lambda i: layer_norms[i], reverse=True
                )[:3]
                self._emit(
                    Event(
                        kind="spike",
                        step=step,
                        layers=tuple(layout.names[i] for i in worst),
                        value=values[_ZSCORE],
                        severity="warning",
                        message=message,
                        advice=advice,
                        details={"skipped": skipped, "grad_norm": values[_TOTAL]},
                    )
                )

    def _raise_nonfinite(self, step: int, norms: GradNorms) -> None:
        layout = self._layout
        assert layout is not None
        # Deliberate host sync: we are about to raise, so name the layers.
        layer_norms = norms.layer.tolist()
        bad = [
            layout.names[i]
            for i in reversed(range(layout.num_layers))
            if not math.isfinite(layer_norms[i])
        ]
        message, advice = nonfinite_text(bad, layout.num_layers, "raise", skipped=False)
        message = message.replace(
            "the optimizer step went ahead with it.", "the step was not taken."
        )
        self._step = step + 1
        self._nonfinite_steps += 1
        event = Event("nonfinite", step, tuple(bad), float("nan"), "error", message, advice)
        self._emit(event, warn=False)
        raise GradientAlarmError(
            f"step {step}: {message} Try: {advice}", step=step, layers=tuple(bad)
        )

    # ------------------------------------------------------------------ logging steps
    def _publish(self, log: _LogStep) -> None:
        layout = self._layout
        assert layout is not None
        p = self.prefix
        keys: list[str] = []
        pieces: list[torch.Tensor] = []

        def add(names: list[str], tensor: torch.Tensor) -> None:
            keys.extend(names)
            pieces.append(tensor.reshape(-1).to(self._device, torch.float32))

        add([f"{p}/grad_norm/{n}" for n in layout.names], log.norms.layer)
        add([f"{p}/grad_norm_total"], log.norms.total)
        if log.clip is not None:
            assert self._clipped_steps is not None
            add(
                [f"{p}/clip/threshold", f"{p}/clip/coef", f"{p}/clip/clipped_steps"],
                torch.stack(
                    [log.clip.threshold.float(), log.clip.coef.float(), self._clipped_steps.float()]
                ),
            )
        if self.on_spike != "ignore":
            add([f"{p}/spike/zscore"], log.zscore)
        param_tensors = [_local(q.detach()) for q in layout.params]
        computer = self._computer
        assert computer is not None
        # Sharded parameters (FSDP, DTensor) are summed across ranks: one collective each.
        param_norm = computer.layer_norms(param_tensors)
        add([f"{p}/param_norm/{n}" for n in layout.names], param_norm)
        if log.snapshot is not None:
            deltas = list(torch._foreach_sub(param_tensors, log.snapshot))
            update = computer.layer_norms(deltas)
            ratio = update / param_norm.clamp_min(1e-12)
            add([f"{p}/update_ratio/{n}" for n in layout.names], ratio)
        if self.activations is not None:
            for suffix, tensor in self.activations.metrics().items():
                flat = tensor.reshape(-1)
                if flat.numel() == 1:
                    add([f"{p}/{suffix}"], flat)
        # Layers with a gradient this step on any rank (FSDP1 ranks hold different layers):
        # the mask rides in the same copy, after the keyed values.
        pieces.append(log.norms.present.reshape(-1).to(self._device, torch.float32))
        # Deliberate host sync: the ONE bulk device->host copy of a logging step.
        values = torch.cat(pieces).tolist()
        present = [flag > 0.5 for flag in values[len(keys) :]]
        self._flags.drain(block=True)
        scalars = dict(zip(keys, values))
        scalars[f"{p}/skipped_steps"] = float(self._skipped_steps)
        scalars[f"{p}/nonfinite_steps"] = float(self._nonfinite_steps)
        for i, name in enumerate(layout.names):
            if not present[i]:
                scalars.pop(f"{p}/grad_norm/{name}", None)
                scalars.pop(f"{p}/update_ratio/{name}", None)
        view = HostView(
            step=log.step,
            layers=list(layout.names),
            grad_norm=[values[i] for i in range(layout.num_layers)],
            present=present,
            total=scalars[f"{p}/grad_norm_total"],
            param_norm=[scalars[f"{p}/param_norm/{n}"] for n in layout.names],
            update_ratio=(
                [scalars.get(f"{p}/update_ratio/{n}", 0.0) for n in layout.names]
                if log.snapshot is not None
                else None
            ),
            scalars=scalars,
            prefix=p,
        )
        self._last_scalars = scalars
        if self._is_rank_zero:
            self.sinks.log_scalars(scalars, self.sink_step(log.step))
        found: list[Event] = []
        for detector in self.detectors:
            found.extend(detector.check(view))
        if self.activations is not None:
            found.extend(self.activations.check(view))
        for event in found:
            self._emit(event)

    # ------------------------------------------------------------------ events
    def _emit(self, event: Event, *, warn: bool = True) -> None:
        # Events carry the step the sinks use (Lightning: trainer.global_step), so an
        # Event's text lines up with the charts; detectors work in guard steps.
        sink_step = self.sink_step(event.step)
        if sink_step != event.step:
            event = dataclasses.replace(event, step=sink_step)
        self.events.append(event)
        if not self._is_rank_zero:
            return
        self.sinks.log_event(event)
        if warn and self.warn:
            last = self._warned_at.get(event.kind)
            if last is None or event.step - last >= self.repeat_every or event.step < last:
                self._warned_at[event.kind] = event.step
                warnings.warn(str(event), GradGuardWarning, stacklevel=2)

    # ------------------------------------------------------------------ reporting
    @property
    def last_scalars(self) -> dict[str, float]:
        """The scalars of the latest logging step (host values)."""
        return dict(self._last_scalars)

    def report(self) -> str:
        """A diagnosis a person can act on: verdict, gradient flow per layer, Events, remedies."""
        self._flags.drain(block=True)
        from ._diagnosis import build_report

        return build_report(self)

    def summary(self) -> dict[str, Any]:
        """The data behind ``report()``."""
        self._flags.drain(block=True)
        from ._diagnosis import build_summary

        return build_summary(self)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Everything a resume needs: tensors, numbers, strings, lists and dicts only."""
        self._flags.drain(block=True)
        state: dict[str, Any] = {
            "version": STATE_VERSION,
            "step": self._step,
            "skipped_steps": self._skipped_steps,
            "nonfinite_steps": self._nonfinite_steps,
            "spike_steps": self._spike_steps,
            "spike": self.spike.state_dict(),
            "throttle": self._throttle.state_dict(),
            "warned_at": dict(self._warned_at),
            "layer_order": list(self._layout.names) if self._layout is not None else [],
            "clip": self.clip.state_dict() if self.clip is not None else {},
            "clip_type": type(self.clip).__name__ if self.clip is not None else "",
            "clipped_steps": (
                self._clipped_steps.detach().cpu() if self._clipped_steps is not None else 0.0
            ),
            "activations": self.activations.state_dict() if self.activations is not None else {},
            "detectors": [d.state_dict() for d in self.detectors],
        }
        if self._pending_state is not None and self._layout is None:
            return dict(self._pending_state)
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a ``state_dict``; before ``attach`` it is kept and applied at attach."""
        if not isinstance(state, Mapping) or "version" not in state:
            raise ConfigurationError.bad_value(
                "state", type(state).__name__, "expected a GradGuard state_dict"
            )
        if int(state["version"]) > STATE_VERSION:
            raise ConfigurationError(
                f"state version {state['version']} is newer than this gradguard understands "
                f"({STATE_VERSION}); upgrade gradguard"
            )
        if self._layout is None:
            self._pending_state = dict(state)
            self._step = int(state["step"])
            return
        self._apply_state(dict(state))

    def _apply_state(self, state: dict[str, Any]) -> None:
        layout = self._layout
        assert layout is not None
        self._flags.drain(block=True)
        order = [str(n) for n in state.get("layer_order", [])]
        if order and sorted(order) == sorted(layout.names):
            for handle in self._order_handles:
                handle.remove()
            self._order_handles.clear()
            self._arrival = []
            layout.reorder(order)
            layout.depth_from_backward = True
            self._computer = GradNormComputer(layout, self._model)
        elif order:
            warnings.warn(
                "the GradGuard state was saved for other layers; per-layer state starts fresh",
                GradGuardWarning,
                stacklevel=3,
            )
        self._step = int(state["step"])
        self._skipped_steps = int(state.get("skipped_steps", 0))
        self._nonfinite_steps = int(state.get("nonfinite_steps", 0))
        self._spike_steps = int(state.get("spike_steps", 0))
        self.spike.load_state_dict(state["spike"])
        self._throttle.load_state_dict(state.get("throttle", {}))
        self._warned_at = {str(k): int(v) for k, v in state.get("warned_at", {}).items()}
        saved_type = str(state.get("clip_type", ""))
        if self.clip is not None and state.get("clip"):
            if saved_type and saved_type != type(self.clip).__name__:
                warnings.warn(
                    f"the GradGuard state was saved with clip={saved_type}, this guard clips with "
                    f"{type(self.clip).__name__}: its clip state starts fresh",
                    GradGuardWarning,
                    stacklevel=3,
                )
            else:
                self.clip.load_state_dict(state["clip"])
        self._clipped_steps = torch.as_tensor(
            state.get("clipped_steps", 0.0), dtype=torch.float32
        ).to(self._device)
        if self.activations is not None and state.get("activations"):
            self.activations.load_state_dict(state["activations"])
        for detector, detector_state in zip(self.detectors, state.get("detectors", [])):
            detector.load_state_dict(detector_state)

    def __repr__(self) -> str:
        where = f"attached, step={self._step}" if self.attached else "detached"
        return (
            f"GradGuard(clip={self.clip!r}, on_nonfinite={self.on_nonfinite!r}, "
            f"on_spike={self.on_spike!r}, log_every_n_steps={self.log_every_n_steps}, {where})"
        )


def _same_step(step: int) -> int:
    return step


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


def _resolve_activations(activations: object) -> Monitor | None:
    from ._activations import ActivationMonitor

    if activations is True:
        return ActivationMonitor()
    if activations is False or activations is None:
        return None
    if isinstance(activations, ActivationMonitor):
        return activations
    raise ConfigurationError.bad_value(
        "activations", activations, "expected True, False or a gg.ActivationMonitor"
    )


def _default_detectors() -> list[Detector]:
    from ._diagnosis import default_detectors

    return default_detectors()


def attach(model: nn.Module, optimizer: torch.optim.Optimizer, **kwargs: Any) -> GradGuard:
    """``GradGuard(**kwargs).attach(model, optimizer)``: watch a plain PyTorch loop."""
    return GradGuard(**kwargs).attach(model, optimizer)
