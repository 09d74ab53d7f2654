"""Clip strategies: each computes a scale on the device and applies it as a multiply.

``NormClip`` and ``ValueClip`` are torch's fixed clips; ``AutoClip``, ``ZClip`` and
``AGC`` adapt the limit to the run. Write your own by subclassing ``ClipStrategy`` (see
``gradguard.clip.base``).
"""

from __future__ import annotations

from .._errors import ConfigurationError
from .agc import AGC
from .autoclip import AutoClip
from .base import ClipContext, ClipResult, ClipStrategy, clip_coef, total_coef
from .norm import NormClip, ValueClip
from .zclip import ZClip

__all__ = [
    "AGC",
    "AutoClip",
    "ClipContext",
    "ClipResult",
    "ClipStrategy",
    "NormClip",
    "ValueClip",
    "ZClip",
    "clip_coef",
    "resolve_clip",
    "total_coef",
]


def resolve_clip(clip: object) -> ClipStrategy | None:
    """``None`` | a positive float (``NormClip``) | a ``ClipStrategy`` instance."""
    if clip is None or isinstance(clip, ClipStrategy):
        return clip
    if isinstance(clip, (int, float)) and not isinstance(clip, bool):
        if not clip > 0 or clip == float("inf"):
            raise ConfigurationError.bad_value(
                "clip", clip, "a float means the max global norm and must be > 0 and finite"
            )
        return NormClip(max_norm=float(clip))
    if isinstance(clip, type) and issubclass(clip, ClipStrategy):
        raise ConfigurationError.bad_value(
            "clip", clip, f"pass an instance, e.g. clip=gg.{clip.__name__}(), not the class"
        )
    raise ConfigurationError.bad_value(
        "clip",
        clip,
        "expected None, a positive float (max norm), or one of gradguard's clip strategies: "
        "NormClip, ValueClip, AutoClip, ZClip, AGC",
    )
