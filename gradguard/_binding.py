"""What a guard builds when it attaches, and rebuilds when what it watches changes.

``Binding`` holds the model, the optimizer, the layer layout and everything derived from
it (the norm plan, the step pipeline, the detectors' context). ``refresh`` follows the
run: the first forward pass's depth order reorders the layout in place; layers unfrozen or
added (``WatchedSet``) and parameters moved to another device (``meta`` -> ``to_empty``)
rebuild it, every part carrying its state over.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ._config import GuardConfig
from ._depth import DepthRecorder
from ._dist import is_rank_zero, local_tensor
from ._errors import GradGuardError
from ._layers import LayerLayout, WatchedSet, discover_layers, merge_depth_order
from ._norms import GradNormComputer
from ._step import StepPipeline
from .detect.base import Detector, GuardContext, same_step

__all__ = ["Binding"]

# Update ratios need a copy of the parameters on logging steps; "auto" takes it only for
# models up to this many trainable elements (128M: 512 MB in fp32).
AUTO_UPDATE_RATIO_MAX_ELEMENTS = 2**27


@dataclass
class Binding:
    """Everything that exists only while a guard is attached."""

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
    _names: tuple[str, ...] | None = None
    handles: list[RemovableHandle] = field(default_factory=list)

    @property
    def names(self) -> tuple[str, ...]:
        """The layer names in depth order, as a tuple (made once per layout order: every
        step packet carries it)."""
        if self._names is None:
            self._names = tuple(self.layout.names)
        return self._names

    @classmethod
    def create(
        cls,
        config: GuardConfig,
        detectors: Sequence[Detector],
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        layout: LayerLayout,
        *,
        compiled: bool,
        eager_through: nn.Module | None = None,
        shown_step: Callable[[int], int] | None = None,
    ) -> Binding:
        """Bind the clip and every detector to ``layout``."""
        computer = GradNormComputer(layout, model)
        device = computer.device
        if config.update_ratio == "auto":
            # The global size (DTensor.numel()): every rank must decide alike, since the
            # update norms of sharded parameters are all-reduced on logging steps.
            numel = sum(p.numel() for p in layout.params)
            track_updates = numel <= AUTO_UPDATE_RATIO_MAX_ELEMENTS
        else:
            track_updates = bool(config.update_ratio)
        context = GuardContext(
            model=model,
            layout=layout,
            device=device,
            log_every_n_steps=config.log_every_n_steps,
            repeat_every=config.repeat_every,
            on_nonfinite=config.on_nonfinite,
            on_spike=config.on_spike,
            clip=config.clip,
            compiled=compiled,
            shown_step=shown_step if shown_step is not None else same_step,
        )
        if config.clip is not None:
            # First: a strategy may reject the layout (AGC's exclude).
            config.clip.bind(layout, device)
        for detector in detectors:
            detector.bind(context)
        depth = None
        if not layout.depth_known and (not compiled or eager_through is not None):
            depth = DepthRecorder(model, layout, eager_through)
        return cls(
            model=model,
            optimizer=optimizer,
            layout=layout,
            watched=WatchedSet(model, optimizer, layout),
            computer=computer,
            pipeline=StepPipeline(config, layout, computer, optimizer),
            context=context,
            device=device,
            rank_zero=is_rank_zero(),
            track_updates=track_updates,
            depth=depth,
            on_meta=device.type == "meta",
        )

    def release(self, detectors: Sequence[Detector], *, hooks: bool = True) -> None:
        """Undo everything the binding did to the model and optimizer."""
        self.pipeline.found_inf.restore()
        if hooks:
            for handle in self.handles:
                handle.remove()
            self.handles.clear()
        if self.depth is not None:
            self.depth.remove()
        for detector in detectors:
            if detector.context is not None:
                detector.unbind()

    def relayout(self, config: GuardConfig) -> None:
        """The layout was reordered in place: rebuild what indexes layers by position."""
        self._names = None
        self.computer = GradNormComputer(self.layout, self.model)
        self.pipeline = StepPipeline(config, self.layout, self.computer, self.optimizer)
        if config.clip is not None:
            config.clip.bind(self.layout, self.device)

    def learn_depth(self, config: GuardConfig) -> bool:
        """Apply the first forward pass's depth order once it was seen; True when it was."""
        if self.depth is None:
            return False
        order = self.depth.finish(self.layout)
        if order is None:
            return False
        self.depth = None
        self.layout.depth_known = True
        if order != self.layout.names:
            self.layout.reorder(order)
            self.relayout(config)
        return True

    def outdated(self) -> tuple[bool, bool]:
        """``(changed, moved)``: the trainable parameters changed, or moved device."""
        if self.on_meta:
            self._check_materialised()
        moved = self.layout.params[0].device != self.device
        return self.watched.changed(), moved

    def rebuilt(
        self, config: GuardConfig, detectors: Sequence[Detector], *, compiled: bool
    ) -> Binding:
        """A new binding for what the optimizer trains now, in the known depth order."""
        layout = discover_layers(self.model, self.optimizer)
        layout.reorder(merge_depth_order(self.layout.names, layout.names))
        layout.depth_known = self.layout.depth_known
        self.release(detectors, hooks=False)
        fresh = Binding.create(
            config,
            detectors,
            self.model,
            self.optimizer,
            layout,
            compiled=compiled,
            shown_step=self.context.shown_step,
        )
        fresh.handles = self.handles
        return fresh

    def blind_spots(self, config: GuardConfig) -> list[str]:
        """What the guard cannot observe on this model, in plain words."""
        spots = []
        if self.context.compiled:
            spots.append(
                "the model runs through torch.compile: activations are not sampled"
                + (
                    ""
                    if self.layout.depth_known
                    else " and the depth order is the modules' registration order"
                )
            )
        fused_rnn = sorted(
            {type(m).__name__ for m in self.model.modules() if isinstance(m, nn.RNNBase)}
        )
        if fused_rnn and config.activations is not None:
            spots.append(f"{'/'.join(fused_rnn)} activations run inside fused kernels: not sampled")
        if self.watched.unowned:
            spots.append(
                f"{self.watched.unowned} optimizer parameter(s) outside the model: not watched"
            )
        return spots

    def _check_materialised(self) -> None:
        """Parameters watched on ``meta`` must have been materialised in place."""
        if any(local_tensor(p).device.type == "meta" for p in self.layout.params):
            raise GradGuardError(
                "the optimizer steps parameters that are still on the 'meta' device: the model "
                "was materialised (to_empty()) after the optimizer was built, which makes new "
                "parameter objects. Build the optimizer after to_empty() (and attach then), or "
                "call torch.__future__.set_swap_module_params_on_conversion(True) before it."
            )
        self.on_meta = False
