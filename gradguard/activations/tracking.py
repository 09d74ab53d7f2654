"""Which parameter-owning layer produced each tensor of a sampled forward pass.

During a sampled pass a ``TorchFunctionMode`` sees every torch call. ``ProducerMap``
follows which layer produced each tensor, so an activation is reported on the layer that
fed it:

- an op that takes a watched parameter (``F.linear``, ``conv2d``, ``batch_norm`` with its
  affine weight, ``x * self.scale``) produces its output in that parameter's layer;
- an op without parameters that keeps the shape (``+``, dropout, a non-affine norm, an
  activation) passes the attribution of its first tracked input through; views that
  reshape (``chunk``, ``view``, indexing) pass it through for saturation only, since the
  unit axis is lost; mixing ops (``matmul``, ``softmax``...) end it.

A unit is the last dim of Linear-style outputs and the channel dim of conv/norm outputs.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .._layers import LayerLayout

__all__ = [
    "DEAD_CUTOFF",
    "HARDTANH",
    "SATURATION_TAILS",
    "Interceptor",
    "ProducerMap",
    "Track",
    "display_name",
    "functorch_active",
    "in_backward",
    "module_unit_dim",
    "tensors_in",
]

_T = torch._C.TensorBase
# Activation -> pre-activation cut-off at or below which the unit counts as not firing.
DEAD_CUTOFF: dict[Any, float] = {
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


SATURATION_TAILS: dict[Any, tuple[str, Callable[[torch.Tensor], torch.Tensor]]] = {
    **{f: ("sigmoid", _sigmoid_tails)
       for f in (torch.sigmoid, torch.sigmoid_, _T.sigmoid, _T.sigmoid_, torch.special.expit)},
    **{f: ("tanh", _tanh_tails) for f in (torch.tanh, torch.tanh_, _T.tanh, _T.tanh_)},
    F.softsign: ("softsign", _softsign_tails),
    F.hardsigmoid: ("hardsigmoid", _hardsigmoid_tails),
}  # fmt: skip
HARDTANH = (F.hardtanh, F.hardtanh_)
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


def display_name(func: Any) -> str:
    if func in HARDTANH:
        return "relu6"
    return str(getattr(func, "__name__", "relu")).strip("_")


def in_backward() -> bool:
    task = getattr(torch._C, "_current_graph_task_id", None)
    return task is not None and task() != -1


def functorch_active() -> bool:
    """Inside ``torch.func`` transforms (vmap, grad): tensors there are wrapped, and an
    in-place update of a captured statistic would fail, so the monitor stands aside."""
    active = getattr(torch._C, "_are_functorch_transforms_active", None)
    return bool(active()) if active is not None else False


def tensors_in(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        yield from (v for v in value if isinstance(v, torch.Tensor))


def module_unit_dim(module: nn.Module, ndim: int) -> int:
    if isinstance(module, nn.modules.conv._ConvNd):
        return max(ndim - len(module.kernel_size) - 1, 0)
    if isinstance(module, (nn.modules.batchnorm._NormBase, nn.GroupNorm)):
        return 1 if ndim >= 2 else 0
    return ndim - 1


@dataclass
class Track:
    ref: weakref.ref[torch.Tensor]
    layer: str
    unit_dim: int | None
    is_param: bool


class ProducerMap:
    """``id(tensor) -> Track`` for the tensors of one pass (weak: nothing is kept alive)."""

    def __init__(self) -> None:
        self._tracked: dict[int, Track] = {}

    def clear(self) -> None:
        self._tracked.clear()

    def track_params(self, layout: LayerLayout) -> None:
        self._tracked.clear()
        for param, index in zip(layout.params, layout.param_layer):
            self._tracked[id(param)] = Track(weakref.ref(param), layout.names[index], None, True)

    def track_module_params(self, module: nn.Module, name: str) -> None:
        """Parameters as the module holds them now (FSDP swaps in unsharded ones)."""
        for param in module._parameters.values():
            if param is not None:
                self._tracked[id(param)] = Track(weakref.ref(param), name, None, True)

    def lookup(self, tensor: torch.Tensor) -> Track | None:
        track = self._tracked.get(id(tensor))
        return track if track is not None and track.ref() is tensor else None

    def mark(
        self, tensor: torch.Tensor, layer: str, unit_dim: int | None, is_param: bool = False
    ) -> None:
        self._tracked[id(tensor)] = Track(weakref.ref(tensor), layer, unit_dim, is_param)

    def attribute(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        """Record which layer produced ``out`` (see the module docstring for the rules)."""
        outputs = [t for t in tensors_in(out) if self.lookup(t) is None]
        if not outputs:
            return
        owner: Track | None = None
        source: tuple[Track, torch.Tensor] | None = None
        all_params, foreign_param, seen = True, False, False
        for value in (*args, *kwargs.values()):
            if not isinstance(value, torch.Tensor):
                continue
            seen = True
            track = self.lookup(value)
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
                    self.mark(tensor, owner.layer, None, is_param=True)
                else:
                    self.mark(tensor, owner.layer, _produced_unit_dim(func, args, tensor))
        elif source is not None and not foreign_param and func not in _MIXING:
            track, tensor_in = source
            for tensor in outputs:
                if tensor.shape == tensor_in.shape:
                    self.mark(tensor, track.layer, track.unit_dim)
                elif func in _VIEWS:
                    self.mark(tensor, track.layer, None)


def _produced_unit_dim(func: Any, args: tuple[Any, ...], out: torch.Tensor) -> int | None:
    if out.ndim == 0:
        return None
    if func in _CONV and len(args) > 1 and isinstance(args[1], torch.Tensor):
        return max(out.ndim - (args[1].ndim - 2) - 1, 0)
    if func in _NORM:
        return 1 if out.ndim >= 2 else 0
    return out.ndim - 1


Observer = Callable[[Any, tuple[Any, ...], dict[str, Any]], Any]


class Interceptor(TorchFunctionMode):
    """Active only inside sampled training forward passes: hands activation calls to
    ``before``/``after`` and keeps the producer map up to date."""

    def __init__(
        self,
        producers: ProducerMap,
        before: Callable[[Any, tuple[Any, ...], dict[str, Any]], Track | None],
        after: Callable[[Any, tuple[Any, ...], dict[str, Any], Track, Any], None],
    ) -> None:
        super().__init__()
        self._producers = producers
        self._before = before
        self._after = after

    def __torch_function__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if functorch_active():
            return func(*args, **kwargs)
        try:
            observed = func in DEAD_CUTOFF or func in SATURATION_TAILS or func in HARDTANH
        except TypeError:  # an unhashable callable: not an activation
            observed = False
        source = self._before(func, args, kwargs) if observed else None
        out = func(*args, **kwargs)
        if source is not None:
            self._after(func, args, kwargs, source, out)
        self._producers.attribute(func, args, kwargs, out)
        return out
