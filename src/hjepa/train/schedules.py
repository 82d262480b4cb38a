"""Per-step schedules of the learning rate, weight decay and EMA momentum.

All are pure functions of the optimizer step, so a resumed run recomputes them exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def warmup_cosine(step: int, total: int, warmup: int, start: float, peak: float, final: float):
    """Linear ``start -> peak`` over ``warmup`` steps, then cosine to ``final`` at ``total``."""
    if step < warmup:
        return start + (peak - start) * step / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return final + 0.5 * (peak - final) * (1.0 + math.cos(math.pi * progress))


def cosine(step: int, total: int, start: float, final: float) -> float:
    """Cosine from ``start`` (step 0) to ``final`` (step ``total``); I-JEPA's weight decay."""
    progress = min(1.0, step / max(1, total))
    return final + 0.5 * (start - final) * (1.0 + math.cos(math.pi * progress))


def linear(step: int, total: int, start: float, final: float) -> float:
    """Linear ``start -> final`` over ``total`` steps; I-JEPA's EMA momentum (0.996 -> 1.0)."""
    return start + (final - start) * min(1.0, step / max(1, total))


@dataclass(frozen=True)
class RunSchedules:
    """A run's per-step values, from its optimizer step: the learning rate (linear warmup from
    ``start_lr`` to ``lr``, then cosine to ``final_lr``), the weight decay (cosine from
    ``weight_decay`` to ``final_weight_decay``) and the EMA momentum (linear from ``ema_start``
    to ``ema_end``), over ``total_steps``."""

    total_steps: int
    warmup: int
    start_lr: float
    lr: float
    final_lr: float
    weight_decay: float
    final_weight_decay: float
    ema_start: float
    ema_end: float

    def lr_at(self, step: int) -> float:
        return warmup_cosine(
            step, self.total_steps, self.warmup, self.start_lr, self.lr, self.final_lr
        )

    def wd_at(self, step: int) -> float:
        return cosine(step, self.total_steps, self.weight_decay, self.final_weight_decay)

    def momentum_at(self, step: int) -> float:
        return linear(step, self.total_steps, self.ema_start, self.ema_end)
