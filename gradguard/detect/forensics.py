"""Forward forensics: after a NaN/Inf gradient, name the call and the module that made the
first non-finite value of the next training forward pass.

Nothing is installed until a step's gradient is NaN/Inf. Then, for the next training
forward pass only, every module's ``forward`` is wrapped (an instance attribute that
shadows the class's method, removed afterwards), and the outermost one runs inside a
``TorchFunctionMode`` that looks at the output of every torch call (``torch.log``,
``x / y``, ``F.linear``...) in execution order. A non-finite output whose inputs were all
finite is where the trouble starts: its call, the innermost module running it and the range
of its inputs make the report. Module outputs are checked too, for what no torch call shows.
Before tracing, the weights and the batch are checked: once the optimizer has applied a NaN
gradient, every output is NaN from the first layer on, and tracing would only name that.

The mode lives strictly inside the outermost ``forward`` call, so it nests correctly with
the activation monitor's (which enters in a forward pre-hook and leaves in a post-hook).

Cost: none on ordinary steps. The traced pass reads flags back to the host for every torch
call (deliberate host syncs, in this rare path only), so that pass runs several times slower
than usual, once per NaN episode and at most ``max_traces`` times per run.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .._debounce import Finding
from .._dist import local_tensor
from .._errors import check_positive_int
from .._stats import StepStats
from ..report.advice import InputRange, nonfinite_source_text, op_display_name
from .base import Detector

__all__ = ["NonfiniteForensics", "TraceResult"]


@dataclass
class TraceResult:
    """What one traced forward pass found.

    ``kind``: ``"op"`` (a torch call made the first non-finite value from finite inputs),
    ``"module"`` (a module did, and no torch call inside it was seen doing so),
    ``"propagated"`` (the first non-finite output came from a non-finite input that no
    traced call produced: a buffer, or a tensor made outside the pass), ``"weights"`` (the
    weights were already non-finite: ``layers``), ``"batch"`` (the model's input was), or
    ``"finite"`` (every output was finite).
    """

    kind: str
    module: str | None = None
    op: str | None = None
    inputs: list[InputRange] = field(default_factory=list)
    output_dtype: str | None = None
    nan: bool = False
    layers: list[str] = field(default_factory=list)


def _float_tensors(value: Any, depth: int = 2) -> list[torch.Tensor]:
    """The floating-point tensors in a value (through tuples, lists and dict values)."""
    if isinstance(value, torch.Tensor):
        return [value] if value.is_floating_point() else []
    if depth == 0:
        return []
    if isinstance(value, Mapping):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _float_tensors(v, depth - 1)]
    return []


def _finite(tensor: torch.Tensor) -> bool:
    # Deliberate host sync: forensics runs only in the traced pass after a NaN/Inf step.
    return tensor.numel() == 0 or bool(torch.isfinite(tensor).all())


def _ranges(tensors: list[torch.Tensor], limit: int = 3) -> list[InputRange]:
    """min/max of the finite values of the first ``limit`` tensors (rare path: syncs)."""
    ranges = []
    for tensor in tensors[:limit]:
        data = tensor.detach()
        finite = data[torch.isfinite(data)]
        if finite.numel() == 0:
            ranges.append(InputRange(math.nan, math.nan, _dtype(data), data.numel()))
            continue
        low, high = torch.aminmax(finite.float())
        ranges.append(InputRange(float(low), float(high), _dtype(data), data.numel()))
    return ranges


def _dtype(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).replace("torch.", "")


def _in_backward() -> bool:
    task = getattr(torch._C, "_current_graph_task_id", None)
    return task is not None and task() != -1


class _Trace(TorchFunctionMode):
    """One traced forward pass: checks every torch call's output, keeps the module stack."""

    def __init__(self) -> None:
        super().__init__()
        self.result: TraceResult | None = None
        self.stack: list[str] = []
        self._busy = False

    def _blame(self, kind_if_clean: str, outputs: list[torch.Tensor], inputs: Any) -> None:
        bad = next((t for t in outputs if not _finite(t)), None)
        if bad is None:
            return
        ins = _float_tensors(inputs)
        clean = all(_finite(t) for t in ins)
        self.result = TraceResult(
            kind=kind_if_clean if clean else "propagated",
            module=self.stack[-1] if self.stack else None,
            inputs=_ranges(ins),
            output_dtype=_dtype(bad),
            nan=bool(torch.isnan(bad).any()),  # Deliberate host sync (rare path).
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
        if self.result is None and not self._busy:
            outputs = _float_tensors(out)
            if outputs:
                self._busy = True
                try:
                    self._blame("op", outputs, (args, kwargs))
                    if self.result is not None:
                        self.result.op = op_display_name(func)
                finally:
                    self._busy = False
        return out

    def module_done(self, args: Any, kwargs: Any, output: Any) -> None:
        """After a module's forward (the innermost name still on the stack)."""
        if self.result is not None:
            return
        outputs = _float_tensors(output)
        if outputs:
            self._busy = True
            try:
                self._blame("module", outputs, (args, kwargs))
            finally:
                self._busy = False


class NonfiniteForensics(Detector):
    """Names where a NaN/Inf starts, by tracing the training forward pass that follows a
    step with a NaN/Inf gradient (see the module docstring): Event kind
    ``nonfinite_source``, at most one per NaN episode and ``max_traces`` per run.

    Works best with ``on_nonfinite="skip"``: the weights stay finite, so the next pass
    makes the NaN again where it was made the first time. With ``"warn"`` the optimizer
    has applied the NaN, and the report says so and which layers' weights are gone. Only
    the forward pass is seen: a NaN made in the loss or in the backward pass is reported as
    "the forward pass was finite", with what to check there. A ``torch.compile``'d model is
    not traced (wrapping its modules would force a recompilation).
    """

    kinds: ClassVar[tuple[str, ...]] = ("nonfinite_source",)

    def __init__(self, *, max_traces: int = 3) -> None:
        self.max_traces = check_positive_int("max_traces", max_traces, allow_zero=True)
        self.traces = 0
        self._trigger = -1  # the NaN step that armed the current trace
        self._last_nonfinite: int | None = None
        self._wrapped: list[tuple[nn.Module, Any]] = []  # (module, its own forward or None)
        self._trace: _Trace | None = None
        self._next_step = 0  # the step whose forward pass runs next
        self._done: tuple[int, int, TraceResult] | None = None  # (trigger, traced step, result)
        self.last_trace: TraceResult | None = None

    def __repr__(self) -> str:
        return f"NonfiniteForensics(max_traces={self.max_traces})"

    @property
    def armed(self) -> bool:
        """Whether the next training forward pass will be traced."""
        return bool(self._wrapped)

    # ------------------------------------------------------------------ detector
    def on_step(self, stats: StepStats) -> list[Finding]:
        context = self.context
        if context is None:
            return []
        findings = []
        if self._done is not None and stats.step >= self._done[1]:
            (trigger, traced, result), self._done = self._done, None
            # The traced step's own gradient says whether the NaN is made after the forward.
            again = stats.nonfinite if stats.step == traced else True
            if result.kind != "finite" or again:
                findings.append(self._finding(trigger, traced, result))
            # A finite pass with a finite gradient: the NaN was that batch's alone (kept
            # in last_trace, not announced: there is nothing to act on).
        if stats.nonfinite:
            fresh = (
                self._last_nonfinite is None
                or stats.step - self._last_nonfinite > context.repeat_every
            )
            self._last_nonfinite = stats.step
            if fresh and not self.armed and self.traces < self.max_traces and not context.compiled:
                self._arm(stats.step)
        return findings

    def on_step_end(self, next_step: int) -> None:
        self._next_step = next_step

    def unbind(self) -> None:
        self._disarm()
        super().unbind()

    def _finding(self, trigger: int, traced: int, result: TraceResult) -> Finding:
        context = self.context
        assert context is not None
        message, advice = nonfinite_source_text(
            result.kind,
            trigger,
            traced,
            module=result.module,
            op=result.op,
            inputs=result.inputs,
            output_dtype=result.output_dtype,
            nan=result.nan,
            layers=result.layers,
            policy=context.on_nonfinite,
        )
        where = (result.module,) if result.module else tuple(result.layers[:3])
        return Finding(
            kind="nonfinite_source",
            layers=where,
            value=math.nan,
            message=message,
            advice=advice,
            severity="error",
            details={"trace": result.kind, "op": result.op, "trigger_step": trigger},
            max_gap=context.repeat_every,
            remind_every=context.repeat_every,
            counted="traces",
        )

    # ------------------------------------------------------------------ arming
    def _arm(self, trigger: int) -> None:
        context = self.context
        assert context is not None
        self._trigger = trigger
        for name, module in context.model.named_modules():
            own = module.__dict__.get("forward")
            # An instance attribute shadows the class's forward for nn.Module.__call__.
            module.forward = self._wrap(module, name, module.forward)
            self._wrapped.append((module, own))

    def _wrap(
        self, module: nn.Module, name: str, forward: Callable[..., Any]
    ) -> Callable[..., Any]:
        def traced_forward(*args: Any, **kwargs: Any) -> Any:
            trace = self._trace
            if trace is not None:  # inside the traced pass: a nested module
                if name:
                    trace.stack.append(name)
                try:
                    out = forward(*args, **kwargs)
                    trace.module_done(args, kwargs, out)
                    return out
                finally:
                    if name:
                        trace.stack.pop()
            if not (module.training and torch.is_grad_enabled()) or _in_backward():
                return forward(*args, **kwargs)  # not a training pass: wait for one
            return self._traced(name, forward, args, kwargs)

        return traced_forward

    def _traced(self, name: str, forward: Callable[..., Any], args: Any, kwargs: Any) -> Any:
        """The outermost training forward call while armed."""
        trigger = self._trigger
        early = self._precheck(args, kwargs)
        if early is not None:
            self._finish(trigger, early)
            return forward(*args, **kwargs)
        trace = self._trace = _Trace()
        try:
            with trace:
                if name:
                    trace.stack.append(name)
                out = forward(*args, **kwargs)
                trace.module_done(args, kwargs, out)
                return out
        finally:
            self._finish(trigger, trace.result or TraceResult("finite"))

    def _precheck(self, args: Any, kwargs: Any) -> TraceResult | None:
        """The weights and the batch, before tracing (rare path: host reads)."""
        context = self.context
        assert context is not None
        layout = context.layout
        params = [local_tensor(p).detach() for p in layout.params]
        if params:
            norms = torch.stack([n.float() for n in torch._foreach_norm(params)])
            finite = torch.isfinite(norms).tolist()  # Deliberate host sync (rare path).
            bad = {layout.names[layout.param_layer[i]] for i, ok in enumerate(finite) if not ok}
            if bad:
                return TraceResult("weights", layers=[n for n in layout.names if n in bad])
        batch = _float_tensors((args, kwargs))
        if any(not _finite(t) for t in batch):
            return TraceResult("batch", inputs=_ranges(batch))
        return None

    def _finish(self, trigger: int, result: TraceResult) -> None:
        self.traces += 1
        self.last_trace = result
        self._done = (trigger, self._next_step, result)
        self._disarm()

    def _disarm(self) -> None:
        for module, own in self._wrapped:
            if own is not None:
                module.forward = own
            else:
                module.__dict__.pop("forward", None)
        self._wrapped.clear()
        self._trace = None

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"traces": self.traces}

    def check_state(self, state: Mapping[str, Any]) -> None:
        check_positive_int("state['traces']", state.get("traces", 0), allow_zero=True)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.traces = int(state.get("traces", 0))
