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
from typing import Any, ClassVar

import torch
from torch import nn

from .._debounce import Finding
from .._dist import local_tensor
from .._errors import check_positive_int
from .._stats import StepStats
from ..report.stability_advice import nonfinite_source_text
from .base import Detector
from .trace import Trace, TraceResult, float_tensors, has_nan, in_backward, ranges

__all__ = ["NonfiniteForensics", "TraceResult"]


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
        self._trace: Trace | None = None
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
        trigger, traced = context.shown_step(trigger), context.shown_step(traced)
        message, advice = nonfinite_source_text(
            result.kind,
            trigger,
            traced,
            module=result.module,
            op=result.op,
            inputs=result.inputs,
            output_dtype=result.output_dtype,
            nan=result.nan,
            inf_inputs=result.inf_inputs,
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
            # A diagnosis of the NaN/Inf Event (an error already, and already alerted): a
            # warning, so that dashboards alerting on errors do not page twice.
            severity="warning",
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
            try:
                # An instance attribute shadows the class's forward for nn.Module.__call__.
                module.forward = self._wrap(module, name, module.forward)
            except (AttributeError, RuntimeError, TypeError):
                continue  # a ScriptModule and the like: its calls are still traced as ops
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
            if not (module.training and torch.is_grad_enabled()) or in_backward():
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
        trace = self._trace = Trace()
        out: Any = None
        try:
            with trace:
                if name:
                    trace.stack.append(name)
                out = forward(*args, **kwargs)
                trace.module_done(args, kwargs, out)
            return out
        finally:
            output_nan = any(has_nan(t) for t in float_tensors(out))
            self._finish(trigger, trace.result(output_nan))

    def _precheck(self, args: Any, kwargs: Any) -> TraceResult | None:
        """The weights, the buffers and the batch, before tracing (rare path: host reads).

        Weights must be finite; buffers and the batch must hold no NaN (an Inf there may be
        meant: a registered -inf mask, an additive attention mask passed in)."""
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
        buffers = [
            name.rpartition(".")[0] or "root"
            for name, buffer in context.model.named_buffers()
            if buffer.is_floating_point() and has_nan(local_tensor(buffer))
        ]
        if buffers:
            return TraceResult("buffers", layers=sorted(set(buffers)))
        batch = float_tensors((args, kwargs))
        if any(has_nan(t) for t in batch):
            return TraceResult("batch", inputs=ranges(batch))
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
