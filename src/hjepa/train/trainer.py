"""The training loop: data -> masks -> model -> loss -> AdamW step -> EMA -> logs/checkpoints.

Every random draw of a step (augmentation, masks, drop path) comes from generators seeded by
``(train.seed, micro-batch number)``, and the data order of an epoch from ``(train.seed,
epoch)``, so a run resumed from a checkpoint repeats exactly what the uninterrupted run does.
"""

from __future__ import annotations

import contextlib
import gc
import math
import sys
import time
from pathlib import Path

import torch
from torch import Tensor

from hjepa import checkpoint as ckpt
from hjepa.config import Config, ConfigError, check_attention, dump_yaml, from_dict, level_weights
from hjepa.data.augment import BatchAugment
from hjepa.data.datasets import dataset_from_config
from hjepa.data.deit3 import DeiT3Augment
from hjepa.data.loader import EpochLoader
from hjepa.data.masks import sampler_from_config
from hjepa.data.multicrop import LocalCrops
from hjepa.data.normalize import channel_stats
from hjepa.device import pick_device
from hjepa.losses.combined import Objective
from hjepa.models.hjepa import HJEPA, MaskIndices
from hjepa.models.vit import attention_backend
from hjepa.train import distributed
from hjepa.train.ema import ema_update
from hjepa.train.logging import MetricsLogger, truncate_after
from hjepa.train.monitor import OnlineProbe, collapse_warning
from hjepa.train.optim import build_optimizer, set_schedule
from hjepa.train.schedules import cosine, linear, warmup_cosine

GPU_DATA_BYTES = 2 << 30  # in-memory training sets up to this size are moved to the GPU


class NonFiniteLossError(RuntimeError):
    """A loss term, the gradient or the weights became NaN/inf (``train.nonfinite=stop``)."""


def step_seed(seed: int, micro: int, purpose: int) -> int:
    """A distinct 63-bit seed per (run seed, micro-batch, purpose)."""
    return ((seed * 1_000_003 + micro) * 8 + purpose) % (2**63 - 1)


def _arch(cfg_dict: dict) -> dict:
    """What must match between a run's config and a checkpoint it resumes.

    The stored config goes through the schema first, so keys added to the schema since the
    checkpoint was written take their defaults instead of counting as a change.
    """
    cfg_dict = from_dict(cfg_dict).to_dict()
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
        self.dist, self.device = distributed.setup(pick_device(t.device))
        self.precision = t.precision
        if self.precision == "auto":
            self.precision = "bf16" if self.device.type == "cuda" else "fp32"
        if t.threads:
            torch.set_num_threads(t.threads)
        self.train_set = dataset_from_config(cfg, "train")
        self.channels = int(getattr(self.train_set, "channels", d.channels))
        _check_first_image(self.train_set, d.name, self.channels)
        images = getattr(self.train_set, "images", None)
        if self.device.type == "cuda" and images is not None and images.nbytes <= GPU_DATA_BYTES:
            # Small in-memory sets live on the GPU: batches are gathered there, no host copies.
            self.train_set.images = images.to(self.device)
        self.mean, self.std = channel_stats(d.name, self.channels)
        ranks = self.dist.world_size
        if t.batch_size % (t.accum_steps * ranks):
            raise ConfigError(
                f"train.batch_size={t.batch_size} must split evenly over {ranks} rank(s) x "
                f"train.accum_steps={t.accum_steps}"
            )
        self.micro_batch = t.batch_size // (t.accum_steps * ranks)  # per rank
        self.loader = EpochLoader(
            self.train_set,
            self.micro_batch,
            seed=t.seed,
            num_workers=t.num_workers,
            rank=self.dist.rank,
            world_size=ranks,
            pin_memory=self.device.type == "cuda",
        )
        self.micro_per_epoch = len(self.loader)
        n_train, bank = len(self.train_set), t.knn_bank_size
        bank = bank if 0 < bank < n_train else n_train  # the online kNN's memory bank
        if bank < cfg.eval.knn_k:
            raise ConfigError(
                f"the online kNN probe would have {bank} bank images for eval.knn_k="
                f"{cfg.eval.knn_k} neighbours: raise train.knn_bank_size or lower eval.knn_k"
            )
        self.total_steps = t.max_steps or t.epochs * self.micro_per_epoch // t.accum_steps
        if self.total_steps < 1:
            raise ConfigError("the run has no optimizer step: raise train.epochs or max_steps")
        self.warmup = cfg.optim.warmup_steps or round(cfg.optim.warmup_fraction * self.total_steps)
        self.masks = sampler_from_config(cfg)
        # One draw now (own generator: no other random stream moves), so mask settings that
        # cannot be met on this grid fail before any compute instead of at some later step.
        self.masks.sample(self.micro_batch * ranks, torch.Generator().manual_seed(t.seed))
        self.augment = BatchAugment(
            out_size=d.image_size,
            scale=tuple(d.crop_scale),
            ratio=tuple(d.crop_ratio),
            flip_prob=d.hflip,
            mean=self.mean.flatten().tolist(),
            std=self.std.flatten().tolist(),
        )
        self._check_attention()
        stats = dict(mean=self.mean.flatten().tolist(), std=self.std.flatten().tolist())
        a, mc = d.augment, d.multicrop
        extra = DeiT3Augment(
            three_augment=a.three_augment,
            blur_sigma=a.blur_sigma,
            color_jitter=a.color_jitter,
            mixup=a.mixup,
            cutmix=a.cutmix,
            random_erasing=a.random_erasing,
            **stats,
        )
        self.extra_augment = extra if extra.enabled else None  # DeiT III options, global view
        self.local_crops = (
            LocalCrops(mc.num_local, mc.local_size, mc.local_scale, d.crop_ratio, d.hflip, **stats)
            if mc.num_local
            else None
        )
        torch.manual_seed(t.seed)  # model initialisation
        loss = cfg.loss
        self.model = HJEPA(
            cfg.model,
            d.image_size,
            self.channels,
            multicrop=self.local_crops is not None,
            contrastive=(
                (loss.contrastive_hidden_dim, loss.contrastive_out_dim)
                if loss.contrastive
                else None
            ),
        ).to(self.device)
        self.shared_target = self.model.shared_target  # EMA-free: no target copy, no EMA
        if t.compile:  # in place: state dict keys stay those of the plain modules
            for module in {self.model.context_encoder, self.model.target_encoder}:
                module.compile(dynamic=True)  # token counts change every step
            self.model.predictor.compile(dynamic=True)
        # The module the forward pass goes through: DDP over the trainable parts, or the model.
        self.ddp = distributed.wrap_trainable(
            self.model,
            None if self.shared_target else self.model.target_encoder,
            self.dist,
            self.device,
        )
        self.params = [p for mod in self.model.trainable_modules() for p in mod.parameters()]
        self.optimizer = build_optimizer(self.model.trainable_modules(), cfg.optim)
        if self.precision == "fp16" and self.device.type != "cuda":
            raise ConfigError(f"train.precision=fp16 needs a CUDA GPU, not {self.device.type}")
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.weights = level_weights(cfg)
        # Prediction loss + regularisers + contrast, every term logged (losses/combined.py).
        self.objective = Objective.from_config(cfg, multicrop=self.local_crops is not None)
        self.sigreg = self.objective.sigreg  # None unless SIGReg is on
        self.two_views = self.objective.needs_two_views
        if self.two_views and self.micro_batch < 2:
            raise ConfigError(
                f"VICReg / loss.contrastive compare images within a micro-batch, but each rank "
                f"gets {self.micro_batch}: raise train.batch_size or lower train.accum_steps"
            )
        self.step = 0
        self.skipped_steps = 0  # optimizer steps skipped for non-finite values (nonfinite=skip)
        self.skip_reason: str | None = None  # why the latest step was skipped, if it was
        self.saved_step: int | None = None  # step of the newest complete checkpoint on disk

    def _check_attention(self) -> None:
        """``model.attention`` against the resolved device and precision (config time saw
        only ``auto``); flash and cuDNN attention also need an Ampere or newer GPU."""
        name = self.cfg.model.attention
        check_attention(name, self.device.type, self.precision)
        if name in ("flash", "cudnn") and torch.cuda.get_device_capability(self.device) < (8, 0):
            raise ConfigError(
                f"model.attention={name} needs a CUDA GPU of compute capability >= 8.0 "
                "(Ampere or newer); use auto or efficient"
            )

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
            **{k: m.state_dict() for k, m in self.model.optional_modules().items()},
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "total_steps": self.total_steps,
            "nonfinite_skipped": self.skipped_steps,
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
        optional = self.model.optional_modules()
        if "view_projector" in state and "view_projector" not in optional:
            raise ConfigError(
                f"{self.run_dir} was trained with multi-crop: resume with the same "
                "data.multicrop.num_local or use a new run.dir"
            )
        if "contrastive_projector" in state and "contrastive_projector" not in optional:
            raise ConfigError(
                f"{self.run_dir} was trained with loss.contrastive=true: resume with it "
                "or use a new run.dir"
            )
        for name, module in optional.items():
            if name not in state:
                raise ConfigError(
                    f"{self.run_dir} was trained without the {name} of this config "
                    "(model.fpn / data.multicrop.num_local / loss.contrastive): use a new run.dir"
                )
            module.load_state_dict(state[name])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.skipped_steps = int(state.get("nonfinite_skipped", 0))
        self.step = int(state["step"])

    def save(self) -> None:
        # Never replace a good checkpoint with broken weights (an update can overflow even
        # when the loss and gradient that produced it were finite).
        if not all(bool(torch.isfinite(p).all()) for p in self.model.parameters()):
            raise NonFiniteLossError(
                f"the weights became non-finite at step {self.step}; not saving them over "
                f"{self._last_good()}: lower optim.lr or raise the clipping (train.grad_clip)"
            )
        state = self.state_dict()
        directory = ckpt.checkpoint_dir(self.run_dir)
        ckpt.atomic_save(state, directory / ckpt.LAST)
        keep = self.cfg.run.keep_every
        if keep and self.step % keep == 0:
            ckpt.atomic_save(state, directory / f"step_{self.step:08d}.pt")
        self.saved_step = self.step

    def _last_good(self) -> str:
        if self.saved_step is None:
            return "no checkpoint was written by this run yet"
        last = ckpt.checkpoint_dir(self.run_dir) / ckpt.LAST
        return f"the last good checkpoint {last} (step {self.saved_step}), left untouched"

    def _restore(self, path: Path) -> None:
        """Load one checkpoint; :class:`ckpt.CheckpointError` when that file is unusable."""
        state = ckpt.load_checkpoint(path, map_location=self.device)
        try:
            from_dict(state["config"])  # the stored config must still be valid
        except (ConfigError, KeyError, TypeError, AttributeError) as e:
            raise ckpt.CheckpointError(f"checkpoint {path} holds no valid config ({e})") from e
        try:
            self.load_state_dict(state)
        except ConfigError:
            raise  # the user changed the architecture: no older checkpoint would fit either
        except (RuntimeError, KeyError, ValueError, TypeError, AttributeError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ckpt.CheckpointError(
                f"checkpoint {path} does not fit the model it was saved from ({first[:200]})"
            ) from e

    def _prepare_run_dir(self) -> bool:
        """Write the resolved config; resume from the newest usable checkpoint, if any."""
        if not self.dist.is_main:  # rank 0 tidies the run dir and resumes first, then the rest
            distributed.barrier(self.dist)
            resumed = ckpt.restore_latest(self.run_dir, self._restore) is not None
            self.saved_step = self.step if resumed else None
            return resumed
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            stale = ckpt.remove_stale_temp(ckpt.checkpoint_dir(self.run_dir))
        except OSError as e:
            raise ckpt.CheckpointWriteError(
                e.errno, f"cannot write the run directory {self.run_dir}: {e.strerror or e}"
            ) from e
        if stale:
            print(f"removed {len(stale)} partial checkpoint(s) of a killed run", file=sys.stderr)
        resumed = ckpt.restore_latest(self.run_dir, self._restore) is not None
        if resumed:
            self.saved_step = self.step
        # Also on a fresh start: drop records of a run killed before its first checkpoint.
        truncate_after(self.run_dir, self.step)
        config_text = dump_yaml(self.cfg).encode()
        ckpt.atomic_write(self.run_dir / "config.yaml", lambda f: f.write(config_text), "config")
        distributed.barrier(self.dist)
        return resumed

    # -- one step --------------------------------------------------------------------------
    def _autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def prepare_inputs(
        self, images: Tensor, micro: int
    ) -> tuple[Tensor, MaskIndices, Tensor | None]:
        """Augmented images, mask indices and multi-crop local views (None when off) of this
        rank's share of micro-batch ``micro``.

        Crops, flips and masks are drawn for the whole global micro-batch (the same numbers on
        every rank) and each rank keeps its rows, so they depend only on a sample's global
        position. Also seeds this rank's drop path for the micro-batch.
        """
        seed, env = self.cfg.train.seed, self.dist
        aug_gen = torch.Generator().manual_seed(step_seed(seed, micro, 0))
        mask_gen = torch.Generator().manual_seed(step_seed(seed, micro, 1))
        torch.manual_seed(distributed.rank_seed(step_seed(seed, micro, 2), env))  # drop path
        raw = images.to(self.device, non_blocking=True)
        shard = (env.rank, env.world_size)
        x = self.augment(raw, aug_gen, shard=shard)
        if self.extra_augment is not None:  # one augmented image feeds both encoders
            extra_gen = torch.Generator().manual_seed(step_seed(seed, micro, 5))
            x = self.extra_augment(x, extra_gen, shard)
        views = None
        if self.local_crops is not None:
            crop_gen = torch.Generator().manual_seed(step_seed(seed, micro, 6))
            views = self.local_crops(raw, crop_gen, shard)
        masks = self.masks.sample(x.shape[0] * env.world_size, mask_gen)
        # Indices are computed on the CPU: the forward pass then never syncs with the GPU.
        index = MaskIndices.from_masks(masks).rows(env.shard())
        if self.device.type == "cuda":  # page-locked: the copy overlaps the GPU's work
            index = index.pin_memory()
        return x, index.to(self.device, non_blocking=True), views

    def second_view(self, images: Tensor, micro: int) -> Tensor:
        """Another augmentation of the same images (VICReg / C-JEPA): the crop, flip and DeiT
        III pipeline of :meth:`prepare_inputs`, from independent generators (purposes 3, 4),
        drawn for the global micro-batch like the first view. Moves no other random stream."""
        seed, env = self.cfg.train.seed, self.dist
        shard = (env.rank, env.world_size)
        aug_gen = torch.Generator().manual_seed(step_seed(seed, micro, 3))
        x = self.augment(images.to(self.device, non_blocking=True), aug_gen, shard=shard)
        if self.extra_augment is not None:
            extra_gen = torch.Generator().manual_seed(step_seed(seed, micro, 4))
            x = self.extra_augment(x, extra_gen, shard)
        return x

    def forward_backward(
        self,
        x: Tensor,
        index: MaskIndices,
        views: Tensor | None = None,
        sync: bool = True,
        second: Tensor | None = None,
    ) -> tuple[Tensor, list[Tensor]]:
        """Loss of one micro-batch and its backward; ``sync=False`` skips DDP's gradient
        all-reduce (micro-batches before the last of an accumulated step). ``second``: the
        second augmented view the objective needs when VICReg or the contrastive term is on.
        Returns the total and every term, in the order of ``objective.term_names``."""
        if self.two_views and second is None:
            raise ValueError("VICReg / loss.contrastive need second=trainer.second_view(...)")
        no_sync = self.ddp.no_sync() if self.dist.enabled and not sync else contextlib.nullcontext()
        # The SDPA kernel choice (model.attention) covers the backward and its recomputations.
        with no_sync, attention_backend(self.cfg.model.attention):
            with self._autocast():
                if second is not None:
                    out = self.ddp(x, index, views, second)
                else:
                    out = self.ddp(x, index) if views is None else self.ddp(x, index, views)
                loss, terms = self.objective(out, step=self.step)
            self.scaler.scale(loss / self.cfg.train.accum_steps).backward()
        return loss.detach(), [t.detach() for t in terms.values()]

    def _micro_step(
        self, images: Tensor, micro: int, sync: bool = True
    ) -> tuple[Tensor, list[Tensor]]:
        second = self.second_view(images, micro) if self.two_views else None
        return self.forward_backward(*self.prepare_inputs(images, micro), sync=sync, second=second)

    def _term_names(self, count: int) -> list[str]:
        names = ["loss", *self.objective.term_names]
        return names if len(names) == count else [f"term{i}" for i in range(count)]

    def _nonfinite(self, terms: Tensor | None, grad_norm: Tensor) -> str | None:
        """Why this step must not be applied (a NaN/inf loss term or gradient), or None.

        The gradient is checked too: it can overflow while the loss is finite. Under fp16 the
        GradScaler already skips steps whose gradients overflow, so only the loss is checked.
        """
        checks = [] if terms is None else [terms.detach().float().flatten()]
        if not self.scaler.is_enabled():
            checks.append(grad_norm.detach().float().reshape(1))
        if not checks or bool(torch.isfinite(torch.cat(checks)).all()):  # one host sync
            return None
        if terms is not None and not bool(torch.isfinite(terms).all()):
            values = dict(zip(self._term_names(terms.numel()), terms.flatten().tolist()))
            bad = [f"{k}={v}" for k, v in list(values.items())[1:] if not math.isfinite(v)]
            return f"non-finite loss ({', '.join(bad or [f'loss={values[next(iter(values))]}'])})"
        shown = "" if terms is None else f" (loss={float(terms.flatten()[0]):.4g})"
        return f"non-finite gradient (grad norm {float(grad_norm)}) from a finite loss{shown}"

    def _optimizer_step(self, terms: Tensor | None = None) -> Tensor:
        """One optimizer step (+ EMA); ``terms`` (loss, then each term) are checked first."""
        t = self.cfg.train
        set_schedule(self.optimizer, self.lr_at(self.step), self.wd_at(self.step))
        self.scaler.unscale_(self.optimizer)
        max_norm = t.grad_clip if t.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        self.skip_reason = self._nonfinite(terms, grad_norm)
        if self.skip_reason is not None:
            if t.nonfinite == "stop":
                raise NonFiniteLossError(
                    f"{self.skip_reason} at step {self.step + 1}; training stopped, "
                    f"{self._last_good()}; lower optim.lr, check the data for NaN/inf, "
                    "or set train.nonfinite=skip"
                )
            # Skip the update and the EMA, but count the step: schedules, data order and the
            # checkpointed step stay aligned, so a resumed run still repeats this one exactly.
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped_steps += 1
            self.step += 1
            return grad_norm
        momentum = self.momentum_at(self.step)
        ema = not self.shared_target  # EMA-free (model.target=shared): nothing to average
        if ema and t.ema_timing == "before_step":  # the old bug, for the ablation only
            ema_update(self.model.target_encoder, self.model.context_encoder, momentum)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if ema and t.ema_timing == "after_step":
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
                if images.shape[0] < self.micro_batch:  # the loader dropped unreadable images
                    # Refill from the same batch: every rank keeps the shapes (and random
                    # draws) of the others, and every step sees a full batch.
                    refill = torch.arange(self.micro_batch - images.shape[0]) % images.shape[0]
                    images = torch.cat([images, images[refill]])
                yield micro, images
                micro += 1

    def fit(self) -> dict:
        """Train until ``total_steps`` (or ``stop_after`` more steps); returns the last metrics."""
        t, run = self.cfg.train, self.cfg.run
        resumed = self._prepare_run_dir()
        main = self.dist.is_main  # rank 0 alone logs, probes and writes checkpoints
        logger = (
            MetricsLogger(self.run_dir, tensorboard=run.tensorboard)
            if main
            else distributed.NullLogger()
        )
        probe = OnlineProbe(self.cfg, self.channels, self.mean, self.std, self.device)
        end = self.total_steps
        if t.stop_after:
            end = min(end, self.step + t.stop_after)
        if main and self.step < end and (t.knn_every or end == self.total_steps):
            probe._datasets()  # a missing or damaged test split fails now, not after training
        if resumed and main:
            print(f"resuming {self.run_dir} from step {self.step}/{self.total_steps}")
        last: dict = {}
        if self.step >= end:
            return last
        progress = _progress(run.progress and main, self.step, self.total_steps)
        self.model.train()
        window_images, window_start = 0, time.perf_counter()
        sums: list[Tensor] = []
        micro_in_step = 0
        for micro, images in self._batches():
            last_micro = micro_in_step == t.accum_steps - 1
            loss, per_level = self._micro_step(images, micro, sync=last_micro)
            sums.append(torch.stack([loss, *per_level]))
            micro_in_step += 1
            window_images += images.shape[0] * self.dist.world_size
            if micro_in_step < t.accum_steps:
                continue
            micro_in_step = 0
            # Averaged over ranks: every rank takes the same non-finite decision, logs are global.
            mean_terms = distributed.mean_over_ranks(torch.stack(sums).mean(0), self.dist)
            sums = []
            lr, momentum = self.lr_at(self.step), self.momentum_at(self.step)
            grad_norm = self._optimizer_step(mean_terms)
            if self.skip_reason is not None and main:
                print(f"step {self.step}: skipped, {self.skip_reason}", file=sys.stderr)
                logger.log(
                    self.step,
                    "nonfinite",
                    {"reason": self.skip_reason, "skipped_steps": self.skipped_steps},
                )
            if self.step % t.log_every == 0 or self.step == end:
                elapsed = time.perf_counter() - window_start
                values = mean_terms.tolist()
                named = dict(zip(self._term_names(len(values)), values))
                # The prediction part of the loss, sum_l w_l * loss_level_l.
                pred = sum(w * named[f"loss_level{i}"] for i, w in enumerate(self.weights))
                last = {
                    **named,  # loss, loss_level*, then sigreg, vicreg_*, contrastive, multicrop
                    "loss_pred": pred,
                    "lr": lr,
                    "weight_decay": self.wd_at(self.step - 1),
                    **({} if self.shared_target else {"ema_momentum": momentum}),
                    "grad_norm": float(grad_norm),
                    "images_per_s": window_images / max(elapsed, 1e-9),
                    "epoch": (self.step * t.accum_steps) / self.micro_per_epoch,
                }
                if t.nonfinite == "skip":
                    last["skipped_steps"] = self.skipped_steps
                if not self.loader.in_memory:  # decoded from files: unreadable ones are skipped
                    last["skipped_images"] = distributed.sum_over_ranks(
                        self.loader.skipped, self.dist, self.device
                    )
                logger.log(self.step, "train", last)
                progress.set_postfix(
                    loss=f"{values[0]:.4f}", lr=f"{lr:.2e}", img_s=f"{last['images_per_s']:.0f}"
                )
                window_images, window_start = 0, time.perf_counter()
            progress.update(1)
            finished = self.step == end
            probe_now = self.step == self.total_steps or (
                t.knn_every and self.step % t.knn_every == 0
            )
            if probe_now and main:
                probed = probe(self.model.target_encoder)
                logger.log(self.step, "probe", probed)
                warning = collapse_warning(self.step, probed)
                if warning:
                    print(warning, file=sys.stderr)
                self.model.train()
            if main and (finished or self.step % run.checkpoint_every == 0):
                self.save()
            if finished:
                break
        progress.close()
        logger.close()
        return last


def _check_first_image(dataset, name: str, channels: int) -> None:
    """Refuse a dataset whose images the model cannot take, before any compute is spent."""
    if len(dataset) == 0:
        raise ValueError(f"the {name} training set is empty; check data.root")
    image = dataset[0][0]
    if (
        not isinstance(image, torch.Tensor)
        or image.dtype != torch.uint8
        or image.dim() != 3
        or image.shape[0] != channels
    ):
        is_tensor = isinstance(image, Tensor)
        got = f"{image.dtype} {tuple(image.shape)}" if is_tensor else type(image).__name__
        fix = (
            f"set data.channels={image.shape[0]}"
            if is_tensor and image.dim() == 3 and image.dtype == torch.uint8
            else "make it return uint8 [C, H, W] tensors"
        )
        raise ValueError(
            f"the {name} dataset yields images of {got}, but the model takes uint8 "
            f"[{channels}, H, W]: {fix}"
        )


def _progress(enabled: bool, initial: int, total: int):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True)


def train(cfg: Config) -> Trainer:
    trainer = Trainer(cfg)
    try:
        trainer.fit()
        distributed.barrier(trainer.dist)  # every rank done, rank 0's last checkpoint written
    finally:
        # Drop DDP before the process group goes: its reducer holds the group, and a Gloo group
        # destroyed later, when the trainer is collected, can wait forever on a peer that has
        # already exited (seen once as a hung rank in the 2-process test).
        trainer.ddp = trainer.model
        gc.collect()
        distributed.cleanup(trainer.dist)  # leaves the process group torchrun's job set up
    return trainer


__all__ = ["Trainer", "train", "NonFiniteLossError", "dump_yaml"]
