"""One traced forward pass: which torch call (or module) made the first NaN, or the first
Inf by accident, in execution order. Used by ``forensics.py`` after a NaN/Inf step.

Every check here reads a flag back to the host (deliberate host syncs): this code runs only
in the one traced pass of a NaN episode.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from .._dist import local_tensor
from ..report.stability_advice import InputRange, op_display_name

__all__ = ["Trace", "TraceResult", "float_tensors", "has_nan", "in_backward", "ranges"]


@dataclass
class TraceResult:
    """What one traced forward pass found.

    ``kind``: ``"op"`` (a torch call made the first NaN from NaN-free inputs, or, when the
    pass made no NaN, the first Inf from finite inputs), ``"module"`` (a module did, and no
    torch call inside it was seen doing so), ``"propagated"`` (the model's output held NaN
    but the first NaN came in through an input no traced call made: a cached tensor),
    ``"weights"`` (weights NaN/Inf, or buffers NaN: ``layers``), ``"batch"`` (the model's
    input held NaN), or ``"finite"`` (no NaN, and no Inf made from finite inputs).
    ``inf_inputs``: the call's inputs held +-Inf (a -inf mask, say) but no NaN.
    """

    kind: str
    module: str | None = None
    op: str | None = None
    inputs: list[InputRange] = field(default_factory=list)
    output_dtype: str | None = None
    nan: bool = False
    inf_inputs: bool = False
    layers: list[str] = field(default_factory=list)


def float_tensors(value: Any, depth: int = 2) -> list[torch.Tensor]:
    """The floating-point tensors in a value (through tuples, lists and dict values), as
    rank-local tensors (a DTensor's own shard: no collective is ever run here)."""
    if isinstance(value, torch.Tensor):
        return [local_tensor(value).detach()] if value.is_floating_point() else []
    if depth == 0:
        return []
    if isinstance(value, Mapping):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in float_tensors(v, depth - 1)]
    return []


# Deliberate host syncs below: forensics runs only in the traced pass after a NaN/Inf step.
def has_nan(tensor: torch.Tensor) -> bool:
    return tensor.numel() > 0 and bool(torch.isnan(tensor).any())


def _finite(tensor: torch.Tensor) -> bool:
    return tensor.numel() == 0 or bool(torch.isfinite(tensor).all())


def _infinite_scalar(args: Any, kwargs: Mapping[str, Any]) -> bool:
    """An infinite Python number among the arguments: an Inf put there on purpose
    (``masked_fill(mask, float("-inf"))``, ``torch.full(..., -inf)``)."""
    values = [*args, *kwargs.values()]
    return any(isinstance(v, float) and math.isinf(v) for v in values)


def ranges(tensors: list[torch.Tensor], limit: int = 3) -> list[InputRange]:
    """min/max of the finite values of the first ``limit`` tensors (rare path: syncs)."""
    ranges = []
    for data in tensors[:limit]:
        finite = data[torch.isfinite(data)]
        if finite.numel() == 0:
            ranges.append(InputRange(math.nan, math.nan, _dtype(data), data.numel()))
            continue
        low, high = torch.aminmax(finite.float())
        ranges.append(InputRange(float(low), float(high), _dtype(data), data.numel()))
    return ranges


def _dtype(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).replace("torch.", "")


def in_backward() -> bool:
    task = getattr(torch._C, "_current_graph_task_id", None)
    return task is not None and task() != -1


class Trace(TorchFunctionMode):
    """One traced forward pass: checks every torch call's output, keeps the module stack.

    NaN comes first: the first call whose output holds NaN while its inputs held none made
    it (its inputs may hold +-Inf: Inf - Inf). An Inf alone is often meant (a -inf attention
    mask), so it counts only when made from finite inputs by a call that was not handed an
    infinite number; it is the answer when the pass makes no NaN, or when the NaN was made
    from Inf inputs after it (an exp that overflowed, then Inf - Inf downstream). Calls without
    floating-point tensor inputs (factories) and ``empty`` allocations (uninitialised memory,
    as FSDP's all-gather buffers) are not judged.
    """

    def __init__(self) -> None:
        super().__init__()
        self.nan_origin: TraceResult | None = None
        self.inf_origin: TraceResult | None = None
        self.nan_seen: TraceResult | None = None  # the first NaN, made before the pass
        self.stack: list[str] = []
        self._busy = False

    @property
    def done(self) -> bool:
        return self.nan_origin is not None

    def result(self, outputhas_nan: bool) -> TraceResult:
        nan = self.nan_origin
        if nan is not None:
            # NaN from Inf inputs, after an Inf made by accident (exp overflow, then
            # Inf - Inf downstream): the overflow is where it started.
            return self.inf_origin if nan.inf_inputs and self.inf_origin else nan
        if outputhas_nan and self.nan_seen is not None:
            return self.nan_seen
        return self.inf_origin or TraceResult("finite")

    def _judge(
        self, kind: str, op: str | None, outputs: list[torch.Tensor], args: Any, kwargs: Any
    ) -> None:
        inputs = float_tensors((args, kwargs))
        if not inputs or (op is not None and "empty" in op):
            return
        where = self.stack[-1] if self.stack else None
        if any(has_nan(t) for t in outputs):
            nan_in = any(has_nan(t) for t in inputs)
            found = TraceResult(
                kind if not nan_in else "propagated",
                module=where,
                op=op,
                inputs=ranges(inputs),
                output_dtype=_dtype(next(t for t in outputs if has_nan(t))),
                nan=True,
                inf_inputs=not nan_in and not all(_finite(t) for t in inputs),
            )
            if not nan_in:
                self.nan_origin = found
            elif self.nan_seen is None:
                self.nan_seen = found
            return
        if self.inf_origin is not None or all(_finite(t) for t in outputs):
            return
        if all(_finite(t) for t in inputs) and not _infinite_scalar(args, kwargs or {}):
            self.inf_origin = TraceResult(
                kind,
                module=where,
                op=op,
                inputs=ranges(inputs),
                output_dtype=_dtype(next(t for t in outputs if not _finite(t))),
            )

    def __torch_function__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not self.done and not self._busy:
            outputs = float_tensors(out)
            if outputs:
                self._busy = True
                try:
                    self._judge("op", op_display_name(func), outputs, args, kwargs)
                finally:
                    self._busy = False
        return out

    def module_done(self, args: Any, kwargs: Any, output: Any) -> None:
        """After a module's forward (the innermost name still on the stack)."""
        if self.done:
            return
        outputs = float_tensors(output)
        if outputs:
            self._busy = True
            try:
                self._judge("module", None, outputs, args, kwargs)
            finally:
                self._busy = False
