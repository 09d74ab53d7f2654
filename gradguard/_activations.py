"""Activation health: dead ReLU units and saturated sigmoid/tanh units (sampled).

Every ``every_n_steps`` optimizer steps, ``ActivationMonitor`` watches a window of
``window`` training forward passes and removes its hooks afterwards, so the steps in
between pay nothing. During a sampled pass a ``TorchFunctionMode`` sees every torch call,
which covers ``nn.ReLU``/``nn.Tanh`` modules and functional ``F.relu``, ``torch.tanh``,
``x.sigmoid()``... alike. It also follows which parameter-owning layer produced each
tensor, so an activation is reported on the layer that fed it:

- an op that takes a watched parameter (``F.linear``, ``conv2d``, ``batch_norm`` with its
  affine weight, ``x * self.scale``) produces its output in that parameter's layer;
- an op without parameters that keeps the shape (``+``, dropout, a non-affine norm, an
  activation) passes the attribution of its first tracked input through; views that
  reshape (``chunk``, ``view``, indexing) pass it through for saturation only, since the
  unit axis is lost; mixing ops (``matmul``, ``softmax``...) end it.

So in Linear -> BatchNorm(affine) -> ReLU the ReLU is reported on the BatchNorm, the
nearest parameter-owning producer; without affine parameters it is reported on the Linear.
A unit is the last dim of Linear-style outputs and the channel dim of conv/norm outputs.

Dead: the pre-activation never rose above the cut-off on any sample of the window
(ReLU/ReLU6: 0; Hardswish: -3, where output and gradient are exactly 0; GELU: -4, SiLU and
Mish: -10, where the local derivative is below 5e-4 in magnitude). LeakyReLU, PReLU, ELU
and friends keep a gradient for negative inputs and are never "dead".
Saturated: an output in a flat tail: sigmoid < 0.01 or > 0.99 (derivative < 0.0099, 4% of
its peak), tanh |y| > 0.99 (derivative < 0.02), softsign |y| > 0.9 (derivative < 0.01),
hardtanh/hardsigmoid at their clamps (derivative 0).

Not seen: activations inside fused kernels (``nn.LSTM``, ``nn.GRU``), activations applied
outside any forward of the model, tensor-parallel (DTensor) activations, and models run
through ``torch.compile`` (hooks would force recompilations; a warning says so once).
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle

from ._advice import dead_units_text, saturation_text
from ._errors import GradGuardError, GradGuardWarning, check_number, check_positive_int
from ._events import Event, EventKind
from ._layers import LayerLayout

__all__ = ["ActivationMonitor"]

_T = torch._C.TensorBase
# Activation -> pre-activation cut-off at or below which the unit counts as not firing.
_DEAD_CUTOFF: dict[Any, float] = {
    F.relu: 0.0, torch.relu: 0.0, torch.relu_: 0.0, _T.relu: 0.0, _T.relu_: 0.0,
    F.relu6: 0.0, F.hardswish: -3.0, F.gelu: -4.0, F.silu: -10.0, F.mish: -10.0,
}  # fmt: skip


def _sigmoid_tails(y: torch.Tensor) -> torch.Tensor:
    return (y < 0.01) | (y > 0.99)


def _tanh_tails(y: torch.Tensor) -> torch.Tensor:
    return y.abs() > 0.99


def _softsign_tails(y: torch.Tensor) -> torch.Tensor:
    return y.abs() > 0.9


def _hardsigmoid_tails(y: torch.Tensor) -> torch.Tensor:
    return (y <= 0.0) | (y >= 1.0)


_SATURATION: dict[Any, tuple[str, Callable[[torch.Tensor], torch.Tensor]]] = {
    **{f: ("sigmoid", _sigmoid_tails)
       for f in (torch.sigmoid, torch.sigmoid_, _T.sigmoid, _T.sigmoid_, torch.special.expit)},
    **{f: ("tanh", _tanh_tails) for f in (torch.tanh, torch.tanh_, _T.tanh, _T.tanh_)},
    F.softsign: ("softsign", _softsign_tails),
    F.hardsigmoid: ("hardsigmoid", _hardsigmoid_tails),
}  # fmt: skip
# Below this many samples per unit in a window, "never fired" is not evidence of death
# (a unit firing on 10% of inputs stays silent on 16 samples 18% of the time).
_MIN_DEAD_SAMPLES = 32
_HARDTANH = (F.hardtanh, F.hardtanh_)
_CONV = (torch.conv1d, torch.conv2d, torch.conv3d,
         torch.conv_transpose1d, torch.conv_transpose2d, torch.conv_transpose3d)  # fmt: skip
_NORM = (F.batch_norm, F.instance_norm, F.group_norm, torch.batch_norm, torch.group_norm)
_MIXING = frozenset((F.linear, F.bilinear, torch.matmul, _T.matmul, _T.__matmul__, torch.mm, _T.mm,
    torch.bmm, _T.bmm, torch.einsum, F.softmax, _T.softmax, torch.softmax, F.log_softmax,
    F.scaled_dot_product_attention, F.multi_head_attention_forward, *_CONV))  # fmt: skip
_VIEWS = frozenset((_T.chunk, torch.chunk, _T.split, torch.split, _T.view, _T.reshape,
    torch.reshape, _T.flatten, torch.flatten, _T.unflatten, _T.transpose, torch.transpose,
    _T.permute, torch.permute, _T.__getitem__, _T.narrow, _T.squeeze, _T.unsqueeze,
    _T.unbind, torch.unbind, _T.tensor_split))  # fmt: skip


def _display_name(func: Any) -> str:
    if func in _HARDTANH:
        return "relu6"
    return str(getattr(func, "__name__", "relu")).strip("_")


def _in_backward() -> bool:
    task = getattr(torch._C, "_current_graph_task_id", None)
    return task is not None and task() != -1


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        yield from (v for v in value if isinstance(v, torch.Tensor))


def _compiled(model: nn.Module) -> bool:
    return any(
        getattr(module, "_compiled_call_impl", None) is not None
        or type(module).__name__ == "OptimizedModule"
        for module in model.modules()
    )


def _module_unit_dim(module: nn.Module, ndim: int) -> int:
    if isinstance(module, nn.modules.conv._ConvNd):
        return max(ndim - len(module.kernel_size) - 1, 0)
    if isinstance(module, (nn.modules.batchnorm._NormBase, nn.GroupNorm)):
        return 1 if ndim >= 2 else 0
    return ndim - 1


@dataclass
class _Track:
    ref: weakref.ref[torch.Tensor]
    layer: str
    unit_dim: int | None
    is_param: bool


@dataclass
class _LayerStats:
    """One layer's statistics over a window, kept on the device."""

    units: int | None = None
    alive: torch.Tensor | None = None  # bool per unit: fired at least once
    saturated: torch.Tensor | None = None  # int64 count of outputs in the flat tails
    outputs: int = 0
    samples: int = 0  # samples seen per unit (rows of the dead-unit statistic)
    dead_kinds: set[str] = field(default_factory=set)
    saturation_kinds: set[str] = field(default_factory=set)


@dataclass
class _Window:
    start: int
    passes: int
    stats: dict[str, _LayerStats]


class _Interceptor(TorchFunctionMode):
    """Active only inside sampled training forward passes."""

    def __init__(self, monitor: ActivationMonitor) -> None:
        super().__init__()
        self._monitor = monitor

    def __torch_function__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        try:
            observed = func in _DEAD_CUTOFF or func in _SATURATION or func in _HARDTANH
        except TypeError:  # an unhashable callable: not an activation
            observed = False
        source = self._monitor._record_input(func, args, kwargs) if observed else None
        out = func(*args, **kwargs)
        if source is not None:
            self._monitor._record_output(func, args, kwargs, source, out)
        self._monitor._attribute(func, args, kwargs, out)
        return out


class ActivationMonitor:
    """Dead ReLU units and saturated sigmoid/tanh outputs, sampled on a window of passes.

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

    The statistics stay on the device and reach the host with the guard's one bulk copy on
    the first logging step after the window closes, as ``dead_fraction/<layer>`` and
    ``saturation/<layer>``.
    """

    def __init__(
        self,
        every_n_steps: int = 100,
        window: int = 4,
        *,
        dead_threshold: float = 0.5,
        saturation_threshold: float = 0.25,
        remind_every: int = 10,
    ) -> None:
        self.every_n_steps = check_positive_int("every_n_steps", every_n_steps)
        self.window = check_positive_int("window", window)
        self.dead_threshold = check_number("dead_threshold", dead_threshold, low=0.0, high=1.0)
        self.saturation_threshold = check_number(
            "saturation_threshold", saturation_threshold, low=0.0, high=1.0
        )
        self.remind_every = check_positive_int("remind_every", remind_every)
        self._model: nn.Module | None = None
        self._layout: LayerLayout | None = None
        self._mode = _Interceptor(self)
        self._handles: list[RemovableHandle] = []
        self._collecting = False
        self._last_start: int | None = None
        self._window_start = 0
        self._passes = 0
        self._stats: dict[str, _LayerStats] = {}
        self._ready: _Window | None = None
        self._reading: _Window | None = None
        # pass state
        self._depth = 0
        self._pass_open = False
        self._scope_is_root = False
        self._root_pass_this_step = False
        self._loose_pass_this_step = False
        self._tracked: dict[int, _Track] = {}
        self._saturation_outputs: dict[
            int, tuple[weakref.ref[torch.Tensor], str, torch.Tensor]
        ] = {}
        # host-side history (state_dict)
        self._episodes: dict[str, dict[str, Any]] = {}
        self._healthy: dict[str, list[float]] = {}  # layer -> [window start, dead fraction]
        self._warned_compiled = False

    def __repr__(self) -> str:
        return (
            f"ActivationMonitor(every_n_steps={self.every_n_steps}, window={self.window}, "
            f"dead_threshold={self.dead_threshold}, "
            f"saturation_threshold={self.saturation_threshold})"
        )

    # ------------------------------------------------------------------ guard interface
    def bind(self, model: nn.Module, layout: LayerLayout) -> None:
        if self._model is not None:
            raise GradGuardError("this ActivationMonitor is already bound to a model")
        self._model, self._layout = model, layout

    def unbind(self) -> None:
        self._remove_hooks()
        if self._pass_open:
            self._mode.__exit__(None, None, None)  # type: ignore[no-untyped-call]
        self._pass_open, self._depth, self._collecting = False, 0, False
        self._tracked.clear()
        self._stats = {}
        self._model = self._layout = None
        self._last_start = None
        # A window of this attachment is not published into the next one (maybe another model).
        self._ready = self._reading = None

    def on_step_end(self, next_step: int) -> None:
        """Called at bind and after every optimizer step with the number of the next step."""
        if self._model is None:
            return
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

    def metrics(self) -> dict[str, torch.Tensor]:
        """The latest closed window's fractions (0-d device tensors), once per window."""
        window, self._ready = self._ready, None
        self._reading = window
        if window is None:
            return {}
        out: dict[str, torch.Tensor] = {}
        for layer, stats in window.stats.items():
            if stats.alive is not None:
                out[f"dead_fraction/{layer}"] = (~stats.alive).float().mean()
            if stats.saturated is not None and stats.outputs > 0:
                out[f"saturation/{layer}"] = stats.saturated.float() / stats.outputs
        return out

    def check(self, view: Any) -> list[Event]:
        window, self._reading = self._reading, None
        if window is None:
            return []
        events: list[Event] = []
        for kind in ("dead_units", "saturation"):
            event = self._check_kind(kind, window, view)
            if event is not None:
                events.append(event)
        return events

    def state_dict(self) -> dict[str, Any]:
        return {
            "episodes": {k: dict(v, layers=list(v["layers"])) for k, v in self._episodes.items()},
            "healthy": {k: list(v) for k, v in self._healthy.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._episodes = {
            str(kind): {
                "active": bool(ep.get("active", False)),
                "layers": [str(n) for n in ep.get("layers", [])],
                "since": int(ep.get("since", 0)),
                "reads": int(ep.get("reads", 0)),
            }
            for kind, ep in state.get("episodes", {}).items()
        }
        self._healthy = {
            str(k): [float(v[0]), float(v[1])] for k, v in state.get("healthy", {}).items()
        }

    # ------------------------------------------------------------------ windows and hooks
    def _start_window(self, step: int) -> None:
        model, layout = self._model, self._layout
        assert model is not None and layout is not None
        self._last_start = step
        if _compiled(model):
            if not self._warned_compiled:
                self._warned_compiled = True
                warnings.warn(
                    "gradguard does not sample activations of a torch.compile'd model: adding "
                    "and removing hooks would force recompilations. Gradients are still "
                    "watched; pass activations=False to silence this warning.",
                    GradGuardWarning,
                    stacklevel=5,
                )
            return
        self._collecting = True
        self._window_start, self._passes, self._stats = step, 0, {}
        names = {id(m): n for n, m in layout.modules.items()}
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
        self._ready = _Window(self._window_start, self._passes, self._stats)
        self._stats = {}

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _pre_hook_for(self, name: str | None) -> Callable[[nn.Module, Any], None]:
        def pre_hook(module: nn.Module, args: Any) -> None:
            if torch.compiler.is_compiling():
                return
            if self._depth == 0:
                self._pass_open = module.training and torch.is_grad_enabled() and not _in_backward()
                if self._pass_open:
                    self._scope_is_root = module is self._model
                    self._track_params()
                    self._mode.__enter__()  # type: ignore[no-untyped-call]
            self._depth += 1
            if self._pass_open and name is not None:
                # Parameters as the module holds them now (FSDP swaps in unsharded ones).
                for param in module._parameters.values():
                    if param is not None:
                        self._tracked[id(param)] = _Track(weakref.ref(param), name, None, True)

        return pre_hook

    def _post_hook_for(self, name: str | None) -> Callable[[nn.Module, Any, Any], None]:
        def post_hook(module: nn.Module, args: Any, output: Any) -> None:
            if torch.compiler.is_compiling():
                return
            self._depth -= 1
            if not self._pass_open:
                return
            if name is not None:
                for tensor in _tensors(output):
                    if self._lookup(tensor) is None and tensor.ndim > 0:
                        unit_dim = _module_unit_dim(module, tensor.ndim)
                        self._mark(tensor, name, unit_dim)
            if self._depth == 0:
                self._mode.__exit__(None, None, None)  # type: ignore[no-untyped-call]
                self._pass_open = False
                if self._scope_is_root:
                    self._forget_model_outputs(output)
                self._tracked.clear()
                self._saturation_outputs.clear()
                if self._scope_is_root:
                    self._root_pass_this_step = True
                    self._passes += 1
                    if self._passes >= self.window:
                        self._finish_window()
                else:
                    self._loose_pass_this_step = True

        return post_hook

    def _forget_model_outputs(self, output: Any) -> None:
        """A sigmoid/tanh whose output IS the model's output (a BCE probability, a bounded
        regression target) saturates when it is confident; that is not a hidden-layer
        pathology, so it leaves the statistics."""
        for tensor in _tensors(output):
            entry = self._saturation_outputs.get(id(tensor))
            if entry is None or entry[0]() is not tensor:
                continue
            stats = self._stats.get(entry[1])
            if stats is not None and stats.saturated is not None:
                stats.saturated = stats.saturated - entry[2]
                stats.outputs -= tensor.numel()
                if stats.outputs <= 0:
                    stats.saturated, stats.outputs = None, 0

    # ------------------------------------------------------------------ tracking
    def _track_params(self) -> None:
        layout = self._layout
        assert layout is not None
        self._tracked.clear()
        for param, index in zip(layout.params, layout.param_layer):
            self._tracked[id(param)] = _Track(weakref.ref(param), layout.names[index], None, True)

    def _lookup(self, tensor: torch.Tensor) -> _Track | None:
        track = self._tracked.get(id(tensor))
        return track if track is not None and track.ref() is tensor else None

    def _mark(
        self, tensor: torch.Tensor, layer: str, unit_dim: int | None, is_param: bool = False
    ) -> None:
        self._tracked[id(tensor)] = _Track(weakref.ref(tensor), layer, unit_dim, is_param)

    def _attribute(
        self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any
    ) -> None:
        """Record which layer produced ``out`` (see the module docstring for the rules)."""
        outputs = [t for t in _tensors(out) if self._lookup(t) is None]
        if not outputs:
            return
        owner: _Track | None = None
        source: tuple[_Track, torch.Tensor] | None = None
        all_params, foreign_param, seen = True, False, False
        for value in (*args, *kwargs.values()):
            if not isinstance(value, torch.Tensor):
                continue
            seen = True
            track = self._lookup(value)
            if track is not None and track.is_param:
                owner = owner or track
                continue
            all_params = False
            if isinstance(value, nn.Parameter):
                foreign_param = True
            elif track is not None and source is None:
                source = (track, value)
        if owner is not None:
            for tensor in outputs:
                if all_params and seen:  # a view or cast of the parameter itself
                    self._mark(tensor, owner.layer, None, is_param=True)
                else:
                    self._mark(tensor, owner.layer, self._produced_unit_dim(func, args, tensor))
        elif source is not None and not foreign_param and func not in _MIXING:
            track, tensor_in = source
            for tensor in outputs:
                if tensor.shape == tensor_in.shape:
                    self._mark(tensor, track.layer, track.unit_dim)
                elif func in _VIEWS:
                    self._mark(tensor, track.layer, None)

    @staticmethod
    def _produced_unit_dim(func: Any, args: tuple[Any, ...], out: torch.Tensor) -> int | None:
        if out.ndim == 0:
            return None
        if func in _CONV and len(args) > 1 and isinstance(args[1], torch.Tensor):
            return max(out.ndim - (args[1].ndim - 2) - 1, 0)
        if func in _NORM:
            return 1 if out.ndim >= 2 else 0
        return out.ndim - 1

    # ------------------------------------------------------------------ statistics
    def _layer_stats(self, layer: str) -> _LayerStats:
        stats = self._stats.get(layer)
        if stats is None:
            stats = self._stats[layer] = _LayerStats()
        return stats

    def _record_input(
        self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> _Track | None:
        x = args[0] if args else kwargs.get("input")
        if not isinstance(x, torch.Tensor) or type(x).__name__ == "DTensor" or x.numel() == 0:
            return None
        track = self._lookup(x)
        if track is None or track.is_param:
            return None
        cutoff = _DEAD_CUTOFF.get(func)
        if func in _HARDTANH:
            low = args[1] if len(args) > 1 else kwargs.get("min_val", -1.0)
            cutoff = float(low) if float(low) >= 0.0 else None  # ReLU6-like: dead below
        if cutoff is not None and track.unit_dim is not None:
            # Measured before the call: in-place activations overwrite their input.
            # NaN counts as fired, so a NaN pass is not mistaken for dead units.
            dims = tuple(d for d in range(x.ndim) if d != track.unit_dim)
            peak = x.detach().amax(dim=dims) if dims else x.detach()
            fired = ~(peak <= cutoff)
            stats = self._layer_stats(track.layer)
            if stats.alive is None:
                stats.alive, stats.units = fired.clone(), int(fired.numel())
            elif stats.alive.shape == fired.shape:
                stats.alive.logical_or_(fired)
            else:
                return track
            stats.samples += x.numel() // max(int(fired.numel()), 1)
            stats.dead_kinds.add(_display_name(func))
        return track

    def _record_output(
        self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], track: _Track, out: Any
    ) -> None:
        if not isinstance(out, torch.Tensor):
            return
        if func in _HARDTANH:
            low = float(args[1] if len(args) > 1 else kwargs.get("min_val", -1.0))
            high = float(args[2] if len(args) > 2 else kwargs.get("max_val", 1.0))
            if low >= 0.0:
                return
            name, tails = "hardtanh", None
        elif func in _SATURATION:
            name, tails = _SATURATION[func]
        else:
            return
        y = out.detach()
        mask = tails(y) if tails is not None else (y <= low) | (y >= high)
        stats = self._layer_stats(track.layer)
        count = mask.sum()
        stats.saturated = count if stats.saturated is None else stats.saturated + count
        stats.outputs += y.numel()
        self._saturation_outputs[id(out)] = (weakref.ref(out), track.layer, count)
        stats.saturation_kinds.add(name)
        if stats.units is None and track.unit_dim is not None:
            stats.units = int(y.shape[track.unit_dim])

    # ------------------------------------------------------------------ events
    def _check_kind(self, kind: EventKind, window: _Window, view: Any) -> Event | None:
        metric = "dead_fraction" if kind == "dead_units" else "saturation"
        threshold = self.dead_threshold if kind == "dead_units" else self.saturation_threshold
        names = self._layout.names if self._layout is not None else []
        depth = {name: i for i, name in enumerate(names)}
        fractions: dict[str, float] = {}
        for layer in window.stats:
            value = view.scalars.get(f"{view.prefix}/{metric}/{layer}")
            if value is not None and value == value:
                fractions[layer] = float(value)
        flagged = []
        for layer, fraction in fractions.items():
            units = window.stats[layer].units or 0
            if kind == "dead_units":
                enough = window.stats[layer].samples >= _MIN_DEAD_SAMPLES
                bad = enough and fraction >= threshold and round(fraction * units) >= 1
            else:
                bad = fraction >= threshold and fraction > 0
            if bad:
                flagged.append(layer)
            elif kind == "dead_units" and fraction < threshold:
                self._healthy[layer] = [float(window.start), fraction]
        flagged.sort(key=lambda n: (-fractions[n], depth.get(n, len(depth))))
        episode = self._episodes.get(kind)
        if not flagged:
            if episode is not None:
                episode["active"] = False
            return None
        if episode is not None and episode["active"]:
            episode["reads"] += 1
            new = [n for n in flagged if n not in episode["layers"]]
            if not new and episode["reads"] < self.remind_every:
                return None
            reminder = not new
        else:
            episode = self._episodes[kind] = {"active": True, "layers": [], "since": window.start}
            reminder = False
        episode["reads"] = 0
        episode["layers"] = sorted(set(episode["layers"]) | set(flagged))
        if kind == "dead_units":
            message, advice = _dead_units_text(
                self._layout, window, view, flagged, fractions, self._healthy
            )
        else:
            message, advice = _saturation_text(self._layout, window, flagged, fractions)
        if reminder:
            message = f"Still present since the window at step {episode['since']}: {message}"
        unit_counts = {n: window.stats[n].units or 0 for n in flagged}
        details: dict[str, Any] = {
            "fractions": {n: fractions[n] for n in flagged},
            "units": unit_counts,
            "window_start": window.start,
            "forward_passes": window.passes,
            "reminder": reminder,
        }
        if kind == "dead_units":
            details["dead_units"] = {n: round(fractions[n] * unit_counts[n]) for n in flagged}
        return Event(
            kind=kind,
            step=int(view.step),
            layers=tuple(flagged),
            value=fractions[flagged[0]],
            severity="warning",
            message=message,
            advice=advice,
            details=details,
        )


# ---------------------------------------------------------------------- evidence
def _host_numbers(values: list[torch.Tensor]) -> list[float]:
    # Deliberate host sync, rare: only on a logging step that emits an activation Event,
    # to read the evidence (biases, weight scale) the advice is chosen from.
    return [float(v) for v in torch.stack([v.float().cpu() for v in values]).tolist()]


def _dead_units_text(
    layout: LayerLayout | None,
    window: _Window,
    view: Any,
    flagged: list[str],
    fractions: dict[str, float],
    healthy: dict[str, list[float]],
) -> tuple[str, str]:
    kinds = sorted(set().union(*(window.stats[n].dead_kinds for n in flagged)))
    rows = []
    for name in flagged:
        units = window.stats[name].units or 0
        rows.append((name, round(fractions[name] * units), units))
    died_layers = [n for n in flagged if n in healthy]
    if died_layers:
        name = died_layers[0]
        ratio = None
        if view.update_ratio is not None and layout is not None and name in layout.names:
            ratio = float(view.update_ratio[layout.names.index(name)])
        died = (name, healthy[name][1], int(healthy[name][0]))
        return dead_units_text(
            rows, kinds, window.passes, window.start, died=died, update_ratio=ratio
        )
    worst = flagged[0]
    mean_bias = None
    bias = getattr(layout.modules.get(worst) if layout is not None else None, "bias", None)
    alive = window.stats[worst].alive
    if isinstance(bias, torch.Tensor) and alive is not None and bias.shape == alive.shape:
        dead = (~alive).to(bias.device)
        (mean_bias,) = _host_numbers([(bias.detach() * dead).sum() / dead.sum().clamp_min(1)])
    return dead_units_text(rows, kinds, window.passes, window.start, mean_bias=mean_bias)


def _saturation_text(
    layout: LayerLayout | None, window: _Window, flagged: list[str], fractions: dict[str, float]
) -> tuple[str, str]:
    kinds = sorted(set().union(*(window.stats[n].saturation_kinds for n in flagged)))
    rows = [(n, fractions[n], window.stats[n].units) for n in flagged]
    worst = flagged[0]
    scale = None
    weight = getattr(layout.modules.get(worst) if layout is not None else None, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.ndim >= 2 and type(weight).__name__ != "DTensor":
        fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(weight)
        xavier_std = math.sqrt(2.0 / (fan_in + fan_out))
        (scale,) = _host_numbers([weight.detach().float().std() / xavier_std])
    reads_inputs = layout is not None and bool(layout.names) and worst == layout.names[0]
    return saturation_text(
        rows, kinds, window.passes, window.start, xavier_scale=scale, reads_inputs=reads_inputs
    )
