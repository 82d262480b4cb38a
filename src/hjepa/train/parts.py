"""The parts of a training run, built from its config in one place.

:func:`build_parts` reads the config once and builds what a run is made of: the device, the
training data and its loader, the input pipeline (augmentations and masks), the model, the
objective, the optimizer with its gradient scaler, and the schedules. The trainer
(:mod:`hjepa.train.trainer`) runs the parts it is given and reads no config key that builds
one. A tool that needs another part (a timed input pipeline, a benchmark's model) builds the
parts and passes ``dataclasses.replace(parts, inputs=...)`` to the trainer.

The checkpoint of a run is the parts' own state dicts (:meth:`Parts.state_dict`) plus the
trainer's step counters.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from hjepa import checkpoint as ckpt
from hjepa.config import Config
from hjepa.data.augment import BatchAugment
from hjepa.data.buckets import TokenBuckets
from hjepa.data.datasets import check_first_image, dataset_from_config, resolve_channels
from hjepa.data.deit3 import DeiT3Augment
from hjepa.data.loader import EpochLoader
from hjepa.data.masks import sampler_from_config
from hjepa.data.multicrop import LocalCrops
from hjepa.data.normalize import channel_stats
from hjepa.device import check_support, pick_device, pick_precision
from hjepa.losses.combined import Objective
from hjepa.models.hjepa import HJEPA, MaskIndices
from hjepa.train import distributed, sizes
from hjepa.train.inputs import InputDraws, InputPipeline, draw_mask_indices
from hjepa.train.optim import build_optimizer
from hjepa.train.schedules import RunSchedules
from hjepa.train.warm_start import WarmStart, load_init_weights

GPU_DATA_BYTES = 2 << 30  # in-memory training sets up to this size are moved to the GPU


@dataclass
class Data:
    """The training split and how it is batched: ``micro_batch`` images per rank and
    micro-batch, ``channels`` and the normalisation ``mean``/``std`` the model sees."""

    train_set: Dataset
    loader: EpochLoader
    micro_batch: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


@dataclass
class Parts:
    """What a run is made of (see the module docstring). ``ddp`` is the module the forward pass
    goes through: DDP over the trainable parts, or the model itself."""

    env: distributed.DistEnv
    device: torch.device
    precision: str
    data: Data
    inputs: InputPipeline
    model: HJEPA
    ddp: nn.Module
    objective: Objective
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    schedules: RunSchedules
    max_grad_norm: float
    ema_timing: str  # after_step (step 5 of train_step), before_step (the ablation), none
    warm_start: WarmStart | None  # what train.init_from copied into a new run

    @property
    def params(self) -> list[nn.Parameter]:
        return [p for module in self.model.trainable_modules() for p in module.parameters()]

    def state_dict(self) -> dict:
        """The parts' own state dicts, by checkpoint key (see :meth:`HJEPA.checkpoint_modules`)."""
        modules = self.model.checkpoint_modules()
        return {
            **{name: module.state_dict() for name, module in modules.items()},
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Load :meth:`state_dict`'s entries; a misfit names the module and its shapes."""
        for name, module in self.model.checkpoint_modules().items():
            ckpt.load_module_state(module, state[name], name)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])

    def drop_ddp(self) -> None:
        """Release DDP (and the process group its reducer holds) before the group goes."""
        self.ddp = self.model


def build_parts(cfg: Config) -> Parts:
    """Every part of the run ``cfg`` describes, in the order their random draws need."""
    t = cfg.train
    env, device = distributed.setup(pick_device(t.device))
    precision = pick_precision(t.precision, device)
    check_support(cfg.model.attention, device, precision)
    if t.threads:
        torch.set_num_threads(t.threads)
    data = build_data(cfg, env, device)
    total = sizes.total_steps(cfg, len(data.loader))
    o = cfg.optim
    schedules = RunSchedules(
        total,
        sizes.warmup_steps(cfg, total),
        *(o.start_lr, o.lr, o.final_lr, o.weight_decay, o.final_weight_decay),
        *(t.ema_start, t.ema_end),
    )
    inputs = build_inputs(cfg, data, env, device)
    model, warm_start = build_model(cfg, data.channels, inputs.local_crops is not None, device)
    ddp = distributed.wrap_trainable(
        model, None if model.shared_target else model.target_encoder, env, device
    )
    optimizer = build_optimizer(model.trainable_modules(), cfg.optim)
    # Prediction loss + regularisers + contrast, every term logged (losses/combined.py).
    objective = Objective.from_config(cfg, multicrop=inputs.local_crops is not None)
    if objective.needs_two_views:
        sizes.check_two_views(data.micro_batch)
    return Parts(
        env=env,
        device=device,
        precision=precision,
        data=data,
        inputs=inputs,
        model=model,
        ddp=ddp,
        objective=objective,
        optimizer=optimizer,
        scaler=torch.amp.GradScaler(device.type, enabled=precision == "fp16"),
        schedules=schedules,
        max_grad_norm=t.grad_clip if t.grad_clip > 0 else math.inf,
        ema_timing="none" if model.shared_target else t.ema_timing,  # EMA-free: no EMA
        warm_start=warm_start,
    )


def build_inputs(
    cfg: Config,
    data: Data,
    env: distributed.DistEnv,
    device: torch.device,
    draw_workers: int | None = None,
) -> InputPipeline:
    """The input pipeline: mask sampler, crop and flip, DeiT III options, multi-crop views.
    ``draw_workers``: DataLoader workers that draw masks and crops ahead of the step (default:
    one on an accelerator, none on a CPU, where a worker process only competes with the step
    for the same cores)."""
    d, mc = cfg.data, cfg.data.multicrop
    stats = dict(mean=data.mean.flatten().tolist(), std=data.std.flatten().tolist())
    augment = BatchAugment(d.image_size, d.crop_scale, d.crop_ratio, d.hflip, **stats)
    extra = DeiT3Augment.from_config(d.augment, **stats)
    local_crops = None
    if mc.num_local:
        local_crops = LocalCrops(
            mc.num_local, mc.local_size, mc.local_scale, d.crop_ratio, d.hflip, **stats
        )
    sampler, global_batch = sampler_from_config(cfg), data.micro_batch * env.world_size
    # Padded token counts where shapes cost (attention plans and graphs on an accelerator,
    # graphs under torch.compile); an eager CPU step would only do the padding's work.
    pad = device.type != "cpu" or cfg.train.compile
    buckets = TokenBuckets.for_sampler(sampler, global_batch) if pad else None
    in_loader = data.loader.serves_train_crops  # an image folder's workers crop the views
    crop = None if in_loader else augment  # else drawn ahead for the training images' size
    image_hw = None if in_loader else tuple(data.train_set[0][0].shape[-2:])
    draws = InputDraws(
        sampler, cfg.train.seed, global_batch, (env.rank, env.world_size), buckets, crop, image_hw
    )
    if draw_workers is None:
        draw_workers = 0 if device.type == "cpu" else 1
    return InputPipeline(
        draws,
        augment,
        cfg.train.seed,
        device,
        env,
        draw_workers=draw_workers,
        extra_augment=extra if extra.enabled else None,
        local_crops=local_crops,
        cropped_in_loader=in_loader,
    )


def mask_preparer(
    cfg: Config, global_batch: int, pad_tokens: bool = False
) -> Callable[[int], MaskIndices]:
    """``prepare(micro) -> MaskIndices``: the mask indices of the whole global micro-batch
    ``micro`` (CPU), exactly as a training step of ``cfg`` draws them (``pad_tokens``: padded
    as on an accelerator or under ``train.compile``): for tools and tests."""
    sampler, seed = sampler_from_config(cfg), cfg.train.seed
    buckets = TokenBuckets.for_sampler(sampler, global_batch) if pad_tokens else None
    return partial(draw_mask_indices, sampler, buckets, seed, batch=global_batch)


def build_data(cfg: Config, env: distributed.DistEnv, device: torch.device) -> Data:
    """The training split, checked against the model's input, and its resumable loader."""
    train_set = _training_set(cfg, device)
    channels = int(getattr(train_set, "channels", cfg.data.channels))
    mean, std = channel_stats(cfg.data.name, channels)
    micro_batch = sizes.micro_batch_size(cfg, env.world_size)  # per rank
    loader = EpochLoader(
        train_set,
        micro_batch,
        seed=cfg.train.seed,
        num_workers=cfg.train.num_workers,
        rank=env.rank,
        world_size=env.world_size,
        pin_memory=device.type == "cuda",
    )
    sizes.check_knn_bank(cfg, len(train_set))
    return Data(train_set, loader, micro_batch, channels, mean, std)


def build_model(
    cfg: Config, channels: int, multicrop: bool, device: torch.device
) -> tuple[HJEPA, WarmStart | None]:
    """The model, initialised from ``train.seed`` (or ``train.init_from``'s encoder weights in
    a new run)."""
    loss = cfg.loss
    torch.manual_seed(cfg.train.seed)  # model initialisation
    model = HJEPA(
        cfg.model,
        cfg.data.image_size,
        channels,
        multicrop=multicrop,
        contrastive=(
            (loss.contrastive_hidden_dim, loss.contrastive_out_dim) if loss.contrastive else None
        ),
    ).to(device)
    warm_start = None
    if cfg.train.init_from and not ckpt.candidates(Path(cfg.run.dir)):  # its own one wins
        warm_start = load_init_weights(model, cfg, device)
    # train.compile compiles the training step around the model (hjepa.train.compiled), not
    # the modules: the model stays plain, so its state dict keys and its other callers (probes,
    # evaluation) are those of an eager run.
    return model, warm_start


def _training_set(cfg: Config, device: torch.device) -> Dataset:
    """The training split, its first image checked against the model's input; small in-memory
    sets live on the GPU, so batches are gathered there with no host copies."""
    d = cfg.data
    train_set = dataset_from_config(cfg, "train")
    channels = resolve_channels(d.channels, d.root, train_set)
    d.channels = d.channels or channels  # data.channels=0 takes the data's (config.yaml shows)
    check_first_image(train_set, d.name, channels)
    images = getattr(train_set, "images", None)
    if device.type == "cuda" and images is not None and images.nbytes <= GPU_DATA_BYTES:
        train_set.images = images.to(device)
    return train_set
