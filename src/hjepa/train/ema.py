"""Exponential moving average of the context encoder into the target encoder."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, momentum: float) -> None:
    r"""In place, for every parameter pair: :math:`\xi \leftarrow m\,\xi + (1 - m)\,\theta`.

    Called once per optimizer step, *after* ``optimizer.step()``, so the target follows the
    weights the step just produced.
    """
    t_params = list(target.parameters())
    o_params = [p.detach() for p in online.parameters()]
    if len(t_params) != len(o_params):
        raise ValueError("target and online networks must have the same parameters")
    # xi + (1 - m)(theta - xi): the same average in one pass over the weights instead of two.
    torch._foreach_lerp_(t_params, o_params, 1.0 - momentum)


def ema_before_each_step(
    optimizer: torch.optim.Optimizer,
    target: nn.Module,
    online: nn.Module,
    momentum: Callable[[], float],
) -> None:
    """``train.ema_timing=before_step``: the bug of the code base reviewed in ``seed/``,
    reproduced for the ablation. The target takes its average of the weights *before* each
    optimizer step, so it always trails by one step, at ``momentum()``, the momentum of the step
    about to be taken. An optimizer pre-step hook: a step that is skipped (non-finite, or by the
    fp16 GradScaler) takes no EMA either (the reviewed code took it regardless).
    """
    optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: ema_update(target, online, momentum())
    )
