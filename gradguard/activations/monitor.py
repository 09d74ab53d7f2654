"""Activation health: dead ReLU units, saturated sigmoid/tanh units, the scale of the inputs
and the headroom of float16/bfloat16 activations (sampled).

Every ``every_n_steps`` optimizer steps, ``ActivationMonitor`` watches a window of
``window`` training forward passes and removes its hooks afterwards, so the steps in
between pay nothing. During a sampled pass a ``TorchFunctionMode`` sees every torch call,
which covers ``nn.ReLU``/``nn.Tanh`` modules and functional ``F.relu``, ``torch.tanh``,
``x.sigmoid()``... alike; ``tracking.py`` says which layer produced each tensor, so an
activation is reported on the layer that fed it (in Linear -> BatchNorm(affine) -> ReLU
the ReLU is reported on the BatchNorm, the nearest parameter-owning producer; without
affine parameters it is reported on the Linear). ``window.py`` says what counts as dead
or saturated and keeps each layer's largest |output|; ``inputs.py`` measures the inputs
the first layer reads; ``findings.py`` turns a window into findings with their evidence.

Not seen: activations inside fused kernels (``nn.LSTM``, ``nn.GRU``), activations applied
outside any forward of the model, tensor-parallel (DTensor) activations, calls inside
``torch.func`` transforms (vmap, grad), and models run through ``torch.compile`` (hooks
would force recompilations; a warning says so once).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .._debounce import Finding
from .._errors import (
    ConfigurationError,
    GradGuardWarning,
    check_number,
    check_positive_int,
    user_stacklevel,
)
from .._stats import LoggedStats
from ..detect.base import Detector, GuardContext
from ..report.causes import INPUT_RMS_LIMIT, INPUT_SPREAD_LIMIT
from .findings import Limits, window_findings
from .tracking import (
    Interceptor,
    ProducerMap,
    functorch_active,
    in_backward,
    module_unit_dim,
    tensors_in,
)
from .window import Window, WindowRecorder

__all__ = ["ActivationMonitor", "compiled"]


def compiled(model: nn.Module) -> bool:
    """True when the model (or a submodule) runs through ``torch.compile``."""
    return any(
        getattr(module, "_compiled_call_impl", None) is not None
        or type(module).__name__ == "OptimizedModule"
        for module in model.modules()
    )


class ActivationMonitor(Detector):
    """Dead ReLU units, saturated sigmoid/tanh outputs, badly scaled inputs and float16
    headroom, sampled on a window of passes.

    Args:
        every_n_steps: a window starts at optimizer steps 0, N, 2N, ...
        window: training forward passes per window (``module.training`` and grad enabled;
            ``torch.no_grad`` evaluation passes are not counted).
        dead_threshold: fraction of a layer's units that must be dead to raise a
            ``dead_units`` Event (at least one unit, and at least 32 samples per unit in
            the window). Healthy ReLU nets on digits stay under 0.15, even at Adam lr 1e-2.
        saturation_threshold: fraction of the outputs fed by a layer that must sit in the
            flat tails to raise a ``saturation`` Event. Healthy tanh/sigmoid nets on digits
            stay under 0.1; weights 5x the PyTorch default give about 0.3. A sigmoid/tanh
            whose output is the model's output (a BCE probability) is left out: it is
            meant to saturate when confident.
        remind_every: while a condition persists over consecutive windows it is reported
            once, then again every ``remind_every`` windows (or when a new layer joins).
        input_rms_limit: the first layer's inputs raise ``input_scale`` when their RMS over
            the window (sqrt(mean^2 + std^2)) reaches this (default 10). Standardised inputs
            read about 1 (the zoo's digits 0.84-1.47 per batch); digits as 0-255 bytes ~100.
        input_spread_limit: ... or when the features' scales differ this much (default 100:
            the 90th over the 10th percentile of the per-feature RMS, always-0 features left
            out; with under 10 features, e.g. an image's channels, the largest over the
            smallest). Standardised digits read 1.3-4.4 over a window (rare pixels are the
            low tail), 21 at most on one batch of 64.
        headroom: a layer whose float16 (or bfloat16) outputs reach this fraction of the
            dtype's largest finite value (float16: 65,504) raises ``overflow_risk`` (default
            0.9). The healthy zoo's largest activation is 35, in float32; an fp16 overflow
            turns into Inf, then NaN.

    The statistics stay on the device and reach the host with the guard's one bulk copy on
    the first logging step after the window closes, as ``dead_fraction/<layer>``,
    ``saturation/<layer>``, ``act_absmax/<layer>`` and ``input/mean``, ``input/std``,
    ``input/rms``, ``input/feature_spread``. The extra work of a sampled pass is one
    reduction per layer output (the abs-max) and two over the first layer's input.
    """

    kinds: ClassVar[tuple[str, ...]] = ("dead_units", "saturation", "input_scale", "overflow_risk")

    def __init__(
        self,
        every_n_steps: int = 100,
        window: int = 4,
        *,
        dead_threshold: float = 0.5,
        saturation_threshold: float = 0.25,
        remind_every: int = 10,
        input_rms_limit: float = INPUT_RMS_LIMIT,
        input_spread_limit: float = INPUT_SPREAD_LIMIT,
        headroom: float = 0.9,
    ) -> None:
        self.every_n_steps = check_positive_int("every_n_steps", every_n_steps)
        self.window = check_positive_int("window", window)
        self.dead_threshold = check_number("dead_threshold", dead_threshold, low=0.0, high=1.0)
        self.saturation_threshold = check_number(
            "saturation_threshold", saturation_threshold, low=0.0, high=1.0
        )
        self.remind_every = check_positive_int("remind_every", remind_every)
        self.input_rms_limit = check_number(
            "input_rms_limit", input_rms_limit, low=0.0, low_open=True
        )
        self.input_spread_limit = check_number(
            "input_spread_limit", input_spread_limit, low=1.0, low_open=True
        )
        self.headroom = check_number("headroom", headroom, low=0.0, high=1.0, low_open=True)
        self._producers = ProducerMap()
        self._recorder = WindowRecorder(self._producers)
        self._mode = Interceptor(self._producers, self._recorder.before, self._recorder.after)
        self._model: nn.Module | None = None
        self._handles: list[RemovableHandle] = []
        self._collecting = False
        self._last_start: int | None = None
        self._window_start = 0
        self._passes = 0
        self._ready: Window | None = None
        self._reading: Window | None = None
        # pass state
        self._depth = 0
        self._pass_open = False
        self._scope_is_root = False
        self._root_pass_this_step = False
        self._loose_pass_this_step = False
        # host-side history (state_dict): layer -> [window start, dead fraction]
        self._healthy: dict[str, list[float]] = {}
        # the weight norms of the first logging step seen (state_dict): [step, {layer: norm}]
        self._first_weights: tuple[int, dict[str, float]] | None = None
        self._warned_compiled = False

    def __repr__(self) -> str:
        return (
            f"ActivationMonitor(every_n_steps={self.every_n_steps}, window={self.window}, "
            f"dead_threshold={self.dead_threshold}, "
            f"saturation_threshold={self.saturation_threshold})"
        )

    # ------------------------------------------------------------------ detector interface
    def bind(self, context: GuardContext) -> None:
        if self.context is not None:
            self._stop()  # bound again (the watched layers changed): restart cleanly
        super().bind(context)
        self._model = context.model

    def unbind(self) -> None:
        self._stop()
        self._model = None
        self._last_start = None
        # A window of this attachment is not published into the next one (maybe another model).
        self._ready = self._reading = None
        super().unbind()

    def _stop(self) -> None:
        self._remove_hooks()
        self._close_pass()
        self._collecting = False
        self._producers.clear()
        self._recorder.reset()

    def on_step_end(self, next_step: int) -> None:
        """Called at bind and after every optimizer step with the number of the next step."""
        if self._model is None:
            return
        if self._pass_open:
            # A forward that never finished (interrupted, e.g. Ctrl-C, and training went on):
            # close it so the torch-function mode does not stay pushed.
            self._close_pass()
        if self._collecting and self._loose_pass_this_step and not self._root_pass_this_step:
            # The model's own forward never ran (e.g. a LightningModule whose training_step
            # calls its submodules): one optimizer step counts as one pass.
            self._passes += 1
            if self._passes >= self.window:
                self._finish_window()
        self._root_pass_this_step = self._loose_pass_this_step = False
        starts = next_step % self.every_n_steps == 0 and next_step != self._last_start
        if starts and not self._collecting:
            self._start_window(next_step)

    def metrics(self) -> Mapping[str, float | torch.Tensor]:
        """The latest closed window's fractions per layer (device tensors), once per window."""
        window, self._ready = self._ready, None
        self._reading = window
        if window is None or self.context is None:
            return {}
        return window.fractions(self.context.layout.names, self.context.device)

    def on_log(self, stats: LoggedStats) -> list[Finding]:
        if self._first_weights is None or stats.step < self._first_weights[0]:
            norms = {n: v for n, v in zip(stats.layers, stats.param_norm) if v is not None}
            self._first_weights = (stats.step, norms)
        window, self._reading = self._reading, None
        if window is None or self.context is None:
            return []
        interval = max(self.every_n_steps, self.context.log_every_n_steps)
        return window_findings(
            window,
            stats,
            self.context.layout,
            Limits(
                self.dead_threshold,
                self.saturation_threshold,
                self.input_rms_limit,
                self.input_spread_limit,
                self.headroom,
            ),
            healthy=self._healthy,
            first_weights=self._first_weights,
            max_gap=2 * interval,
            remind_every=self.remind_every * self.every_n_steps,
        )

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"healthy": {k: list(v) for k, v in self._healthy.items()}}
        if self._first_weights is not None:
            state["first_weights"] = [self._first_weights[0], dict(self._first_weights[1])]
        return state

    def check_state(self, state: Mapping[str, Any]) -> None:
        """Refuse a malformed state before any part of the guard's state is applied."""
        try:
            healthy = state.get("healthy", {})
            for value in healthy.values():
                if len(value) != 2:
                    raise ValueError("expected [step, fraction] pairs")
                float(value[0]), float(value[1])
            first = state.get("first_weights")
            if first is not None:
                int(first[0])
                for weight in first[1].values():
                    float(weight)
        except (AttributeError, TypeError, ValueError, IndexError, KeyError) as exc:
            raise ConfigurationError(
                f"ActivationMonitor state is malformed ({exc}): expected the dict "
                "ActivationMonitor.state_dict() returns"
            ) from None

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._healthy = {
            str(k): [float(v[0]), float(v[1])] for k, v in state.get("healthy", {}).items()
        }
        first = state.get("first_weights")
        self._first_weights = (
            None
            if first is None
            else (int(first[0]), {str(k): float(v) for k, v in first[1].items()})
        )

    # ------------------------------------------------------------------ windows and hooks
    def _start_window(self, step: int) -> None:
        model, context = self._model, self.context
        assert model is not None and context is not None
        self._last_start = step
        if context.compiled:
            if not self._warned_compiled:
                self._warned_compiled = True
                warnings.warn(
                    "gradguard does not sample activations of a torch.compile'd model: adding "
                    "and removing hooks would force recompilations. Gradients are still "
                    "watched; pass activations=False to silence this warning.",
                    GradGuardWarning,
                    stacklevel=user_stacklevel(),
                )
            return
        self._collecting = True
        self._window_start, self._passes = step, 0
        self._recorder.reset()
        names = {id(m): n for n, m in context.layout.modules.items()}
        # Hooks on the root and on every module holding parameters: the outermost of them
        # scopes a pass (the interceptor is active only inside it), layers mark outputs.
        for module in model.modules():
            if module is model or any(True for _ in module.parameters()):
                name = names.get(id(module))
                self._handles.append(module.register_forward_pre_hook(self._pre_hook_for(name)))
                self._handles.append(
                    module.register_forward_hook(self._post_hook_for(name), always_call=True)
                )

    def _finish_window(self) -> None:
        self._remove_hooks()
        self._collecting = False
        recorder = self._recorder
        self._ready = Window(self._window_start, self._passes, recorder.stats, recorder.inputs)
        recorder.stats, recorder.inputs = {}, None

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _close_pass(self) -> None:
        if self._pass_open:
            self._mode.__exit__(None, None, None)  # type: ignore[no-untyped-call]
        self._pass_open, self._depth = False, 0
        self._producers.clear()
        self._recorder.end_pass()

    def _pre_hook_for(self, name: str | None) -> Callable[[nn.Module, Any], None]:
        def pre_hook(module: nn.Module, args: Any) -> None:
            if torch.compiler.is_compiling():
                return
            if module is self._model and self._depth > 0:
                # A pass an interrupted forward left open (torch runs always-call forward
                # hooks on Exception only, not on KeyboardInterrupt): close it now, so the
                # next forward (say, an evaluation after Ctrl-C) runs outside the mode.
                self._close_pass()
            if self._depth == 0:
                # Under torch.func transforms (vmap, grad) the interceptor stands aside and the
                # tensors are batched: such a pass is neither sampled nor counted.
                self._pass_open = (
                    module.training
                    and torch.is_grad_enabled()
                    and not in_backward()
                    and not functorch_active()
                )
                if self._pass_open:
                    assert self.context is not None
                    self._scope_is_root = module is self._model
                    self._producers.track_params(self.context.layout)
                    self._recorder.mark_inputs(args)
                    self._mode.__enter__()  # type: ignore[no-untyped-call]
            self._depth += 1
            if self._pass_open and name is not None:
                self._producers.track_module_params(module, name)
                if module is not self._model:
                    self._recorder.layer_starts(name, module, args)

        return pre_hook

    def _post_hook_for(self, name: str | None) -> Callable[[nn.Module, Any, Any], None]:
        def post_hook(module: nn.Module, args: Any, output: Any) -> None:
            if torch.compiler.is_compiling():
                return
            self._depth = max(self._depth - 1, 0)
            if not self._pass_open:
                return
            if name is not None:
                self._recorder.layer_output(name, output)
                for tensor in tensors_in(output):
                    if self._producers.lookup(tensor) is None and tensor.ndim > 0:
                        self._producers.mark(tensor, name, module_unit_dim(module, tensor.ndim))
            if self._depth == 0:
                if self._scope_is_root:
                    self._recorder.forget_model_outputs(output)
                self._close_pass()
                if self._scope_is_root:
                    self._root_pass_this_step = True
                    self._passes += 1
                    if self._passes >= self.window:
                        self._finish_window()
                else:
                    self._loose_pass_this_step = True

        return post_hook
