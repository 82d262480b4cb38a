"""The two critical bugs of the H-JEPA code base reviewed in ``seed/``, reproduced for the
ablation, and the review's proposed middle ground.

``hjepa ablate``'s default study (experiments/ablate.py) trains with each bug, with each fix
and with both fixed, to measure what each cost. They are selected by the same config keys as
the algorithm's own settings once :func:`install` has registered them with the core (the
``hjepa`` command calls it; Python callers call it themselves, else the trainer and the mask
sampler refuse the value with a message that says so):

``train.ema_timing=before_step``
    The EMA of the target encoder is taken from the context encoder's weights *before* the
    optimizer step instead of after it, so the target always trails by one step. Implemented
    as an optimizer step pre-hook, at the momentum of the step about to be taken; a skipped
    (non-finite) step takes no EMA either. Under fp16 a step the GradScaler skips takes no EMA
    either (the reviewed code took it regardless).
``masking.scale_mode=geometric``
    Level ``l`` draws target blocks of scale ``target_scale * 2**l`` (clipped to 1), and only
    the level-0 targets are removed from the context. The reviewed code gave each level its own
    context, so its coarse targets (60-80 % of the image at level 2) overlapped what the encoder
    saw and their prediction was nearly a copy; with one shared context, removing only the
    level-0 blocks reproduces that (removing all of them would leave no context).
``masking.scale_mode=gentle``
    The review's compromise: level ``l`` draws blocks of its own with the scale range shifted
    by ``0, .03, .05, .07`` (``+.02`` per further level), every level's footprint hidden from
    the context.
"""

from __future__ import annotations

from hjepa.data.masks import FOOTPRINT_RULES, FootprintRule
from hjepa.train.ema import ema_update
from hjepa.train.trainer import EMA_TIMINGS, Trainer

_GENTLE_SHIFT = (0.0, 0.03, 0.05, 0.07)


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


def ema_before_step(trainer: Trainer) -> None:
    """Set ``trainer`` up to take its EMA from the weights before each optimizer step."""
    model = trainer.model

    def update(optimizer, args, kwargs) -> None:
        momentum = trainer.momentum_at(trainer.step)  # the step about to be taken
        ema_update(model.target_encoder, model.context_encoder, momentum)

    trainer.ema_after_step = False
    trainer.optimizer.register_step_pre_hook(update)


def install() -> None:
    """Make the reproductions selectable by their config values (calling it again is harmless)."""
    EMA_TIMINGS["before_step"] = ema_before_step
    FOOTPRINT_RULES["geometric"] = GEOMETRIC
    FOOTPRINT_RULES["gentle"] = GENTLE
