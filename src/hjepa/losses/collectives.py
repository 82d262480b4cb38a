"""Collectives that keep the autograd graph, for losses computed on the global batch.

Under DDP every rank evaluates the *same* global loss (built from statistics reduced over all
ranks) and DDP then averages the parameter gradients. For that average to equal the gradient of
the global loss, the backward of a reduction must sum the incoming gradients over ranks: the
backward of ``all_reduce(SUM)`` is ``all_reduce(SUM)`` and the backward of ``all_gather`` is
``reduce_scatter(SUM)``. The gradient a rank sees for its own shard is therefore
``world_size`` times that shard's slice of the single-process gradient; DDP's averaging divides
that factor out again.

A plain ``torch.distributed.all_reduce`` works in place on ``.data`` outside autograd: the
result silently carries no gradient from the other ranks (and none at all through the reduced
tensor). We use the functional collectives, which register their backward with autograd; they
replace ``torch.distributed.nn.functional``, deprecated in PyTorch 2.13 with a warning per call.

Every function is the identity (or its single-process equivalent) when ``torch.distributed``
is not initialised or the world has one process.
"""

from __future__ import annotations

import torch.distributed as dist
from torch import Tensor


def _functional_collectives():
    # Imported on first use: builds without distributed support cannot import it, and
    # single-process runs never need it.
    import torch.distributed._functional_collectives as funcol

    return funcol


def is_distributed() -> bool:
    """True when ``torch.distributed`` is initialised with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Number of processes in the default group (1 when not distributed)."""
    return dist.get_world_size() if is_distributed() else 1


def all_reduce_sum(x: Tensor) -> Tensor:
    r"""Sum of ``x`` over all ranks, differentiable: :math:`y = \sum_r x_r`.

    Backward sums the incoming gradients over ranks (see the module docstring).
    """
    if not is_distributed():
        return x
    funcol = _functional_collectives()
    return funcol.wait_tensor(funcol.all_reduce(x, "sum", dist.group.WORLD))


def all_gather_cat(x: Tensor) -> Tensor:
    """Concatenate ``x`` from all ranks along dim 0 (rank order), differentiable.

    Every rank must pass the same shape (DDP with ``drop_last=True`` gives equal shards).
    Backward returns to each rank the sum over ranks of the gradient of its own rows.
    """
    if not is_distributed():
        return x
    funcol = _functional_collectives()
    gathered = funcol.all_gather_single_autograd(x.contiguous(), 0, dist.group.WORLD)
    return funcol.wait_tensor(gathered)
