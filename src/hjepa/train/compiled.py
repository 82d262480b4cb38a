"""``train.compile=true``: the training step as two compiled regions, each one graph.

* :func:`forward_loss`: the model on a micro-batch and the objective, compiled with
  ``fullgraph=True`` and static shapes (token counts padded to buckets, :mod:`hjepa.data.buckets`:
  one graph per bucket). SIGReg's random directions of the step are drawn before it
  (:meth:`Objective.draws`), so the step number never enters the graph. AOTAutograd compiles
  its backward.
* :meth:`CompiledUpdate.__call__`: gradient clipping, the non-finite decision, the AdamW update
  (:func:`hjepa.train.optim.adamw_step_where`, weights and state untouched on a skipped step)
  and the EMA, one graph for the whole run: the learning rate, weight decay and momentum enter
  as 0-dim tensors that the host fills each step, not as floats a graph would be rebuilt for.

After the first steps a step runs the graphs, not the Python of the model, the loss, the
optimizer or the EMA; ``tests/test_compiled_step.py`` counts the graphs and graph breaks.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from hjepa.train.ema import ema_update
from hjepa.train.optim import AdamWGroup, adamw_groups, adamw_step_where, finite_step


def forward_loss(model: nn.Module, objective: nn.Module, x, index, views, second, draws):
    """The model's output on one micro-batch and the objective's ``(loss, terms)``."""
    return objective(model(x, index, views, second), draws=draws)


compiled_forward_loss = torch.compile(forward_loss, fullgraph=True, dynamic=False)


class CompiledUpdate:
    """Steps 4 and 5 of :meth:`hjepa.train.trainer.Trainer.train_step` as one compiled graph:
    clip, decide (every loss term and the gradient norm finite), AdamW, EMA (``ema_timing``:
    ``after_step``, ``before_step`` or None for no EMA)."""

    def __init__(
        self,
        optimizer: torch.optim.AdamW,
        params: list[Tensor],
        max_grad_norm: float,
        ema_pair: tuple[nn.Module, nn.Module] | None,
        ema_timing: str | None,
    ) -> None:
        self.optimizer, self.params, self.max_grad_norm = optimizer, params, max_grad_norm
        self.ema_pair, self.ema_timing = ema_pair, ema_timing
        device = params[0].device
        # lr, weight decay, EMA momentum: filled in place each step (no host-to-device copy).
        self.schedule = torch.zeros(3, dtype=torch.float64, device=device)
        self._graph = torch.compile(self._update, fullgraph=True, dynamic=False)

    def __call__(self, terms: Tensor, lr: float, weight_decay: float, momentum: float):
        """``(grad_norm, applied)`` of the step whose loss terms are ``terms``."""
        for slot, value in enumerate((lr, weight_decay, momentum)):
            self.schedule[slot].fill_(value)
        return self._graph(terms, self.schedule, adamw_groups(self.optimizer))

    def _update(
        self, terms: Tensor, schedule: Tensor, groups: list[AdamWGroup]
    ) -> tuple[Tensor, Tensor]:
        lr, weight_decay, momentum = schedule.unbind()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        applied = finite_step(terms, grad_norm)
        if self.ema_timing == "before_step":  # the ablation: EMA of the pre-step weights
            ema_update(*self.ema_pair, momentum, applied)
        adamw_step_where(groups, lr, weight_decay, applied)
        if self.ema_timing == "after_step":
            ema_update(*self.ema_pair, momentum, applied)
        return grad_norm, applied
