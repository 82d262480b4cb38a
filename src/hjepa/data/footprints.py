"""Per-level target footprints of their own: the ``masking.scale_mode`` values besides
``constant`` (where every level reuses the level-0 target blocks).

``geometric``
    The bug of the H-JEPA code base reviewed in ``seed/``, reproduced for the ablation: level
    ``l`` draws target blocks of scale ``target_scale * 2**l`` (clipped to 1), and only the
    level-0 targets are removed from the context. The reviewed code gave each level its own
    context, so its coarse targets (60-80 % of the image at level 2) overlapped what the encoder
    saw and their prediction was nearly a copy; with one shared context, removing only the
    level-0 blocks reproduces that (removing all of them would leave no context).
``gentle``
    The review's compromise: level ``l`` draws blocks of its own with the scale range shifted
    by ``0, .03, .05, .07`` (``+.02`` per further level), every level's footprint hidden from
    the context.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

_GENTLE_SHIFT = (0.0, 0.03, 0.05, 0.07)


@dataclass(frozen=True)
class FootprintRule:
    """Per-level target footprints drawn from blocks of their own.

    Attributes:
        scale: ``(target_scale, level) -> (lo, hi)``, the scale range of level ``level``'s blocks.
        hide_all: remove every level's footprint from the context (else only level 0's).
    """

    scale: Callable[[tuple[float, float], int], tuple[float, float]]
    hide_all: bool


def _geometric_scale(target_scale: tuple[float, float], level: int) -> tuple[float, float]:
    lo, hi = target_scale
    factor = 2.0**level
    return min(lo * factor, 1.0), min(hi * factor, 1.0)


def _gentle_scale(target_scale: tuple[float, float], level: int) -> tuple[float, float]:
    lo, hi = target_scale
    shift = _GENTLE_SHIFT[level] if level < 4 else 0.07 + 0.02 * (level - 3)
    return min(lo + shift, 1.0), min(hi + shift, 1.0)


GEOMETRIC = FootprintRule(_geometric_scale, hide_all=False)
GENTLE = FootprintRule(_gentle_scale, hide_all=True)

#: ``masking.scale_mode`` values other than ``constant``, by name.
FOOTPRINT_RULES: dict[str, FootprintRule] = {"gentle": GENTLE, "geometric": GEOMETRIC}
