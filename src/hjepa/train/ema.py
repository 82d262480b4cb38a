"""Exponential moving average of the context encoder into the target encoder."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn


@torch.no_grad()
def ema_update(
    target: nn.Module, online: nn.Module, momentum: float, applied: Tensor | None = None
) -> None:
    r"""In place, for every parameter pair: :math:`\xi \leftarrow m\,\xi + (1 - m)\,\theta`.

    Called once per optimizer step, *after* ``optimizer.step()``, so the target follows the
    weights the step just produced. ``applied`` (a bool 0-dim tensor): where False the target
    stays exactly as it is (a skipped step), decided on the device.
    """
    t_params = list(target.parameters())
    o_params = [p.detach() for p in online.parameters()]
    if len(t_params) != len(o_params):
        raise ValueError("target and online networks must have the same parameters")
    if applied is None:
        # xi + (1 - m)(theta - xi): the same average in one pass over the weights, not two.
        torch._foreach_lerp_(t_params, o_params, 1.0 - momentum)
        return
    # The same lerp with weight 1 - m, or 0 (xi + 0 * (theta - xi) = xi) for a skipped step. A
    # 0-dim weight would be read on the host; one weight per tensor (a broadcast view) is not,
    # and rounds exactly as the scalar lerp above.
    weight = torch.where(applied, 1.0 - momentum, 0.0).to(t_params[0].dtype)
    torch._foreach_lerp_(t_params, o_params, [weight.expand_as(t) for t in t_params])


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

    def before_step(opt, args, kwargs) -> None:
        # A step the trainer skips on the device (hjepa.train.optim.step_unless) still calls
        # step(); its found_inf flag keeps the target as it is then.
        found_inf = getattr(opt, "found_inf", None)
        ema_update(target, online, momentum(), None if found_inf is None else found_inf == 0)

    optimizer.register_step_pre_hook(before_step)
