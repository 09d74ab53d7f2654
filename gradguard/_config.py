"""The guard's options: one list of keyword arguments, validated in one place.

``GuardOptions`` is the single source of the keyword arguments that ``gg.attach``,
``gg.GradGuard`` and every framework adapter (Lightning, Hugging Face...) accept;
``GuardConfig.from_options`` checks them at construction and resolves the shorthands
(``clip=1.0``, ``activations=True``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypedDict

from ._errors import ConfigurationError, check_choice, check_positive_int
from ._histograms import Histograms
from ._sinks import Sink
from .activations.monitor import ActivationMonitor
from .clip import resolve_clip
from .clip.base import ClipStrategy
from .detect import default_detectors
from .detect.base import Detector
from .detect.spike import SpikeDetector
from .recover.options import Recover

__all__ = ["GuardConfig", "GuardOptions", "NonfinitePolicy", "SpikePolicy"]

NonfinitePolicy = Literal["warn", "skip", "raise"]
SpikePolicy = Literal["ignore", "warn", "skip"]
UpdateRatio = bool | Literal["auto"]


class GuardOptions(TypedDict, total=False):
    """Keyword arguments of ``gg.attach`` / ``gg.GradGuard`` (see ``GradGuard`` for each)."""

    clip: float | ClipStrategy | None
    on_nonfinite: NonfinitePolicy
    on_spike: SpikePolicy
    spike: SpikeDetector | None
    activations: bool | ActivationMonitor
    log_every_n_steps: int
    sinks: Iterable[Sink]
    detectors: Sequence[Detector] | None
    histograms: bool | Histograms | None
    update_ratio: UpdateRatio
    prefix: str
    warn: bool
    repeat_every: int
    on_instability: Recover | None


@dataclass
class GuardConfig:
    """The validated, resolved options."""

    clip: ClipStrategy | None
    on_nonfinite: NonfinitePolicy
    on_spike: SpikePolicy
    spike: SpikeDetector
    activations: ActivationMonitor | None
    log_every_n_steps: int
    sinks: list[Sink]
    detectors: list[Detector]
    update_ratio: UpdateRatio
    prefix: str
    warn: bool
    repeat_every: int
    on_instability: Recover | None = None

    @classmethod
    def from_options(cls, options: GuardOptions) -> GuardConfig:
        known = set(GuardOptions.__annotations__)
        unknown = sorted(set(options) - known)
        if unknown:
            allowed = ", ".join(sorted(known))
            raise ConfigurationError(
                f"unknown option(s) {', '.join(unknown)}: expected some of {allowed}"
            )
        get: Any = options.get
        on_nonfinite = get("on_nonfinite", "warn")
        check_choice("on_nonfinite", on_nonfinite, ("warn", "skip", "raise"))
        on_spike = get("on_spike", "warn")
        check_choice("on_spike", on_spike, ("ignore", "warn", "skip"))
        spike = get("spike")
        if spike is not None and not isinstance(spike, SpikeDetector):
            raise ConfigurationError.bad_value(
                "spike", spike, "expected a gg.SpikeDetector(threshold=..., ...) or None"
            )
        activations = get("activations", True)
        if activations is True:
            monitor: ActivationMonitor | None = ActivationMonitor()
        elif activations is False or activations is None:
            monitor = None
        elif isinstance(activations, ActivationMonitor):
            monitor = activations
        else:
            raise ConfigurationError.bad_value(
                "activations", activations, "expected True, False or a gg.ActivationMonitor(...)"
            )
        detectors_option = get("detectors")
        if detectors_option is None:
            detectors = default_detectors()
        else:
            detectors = _instances(
                "detectors", detectors_option, Detector, "gg.GradientFlowDetector()"
            )
        histograms = get("histograms")
        if histograms is True or isinstance(histograms, Histograms):
            # A Detector-like part: it hands device tensors to the logging step's bulk copy.
            detectors.append(Histograms() if histograms is True else histograms)
        elif histograms is not None and histograms is not False:
            raise ConfigurationError.bad_value(
                "histograms", histograms, "expected True, False or a gg.Histograms(...)"
            )
        update_ratio = get("update_ratio", "auto")
        if update_ratio not in (True, False, "auto") or (
            update_ratio in (0, 1) and not isinstance(update_ratio, bool)
        ):
            raise ConfigurationError.not_one_of("update_ratio", update_ratio, (True, False, "auto"))
        prefix = get("prefix", "gradguard")
        if not isinstance(prefix, str) or not prefix or prefix.endswith("/"):
            raise ConfigurationError.bad_value(
                "prefix", prefix, "expected a non-empty str not ending in '/'"
            )
        recover = get("on_instability")
        if recover is not None and not isinstance(recover, Recover):
            raise ConfigurationError.bad_value(
                "on_instability", recover, "expected None or gg.Recover(...)"
            )
        if recover is not None:
            # The ladder's first rung is the skip: NaN/Inf and spiking steps are skipped.
            if on_nonfinite == "raise":
                raise ConfigurationError(
                    "on_nonfinite='raise' contradicts on_instability=gg.Recover(...), which "
                    "skips NaN/Inf steps and escalates: expected on_nonfinite='warn' or 'skip'"
                )
            on_nonfinite = "skip"
            if on_spike == "warn":
                on_spike = "skip"
        warn = get("warn", True)
        if not isinstance(warn, bool):
            raise ConfigurationError.bad_value("warn", warn, "expected True or False")
        return cls(
            clip=resolve_clip(get("clip")),
            on_nonfinite=on_nonfinite,
            on_spike=on_spike,
            spike=spike if spike is not None else SpikeDetector(),
            activations=monitor,
            log_every_n_steps=check_positive_int("log_every_n_steps", get("log_every_n_steps", 50)),
            sinks=_sinks(get("sinks", ())),
            detectors=detectors,
            update_ratio=update_ratio,
            prefix=prefix,
            warn=warn,
            repeat_every=check_positive_int("repeat_every", get("repeat_every", 100)),
            on_instability=recover,
        )


def _instances(name: str, value: Any, kind: type, example: str) -> list[Any]:
    """A list of ``kind`` instances, or a ConfigurationError saying what was wrong."""
    if isinstance(value, (kind, str, bytes)) or not isinstance(value, Iterable):
        raise ConfigurationError.bad_value(
            name, value, f"expected a list of {kind.__name__} instances, e.g. [{example}]"
        )
    items = list(value)
    for item in items:
        if isinstance(item, type):
            raise ConfigurationError.bad_value(
                name, item, f"pass an instance, e.g. [{item.__name__}()], not the class"
            )
        if not isinstance(item, kind):
            raise ConfigurationError.bad_value(
                name, item, f"expected {kind.__name__} instances, e.g. [{example}]"
            )
    return items


def _sinks(value: Any) -> list[Sink]:
    if isinstance(value, Sink) and not isinstance(value, type):
        # One sink where a list belongs: say how to write it, not just that it is wrong.
        raise ConfigurationError.bad_value(
            "sinks", value, f"expected a list of sinks: sinks=[{type(value).__name__}(...)]"
        )
    if value is None or isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise ConfigurationError.bad_value(
            "sinks",
            value,
            "expected a list of sinks, e.g. sinks=[gg.MemorySink()] (or () for none)",
        )
    sinks = list(value)
    for sink in sinks:
        if isinstance(sink, type):
            raise ConfigurationError.bad_value(
                "sinks", sink, f"pass an instance, e.g. [{sink.__name__}()], not the class"
            )
        if not isinstance(sink, Sink):
            raise ConfigurationError.bad_value(
                "sinks", sink, "each sink needs log_scalars, log_event, flush and close"
            )
    return sinks
