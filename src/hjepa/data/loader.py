"""Deterministic, resumable, rank-sharded epoch iteration.

The order of epoch ``e`` is a permutation drawn from a generator seeded by
``(seed, e)`` alone, so it does not depend on how many epochs ran before,
on the process, or on a restart. With ``world_size`` ranks the permutation
is cut to a multiple of ``world_size`` (``drop_last``) or padded by wrapping
around (otherwise), and rank ``r`` takes positions ``r, r + world_size, ...``
(as ``DistributedSampler``): equal sizes, disjoint when not padded.
Resuming at batch ``k`` only slices the index list: skipped batches are
never loaded.

A dataset that serves training crops (``serves_train_crops``, e.g. an image folder's training
split) is asked for ``CropKey(index, seed)`` instead of ``index``, so its workers decode the
random resized crop from the whole image. The seed of an image is drawn by :func:`crop_seeds`
from the run seed, the micro-batch number (``epoch * len(loader) + batch``) and the image's
position in the global micro-batch (row ``j`` of rank ``r`` is position ``j * world_size + r``),
so the crops do not depend on the number of workers or ranks, or on a restart.

What a training step draws on the host for a micro-batch (its masks, its crop boxes) depends
only on the micro-batch number, so :func:`draws_ahead` runs those draws in DataLoader workers,
ahead of the step, by number: the process that trains then reads no value to draw them.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable, Iterator
from typing import TypeVar

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from hjepa.data.image_folder import CropKey
from hjepa.data.tensors import ImageTensors

_CROP_SEED_STREAM = 1  # keeps crop seeds apart from the order's (seed, epoch) stream
Drawn = TypeVar("Drawn")


def _ignore_ctrl_c(_worker_id: int) -> None:
    """Decoding workers leave Ctrl-C to the trainer: the terminal sends SIGINT to the whole
    process group, and a worker that died of it would break the step the trainer finishes.
    (SIGTERM keeps its default: DataLoader itself uses it to end workers that hang.)"""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The permutation of ``range(n)`` for ``epoch``: a pure function of ``(n, seed, epoch)``."""
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be non-negative, got seed={seed}, epoch={epoch}")
    # SeedSequence mixes (seed, epoch) so nearby pairs give unrelated streams.
    state = np.random.SeedSequence([seed, epoch]).generate_state(2, dtype=np.uint32)
    g = torch.Generator().manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)
    return torch.randperm(n, generator=g)


def crop_seeds(seed: int, micro: int, global_batch: int) -> torch.Tensor:
    """The crop seeds (int64 ``[global_batch]``, by position in the global micro-batch) of
    micro-batch ``micro``: a pure function of its arguments."""
    if seed < 0 or micro < 0:
        raise ValueError(f"seed and micro must be non-negative, got seed={seed}, micro={micro}")
    entropy = [seed, micro, _CROP_SEED_STREAM]
    state = np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint32)
    g = torch.Generator().manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)
    return torch.randint(0, 2**62, (global_batch,), generator=g)


class _IndexList(Sampler):
    """A sampler whose indices (ints or :class:`CropKey` s) are swapped each epoch, so
    persistent workers survive."""

    def __init__(self) -> None:
        self.indices: list[int] | list[CropKey] = []

    def __iter__(self) -> Iterator:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class EpochLoader:
    """Batches of ``(images uint8 [B, C, H, W], labels int64 [B])`` for one rank.

    Args:
        dataset: an :class:`ImageTensors` (indexed in memory, in the main process) or any
            map-style dataset returning ``(uint8 [C, H, W], int)`` (decoded by a
            ``DataLoader`` with ``num_workers`` persistent workers).
        batch_size: samples per batch on this rank.
        seed: seed of the data order.
        drop_last: drop the last incomplete batch (and the samples that do not divide
            evenly across ranks).
        num_workers: DataLoader workers for non-in-memory datasets.
        rank, world_size: this process's shard.
        pin_memory: pin batches for asynchronous host-to-GPU copies; default: when
            CUDA is available.

    Attributes:
        skipped: samples dropped because the dataset returned label ``-1`` (unreadable
            images), summed over all epochs served by this loader.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        *,
        seed: int,
        drop_last: bool = True,
        num_workers: int = 0,
        rank: int = 0,
        world_size: int = 1,
        pin_memory: bool | None = None,
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}"
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        n = len(dataset)  # type: ignore[arg-type]
        if drop_last:
            self.samples_per_rank = n // world_size
        else:
            self.samples_per_rank = -(-n // world_size)
        if batch_size > self.samples_per_rank:
            raise ValueError(
                f"batch_size {batch_size} is larger than the {self.samples_per_rank} samples each "
                f"of the {world_size} rank(s) gets from a dataset of {n}; lower train.batch_size"
            )
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.skipped = 0
        self._in_memory = isinstance(dataset, ImageTensors)
        self._serves_train_crops = bool(getattr(dataset, "serves_train_crops", False))
        self._sampler = _IndexList()
        self._loader: DataLoader | None = None
        if not self._in_memory:
            self._loader = DataLoader(
                dataset,
                batch_size=batch_size,
                sampler=self._sampler,
                drop_last=drop_last,
                num_workers=num_workers,
                persistent_workers=num_workers > 0,
                worker_init_fn=_ignore_ctrl_c if num_workers else None,
                pin_memory=self.pin_memory,
                # Its own generator: DataLoader otherwise draws a worker seed from the
                # global RNG on every epoch, shifting every later random number.
                generator=torch.Generator().manual_seed(seed),
            )

    @property
    def in_memory(self) -> bool:
        """True for an :class:`ImageTensors` (no decoding, nothing is ever skipped)."""
        return self._in_memory

    @property
    def serves_train_crops(self) -> bool:
        """True when the dataset's workers crop (and flip) the training view (module
        docstring): the batches are then training views, not whole evaluation views."""
        return self._serves_train_crops

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        if self.drop_last:
            return self.samples_per_rank // self.batch_size
        return -(-self.samples_per_rank // self.batch_size)

    def indices(self, epoch: int) -> torch.Tensor:
        """This rank's sample indices for ``epoch``, in order (length ``samples_per_rank``)."""
        n = len(self.dataset)  # type: ignore[arg-type]
        perm = epoch_permutation(n, self.seed, epoch)
        total = self.samples_per_rank * self.world_size
        if total > n:  # pad by wrapping, as DistributedSampler does without drop_last
            perm = torch.cat([perm, perm[: total - n]])
        return perm[self.rank : total : self.world_size]

    def iter_epoch(
        self, epoch: int, start_batch: int = 0
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield the batches of ``epoch`` from batch ``start_batch`` on (to resume mid-epoch)."""
        if not 0 <= start_batch <= len(self):
            raise ValueError(
                f"start_batch must be in [0, {len(self)}] (batches per epoch), got {start_batch}"
            )
        order = self.indices(epoch)[start_batch * self.batch_size :]
        if self.drop_last:
            order = order[: (len(self) - start_batch) * self.batch_size]
        if self._in_memory:
            yield from self._iter_in_memory(order)
        else:
            first_micro = epoch * len(self) + start_batch
            yield from self._iter_workers(self._requests(order, first_micro))

    def _iter_in_memory(self, order: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        data: ImageTensors = self.dataset  # type: ignore[assignment]
        on_cpu = data.images.device.type == "cpu"
        if on_cpu:
            # numpy's row gather is a memcpy per image, ~50x faster than torch's uint8
            # indexing on CPU. Both arrays view the dataset's memory (no copy).
            images, labels = data.images.numpy(), data.labels.numpy()
        for start in range(0, len(order), self.batch_size):  # split() of [] yields one []
            batch = order[start : start + self.batch_size]
            if on_cpu:
                x = torch.from_numpy(images.take(batch.numpy(), axis=0))
                y = torch.from_numpy(labels.take(batch.numpy()))
            else:  # a dataset moved to the GPU gathers there
                x = data.images[batch.to(data.images.device)]
                y = data.labels[batch.to(data.labels.device)]
            if self.pin_memory and on_cpu:
                x, y = x.pin_memory(), y.pin_memory()
            yield x, y

    def _requests(self, order: torch.Tensor, first_micro: int) -> list[int] | list[CropKey]:
        """What the dataset is asked for: the indices of ``order`` (whose first batch is
        micro-batch ``first_micro``), as :class:`CropKey` s when it serves training crops."""
        if not self._serves_train_crops:
            return order.tolist()
        requests = []
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size].tolist()
            micro = first_micro + start // self.batch_size
            seeds = crop_seeds(self.seed, micro, self.batch_size * self.world_size)
            mine = seeds[self.rank :: self.world_size].tolist()  # row j: position j*world+rank
            requests += [
                CropKey(index, seed) for index, seed in zip(batch, mine[: len(batch)], strict=True)
            ]
        return requests

    def _iter_workers(
        self, requests: list[int] | list[CropKey]
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        assert self._loader is not None
        self._sampler.indices = requests
        for images, labels in self._loader:
            keep = labels != -1
            dropped = int((~keep).sum())
            if dropped:
                self.skipped += dropped
                images, labels = images[keep], labels[keep]
                if labels.numel() == 0:
                    continue
            yield images, labels


class _ByNumber(Dataset):
    """``dataset[micro]`` is ``draw(micro)``: the DataLoader's workers run the draws."""

    def __init__(self, draw: Callable[[int], Drawn]) -> None:
        self.draw = draw

    def __getitem__(self, micro: int) -> Drawn:
        return self.draw(micro)


def _as_drawn(drawn: Drawn) -> Drawn:
    """The collate function: a draw arrives as it was made (no tensor conversion)."""
    return drawn


def draws_ahead(
    draw: Callable[[int], Drawn], first_micro: int, workers: int, pin_memory: bool = False
) -> Iterator[Drawn]:
    """``draw(first_micro)``, ``draw(first_micro + 1)``, ... without end, made by ``workers``
    DataLoader worker processes a few micro-batches ahead (``workers=0``: in this process,
    one at a time, when asked). ``draw`` must be a pure function of the number (and picklable
    where workers are spawned, not forked), so the result does not depend on ``workers``.
    ``pin_memory``: page-locked results (a draw with a ``pin_memory()`` method gets it called).
    """
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    loader = DataLoader(
        _ByNumber(draw),
        batch_size=None,  # one draw per micro-batch number
        sampler=range(first_micro, sys.maxsize),
        num_workers=workers,
        collate_fn=_as_drawn,
        worker_init_fn=_ignore_ctrl_c if workers else None,
        pin_memory=pin_memory,
        # Its own generator: the worker seed would otherwise come from the global RNG.
        generator=torch.Generator().manual_seed(first_micro),
    )
    return iter(loader)
