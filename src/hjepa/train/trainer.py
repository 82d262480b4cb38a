"""The training loop: data -> masks -> model -> loss -> AdamW step -> EMA -> logs/checkpoints.

Every random draw of a step (augmentation, masks, drop path) comes from generators seeded by
``(train.seed, micro-batch number)``, and the data order of an epoch from ``(train.seed,
epoch)``, so a run resumed from a checkpoint repeats exactly what the uninterrupted run does.
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path

import torch
from torch import Tensor

from hjepa.config import Config, ConfigError, dump_yaml, from_dict, level_weights
from hjepa.data.augment import BatchAugment
from hjepa.data.datasets import build_dataset
from hjepa.data.loader import EpochLoader
from hjepa.data.masks import MultiBlockMaskSampler
from hjepa.data.normalize import channel_stats
from hjepa.losses.prediction import prediction_loss
from hjepa.losses.sigreg import SIGReg
from hjepa.models.hjepa import HJEPA
from hjepa.train import checkpoint as ckpt
from hjepa.train.ema import ema_update
from hjepa.train.logging import MetricsLogger, truncate_after
from hjepa.train.monitor import OnlineProbe
from hjepa.train.optim import build_optimizer, set_schedule
from hjepa.train.schedules import cosine, linear, warmup_cosine

# Architecture keys that must match between a run's config and a checkpoint it resumes.
ARCH_KEYS = ("data.name", "data.image_size", "model")


class NonFiniteLossError(RuntimeError):
    pass


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA GPU is visible; use train.device=auto")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("train.device=mps but MPS is not available; use train.device=auto")
    return torch.device(name)


def step_seed(seed: int, micro: int, purpose: int) -> int:
    """A distinct 63-bit seed per (run seed, micro-batch, purpose)."""
    return ((seed * 1_000_003 + micro) * 8 + purpose) % (2**63 - 1)


def _arch(cfg_dict: dict) -> dict:
    return {
        "data.name": cfg_dict["data"]["name"],
        "data.image_size": cfg_dict["data"]["image_size"],
        "model": cfg_dict["model"],
    }


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        t, d = cfg.train, cfg.data
        self.run_dir = Path(cfg.run.dir)
        self.device = pick_device(t.device)
        self.precision = t.precision
        if self.precision == "auto":
            self.precision = "bf16" if self.device.type == "cuda" else "fp32"
        if t.threads:
            torch.set_num_threads(t.threads)
        root = d.root or None
        self.train_set = build_dataset(
            d.name,
            root,
            "train",
            image_size=d.image_size,
            channels=d.channels,
            synthetic_size=d.synthetic_size,
            seed=t.seed,
            class_subset=d.class_subset or None,
        )
        self.channels = int(getattr(self.train_set, "channels", d.channels))
        self.mean, self.std = channel_stats(d.name, self.channels)
        self.micro_batch = t.batch_size // t.accum_steps
        self.loader = EpochLoader(
            self.train_set, self.micro_batch, seed=t.seed, num_workers=t.num_workers
        )
        self.micro_per_epoch = len(self.loader)
        self.total_steps = t.max_steps or t.epochs * self.micro_per_epoch // t.accum_steps
        if self.total_steps < 1:
            raise ConfigError("the run has no optimizer step: raise train.epochs or max_steps")
        self.warmup = cfg.optim.warmup_steps or round(cfg.optim.warmup_fraction * self.total_steps)
        grid = d.image_size // cfg.model.patch_size
        m = cfg.masking
        self.masks = MultiBlockMaskSampler(
            grid,
            levels=cfg.model.levels,
            num_targets=m.num_targets,
            target_scale=tuple(m.target_scale),
            target_aspect=tuple(m.target_aspect),
            context_scale=tuple(m.context_scale),
            scale_mode=m.scale_mode,
            min_context=m.min_context,
        )
        self.augment = BatchAugment(
            out_size=d.image_size,
            scale=tuple(d.crop_scale),
            ratio=tuple(d.crop_ratio),
            flip_prob=d.hflip,
            mean=self.mean.flatten().tolist(),
            std=self.std.flatten().tolist(),
        )
        torch.manual_seed(t.seed)  # model initialisation
        self.model = HJEPA(cfg.model, d.image_size, self.channels).to(self.device)
        self.params = [p for mod in self.model.trainable_modules() for p in mod.parameters()]
        self.optimizer = build_optimizer(self.model.trainable_modules(), cfg.optim)
        self.scaler = torch.amp.GradScaler(enabled=self.precision == "fp16")
        self.weights = level_weights(cfg)
        self.sigreg = SIGReg(cfg.loss.sigreg_slices) if cfg.loss.regularizer == "sigreg" else None
        self.step = 0

    # -- schedules -------------------------------------------------------------------------
    def lr_at(self, step: int) -> float:
        o = self.cfg.optim
        return warmup_cosine(step, self.total_steps, self.warmup, o.start_lr, o.lr, o.final_lr)

    def wd_at(self, step: int) -> float:
        o = self.cfg.optim
        return cosine(step, self.total_steps, o.weight_decay, o.final_weight_decay)

    def momentum_at(self, step: int) -> float:
        t = self.cfg.train
        return linear(step, self.total_steps, t.ema_start, t.ema_end)

    # -- checkpoints -----------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "context_encoder": self.model.context_encoder.state_dict(),
            "target_encoder": self.model.target_encoder.state_dict(),
            "predictor": self.model.predictor.state_dict(),
            "heads": self.model.heads.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "total_steps": self.total_steps,
            "config": self.cfg.to_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        if _arch(state["config"]) != _arch(self.cfg.to_dict()):
            raise ConfigError(
                f"{self.run_dir} holds a run with a different architecture; "
                "use a new run.dir or the same model/data settings"
            )
        self.model.context_encoder.load_state_dict(state["context_encoder"])
        self.model.target_encoder.load_state_dict(state["target_encoder"])
        self.model.predictor.load_state_dict(state["predictor"])
        self.model.heads.load_state_dict(state["heads"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])

    def save(self) -> None:
        state = self.state_dict()
        directory = ckpt.checkpoint_dir(self.run_dir)
        ckpt.atomic_save(state, directory / ckpt.LAST)
        keep = self.cfg.run.keep_every
        if keep and self.step % keep == 0:
            ckpt.atomic_save(state, directory / f"step_{self.step:08d}.pt")

    def _prepare_run_dir(self) -> bool:
        """Write the resolved config; resume from ``last.pt`` when the run dir has one."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        resumed = False
        last = ckpt.checkpoint_dir(self.run_dir) / ckpt.LAST
        if last.is_file():
            state = ckpt.load_checkpoint(last, map_location=self.device)
            from_dict(state["config"])  # the stored config must still be valid
            self.load_state_dict(state)
            truncate_after(self.run_dir, self.step)
            resumed = True
        (self.run_dir / "config.yaml").write_text(dump_yaml(self.cfg))
        return resumed

    # -- one step --------------------------------------------------------------------------
    def _autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def _micro_step(self, images: Tensor, micro: int) -> tuple[Tensor, list[Tensor]]:
        seed = self.cfg.train.seed
        aug_gen = torch.Generator().manual_seed(step_seed(seed, micro, 0))
        mask_gen = torch.Generator().manual_seed(step_seed(seed, micro, 1))
        torch.manual_seed(step_seed(seed, micro, 2))  # drop path
        x = self.augment(images.to(self.device, non_blocking=True), aug_gen)
        masks = self.masks.sample(x.shape[0], mask_gen).to(self.device, non_blocking=True)
        with self._autocast():
            out = self.model(x, masks)
            loss, per_level = prediction_loss(
                out.predictions, out.targets, self.weights, self.cfg.loss.distance
            )
            if self.sigreg is not None:
                reg = self.sigreg(out.context.flatten(0, 1), step=self.step)
                loss = loss + self.cfg.loss.sigreg_weight * reg
                per_level = [*per_level, reg]
        self.scaler.scale(loss / self.cfg.train.accum_steps).backward()
        return loss.detach(), [p.detach() for p in per_level]

    def _optimizer_step(self) -> Tensor:
        t = self.cfg.train
        set_schedule(self.optimizer, self.lr_at(self.step), self.wd_at(self.step))
        self.scaler.unscale_(self.optimizer)
        max_norm = t.grad_clip if t.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        momentum = self.momentum_at(self.step)
        if t.ema_timing == "before_step":  # the old bug, reproduced for the ablation only
            ema_update(self.model.target_encoder, self.model.context_encoder, momentum)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if t.ema_timing == "after_step":
            ema_update(self.model.target_encoder, self.model.context_encoder, momentum)
        self.step += 1
        return grad_norm

    # -- the loop --------------------------------------------------------------------------
    def _batches(self):
        """Micro-batches from the current step on, crossing epochs, with their global number."""
        micro = self.step * self.cfg.train.accum_steps
        while True:
            epoch, start = divmod(micro, self.micro_per_epoch)
            for images, _labels in self.loader.iter_epoch(epoch, start_batch=start):
                yield micro, images
                micro += 1

    def fit(self) -> dict:
        """Train until ``total_steps`` (or ``stop_after`` more steps); returns the last metrics."""
        t, run = self.cfg.train, self.cfg.run
        resumed = self._prepare_run_dir()
        logger = MetricsLogger(self.run_dir, tensorboard=run.tensorboard)
        probe = OnlineProbe(self.cfg, self.channels, self.mean, self.std, self.device)
        end = self.total_steps
        if t.stop_after:
            end = min(end, self.step + t.stop_after)
        if resumed:
            print(f"resuming {self.run_dir} from step {self.step}/{self.total_steps}")
        last: dict = {}
        if self.step >= end:
            return last
        progress = _progress(run.progress, self.step, self.total_steps)
        self.model.train()
        window_images, window_start = 0, time.perf_counter()
        sums: list[Tensor] = []
        micro_in_step = 0
        for micro, images in self._batches():
            loss, per_level = self._micro_step(images, micro)
            sums.append(torch.stack([loss, *per_level]))
            micro_in_step += 1
            window_images += images.shape[0]
            if micro_in_step < t.accum_steps:
                continue
            micro_in_step = 0
            mean_terms = torch.stack(sums).mean(0)
            sums = []
            if not torch.isfinite(mean_terms).all():
                raise NonFiniteLossError(
                    f"non-finite loss at step {self.step} (levels: {mean_terms[1:].tolist()}); "
                    f"the last good checkpoint is {ckpt.checkpoint_dir(self.run_dir) / ckpt.LAST}"
                )
            lr, momentum = self.lr_at(self.step), self.momentum_at(self.step)
            grad_norm = self._optimizer_step()
            if self.step % t.log_every == 0 or self.step == end:
                elapsed = time.perf_counter() - window_start
                values = mean_terms.tolist()
                last = {
                    "loss": values[0],
                    **{
                        f"loss_level{i}": v
                        for i, v in enumerate(values[1 : 1 + self.cfg.model.levels])
                    },
                    **({"sigreg": values[-1]} if self.sigreg is not None else {}),
                    "lr": lr,
                    "weight_decay": self.wd_at(self.step - 1),
                    "ema_momentum": momentum,
                    "grad_norm": float(grad_norm),
                    "images_per_s": window_images / max(elapsed, 1e-9),
                    "epoch": (self.step * t.accum_steps) / self.micro_per_epoch,
                }
                logger.log(self.step, "train", last)
                progress.set_postfix(
                    loss=f"{values[0]:.4f}", lr=f"{lr:.2e}", img_s=f"{last['images_per_s']:.0f}"
                )
                window_images, window_start = 0, time.perf_counter()
            progress.update(1)
            finished = self.step == end
            if (t.knn_every and self.step % t.knn_every == 0) or self.step == self.total_steps:
                logger.log(self.step, "probe", probe(self.model.target_encoder))
                self.model.train()
            if finished or self.step % run.checkpoint_every == 0:
                self.save()
            if finished:
                break
        progress.close()
        logger.close()
        return last


def _progress(enabled: bool, initial: int, total: int):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True)


def train(cfg: Config) -> Trainer:
    trainer = Trainer(cfg)
    trainer.fit()
    return trainer


__all__ = ["Trainer", "train", "pick_device", "NonFiniteLossError", "dump_yaml"]
