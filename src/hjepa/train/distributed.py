"""Data-parallel training over processes (``torchrun``), one GPU or CPU process per rank.

Launch one process per GPU (or several CPU processes) with ``torchrun``, which sets ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK`` (and the rendezvous) for every process::

    torchrun --nproc_per_node 8 -m hjepa train --config imagenet100_vits16
    torchrun --nnodes 2 --node_rank 0 --nproc_per_node 8 \\
        --rdzv_backend c10d --rdzv_endpoint HOST:29500 -m hjepa train --config imagenet1k_vitb16

Without those variables training runs in one process. What makes ``N`` ranks compute what one
process computes on the same global batch:

* **Data.** ``train.batch_size`` is the global batch of an optimizer step; each rank loads
  ``batch_size / (world_size * accum_steps)`` images per micro-batch, rank ``r`` the global
  positions ``r, r + world_size, ...`` of the epoch's permutation.
* **Randomness.** Crops, flips and masks are drawn for the whole global micro-batch from
  generators seeded by ``(train.seed, micro-batch)`` (identical on every rank) and each rank
  keeps its rows; so an image's crop and masks depend only on its global position. Masks are
  truncated to the global batch's minimum token counts, as in one process. Drop path, the only
  draw made per rank, is seeded by ``(train.seed, micro-batch, rank)``.
* **Gradients.** The trainable modules (context encoder, predictor, heads) are wrapped in
  ``DistributedDataParallel``, which averages their gradients; the target encoder is excluded
  from it (no gradient, no broadcast) and every rank applies the same EMA update to its copy.
  The prediction loss is a mean over equal shards, so the average of the ranks' gradients is
  the gradient of the global mean. SIGReg sums its empirical characteristic functions over
  ranks with gradient (:mod:`hjepa.losses.collectives`), so it is the statistic of the global
  batch.
* **Side effects.** Rank 0 alone writes logs, the progress bar, probes and checkpoints; every
  rank reads ``last.pt`` on resume. Logged losses are averaged over ranks.

Backend: NCCL when the ranks use CUDA GPUs, Gloo on the CPU.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from hjepa.config import ConfigError


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # this module created the process group (and destroys it)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self) -> slice:
        """This rank's rows of a global batch: ``rank, rank + world_size, ...``."""
        return slice(self.rank, None, self.world_size)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value else default
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} must be an integer") from None


def setup(device: torch.device) -> tuple[DistEnv, torch.device]:
    """Join the job torchrun describes (or the process group already initialised).

    Returns this rank's :class:`DistEnv` and device: with several ranks on CUDA, rank ``r`` of
    a node uses GPU ``LOCAL_RANK``.
    """
    initialised = dist.is_available() and dist.is_initialized()
    if initialised:
        rank, world = dist.get_rank(), dist.get_world_size()
        local = _env_int("LOCAL_RANK", rank)
    else:
        rank, world = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
        local = _env_int("LOCAL_RANK", 0)
    if world <= 1:
        return DistEnv(), device
    if device.type == "mps":
        raise ConfigError("multi-process training needs CUDA GPUs or the CPU: train.device=cpu")
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise ConfigError(
                f"LOCAL_RANK={local} but this node has {torch.cuda.device_count()} GPU(s): "
                "start at most one process per GPU (torchrun --nproc_per_node)"
            )
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not initialised:
        if not dist.is_available():
            raise ConfigError("this PyTorch build has no torch.distributed; run one process")
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    return DistEnv(rank, world, local, owns_group=not initialised), device


def cleanup(env: DistEnv) -> None:
    """Destroy the process group if :func:`setup` created it."""
    if env.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def wrap_trainable(model: nn.Module, frozen: nn.Module | None, env: DistEnv, device: torch.device):
    """``model`` in ``DistributedDataParallel`` (or ``model`` itself in one process).

    ``frozen`` (the target encoder, a submodule of ``model``) is excluded from DDP: its
    parameters are neither broadcast nor reduced (each rank updates it by EMA). None when
    there is no separate target encoder (``model.target=shared``).
    """
    if not env.enabled:
        return model
    if frozen is not None:
        prefix = next(name for name, mod in model.named_modules() if mod is frozen)
        ignored = [f"{prefix}.{name}" for name, _ in frozen.named_parameters()]
        ignored += [f"{prefix}.{name}" for name, _ in frozen.named_buffers()]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignored)
    # Buffers are fixed position tables: nothing to keep in sync at every forward. The keyword
    # was renamed in PyTorch 2.13 (the old one still works there, with a warning).
    accepted = inspect.signature(DistributedDataParallel.__init__).parameters
    no_sync = "forward_sync_buffers" if "forward_sync_buffers" in accepted else "broadcast_buffers"
    return DistributedDataParallel(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        gradient_as_bucket_view=True,
        **{no_sync: False},
    )


def mean_over_ranks(x: Tensor, env: DistEnv) -> Tensor:
    """Average of ``x`` over ranks (no gradient): logged values are those of the global batch."""
    if not env.enabled:
        return x
    x = x.detach().clone()
    dist.all_reduce(x)
    return x / env.world_size


def rank_seed(seed: int, env: DistEnv) -> int:
    """Seed for per-rank draws (drop path): rank 0 keeps ``seed``, other ranks get others."""
    return (seed + env.rank * 0x9E3779B97F4A7C15) % (2**63 - 1)


def barrier(env: DistEnv) -> None:
    """Wait for every rank (no-op in one process)."""
    if env.enabled:
        dist.barrier(device_ids=[env.local_rank] if dist.get_backend() == "nccl" else None)


class NullLogger:
    """The metrics sink of ranks other than 0: they log nothing."""

    def log(self, step: int, kind: str, values: dict) -> None:
        pass

    def close(self) -> None:
        pass


def sum_over_ranks(value: int, env: DistEnv, device: torch.device) -> int:
    """Sum of a per-rank count (e.g. skipped images); every rank must call it."""
    if not env.enabled:
        return value
    total = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(total)
    return int(total.item())


def max_over_ranks(value: int, env: DistEnv, device: torch.device) -> int:
    """Largest of a per-rank integer (e.g. a stop signal seen); every rank must call it."""
    if not env.enabled:
        return value
    top = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(top, op=dist.ReduceOp.MAX)
    return int(top.item())
