"""How a run's batch divides into ranks and micro-batches, and how many steps it takes.

Each function refuses, with a :class:`ConfigError` saying what to change, a size that would
make the run impossible, before any compute is spent.
"""

from __future__ import annotations

from hjepa.config import Config, ConfigError


def micro_batch_size(cfg: Config, ranks: int) -> int:
    """Images per rank in one micro-batch: ``train.batch_size`` over ranks x accumulation."""
    t = cfg.train
    if t.batch_size % (t.accum_steps * ranks):
        raise ConfigError(
            f"train.batch_size={t.batch_size} must split evenly over {ranks} rank(s) x "
            f"train.accum_steps={t.accum_steps}"
        )
    return t.batch_size // (t.accum_steps * ranks)


def check_knn_bank(cfg: Config, train_images: int) -> None:
    """The online kNN probe's memory bank must hold at least ``eval.knn_k`` images."""
    bank = cfg.train.knn_bank_size
    bank = bank if 0 < bank < train_images else train_images
    if bank < cfg.eval.knn_k:
        raise ConfigError(
            f"the online kNN probe would have {bank} bank images for eval.knn_k="
            f"{cfg.eval.knn_k} neighbours: raise train.knn_bank_size or lower eval.knn_k"
        )


def total_steps(cfg: Config, micro_per_epoch: int) -> int:
    """Optimizer steps of the whole run: ``train.max_steps``, else the epochs' worth."""
    t = cfg.train
    steps = t.max_steps or t.epochs * micro_per_epoch // t.accum_steps
    if steps < 1:
        raise ConfigError("the run has no optimizer step: raise train.epochs or max_steps")
    return steps


def warmup_steps(cfg: Config, total: int) -> int:
    """Learning-rate warm-up: ``optim.warmup_steps``, else that fraction of the run. A warmup
    longer than the run would never reach ``optim.lr`` (the config refuses it when
    ``train.max_steps`` sets the length; an epoch count is checked here, against the data)."""
    o = cfg.optim
    if o.warmup_steps > total:
        raise ConfigError(
            f"optim.warmup_steps={o.warmup_steps} is longer than the run ({total} steps): the "
            "rate would never reach optim.lr; shorten the warmup"
        )
    return o.warmup_steps or round(o.warmup_fraction * total)


def check_two_views(micro_batch: int) -> None:
    """VICReg and the contrastive term compare the images of a micro-batch with each other."""
    if micro_batch < 2:
        raise ConfigError(
            f"VICReg / loss.contrastive compare images within a micro-batch, but each rank "
            f"gets {micro_batch}: raise train.batch_size or lower train.accum_steps"
        )
