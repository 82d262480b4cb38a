"""The training loop: data -> masks -> model -> loss -> AdamW step -> EMA -> logs/checkpoints.

:meth:`Trainer.train_step` is one optimizer step in the order of the algorithm;
:meth:`Trainer.fit` runs it and does everything around it (logging, probes, checkpoint cadence,
the non-finite policy). Every random draw of a step comes from streams seeded by
``(train.seed, micro-batch number)`` (train/inputs.py), and the data order of an epoch from
``(train.seed, epoch)``, so a run resumed from a checkpoint repeats exactly what the
uninterrupted run does.
"""

from __future__ import annotations

import contextlib
import gc
import math
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset

from hjepa import rundir, runlock
from hjepa.config import Config, level_weights
from hjepa.data.datasets import check_first_image, dataset_from_config, resolve_channels
from hjepa.data.loader import EpochLoader
from hjepa.data.normalize import channel_stats
from hjepa.device import check_support, pick_device, pick_precision
from hjepa.losses.combined import Objective
from hjepa.models.hjepa import HJEPA
from hjepa.models.vit import attention_backend
from hjepa.train import checkpoint as run_checkpoint
from hjepa.train import console, distributed, recipe, sizes
from hjepa.train.ema import ema_before_each_step, ema_update
from hjepa.train.inputs import InputPipeline
from hjepa.train.interrupt import StopSignals, TrainingInterrupted
from hjepa.train.logging import MetricsLogger
from hjepa.train.monitor import OnlineProbe, collapse_warning
from hjepa.train.optim import build_optimizer, set_schedule
from hjepa.train.schedules import cosine, linear, warmup_cosine
from hjepa.train.warm_start import WarmStart, load_init_weights

GPU_DATA_BYTES = 2 << 30  # in-memory training sets up to this size are moved to the GPU


class NonFiniteLossError(RuntimeError):
    """A loss term, the gradient or the weights became NaN/inf (``train.nonfinite=stop``)."""


@dataclass
class StepResult:
    """What one optimizer step measured."""

    terms: Tensor  # [loss, *objective terms], averaged over micro-batches and ranks
    grad_norm: Tensor  # before clipping
    skip_reason: str | None  # why the update was not applied (non-finite values), or None


class Trainer:
    """One run. ``allow_config_change``: resume even when the config changes the recipe of the
    run in ``run.dir`` (recorded in ``config_history.yaml``); see :mod:`hjepa.train.recipe`."""

    def __init__(self, cfg: Config, allow_config_change: bool = False):
        self.cfg = cfg
        self.allow_config_change = allow_config_change
        t, d = cfg.train, cfg.data
        self.run_dir = Path(cfg.run.dir)
        self.dist, self.device = distributed.setup(pick_device(t.device))
        self.precision = pick_precision(t.precision, self.device)
        check_support(cfg.model.attention, self.device, self.precision)
        if t.threads:
            torch.set_num_threads(t.threads)
        self.train_set = _training_set(cfg, self.device)
        self.channels = int(getattr(self.train_set, "channels", d.channels))
        self.mean, self.std = channel_stats(d.name, self.channels)
        ranks = self.dist.world_size
        self.micro_batch = sizes.micro_batch_size(cfg, ranks)  # per rank
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
        sizes.check_knn_bank(cfg, len(self.train_set))
        self.total_steps = sizes.total_steps(cfg, self.micro_per_epoch)
        self.warmup = sizes.warmup_steps(cfg, self.total_steps)
        self.inputs = InputPipeline(
            cfg, self.mean, self.std, self.device, self.dist, self.micro_batch * ranks
        )
        multicrop = self.inputs.local_crops is not None
        torch.manual_seed(t.seed)  # model initialisation
        loss = cfg.loss
        self.model = HJEPA(
            cfg.model,
            d.image_size,
            self.channels,
            multicrop=multicrop,
            contrastive=(
                (loss.contrastive_hidden_dim, loss.contrastive_out_dim)
                if loss.contrastive
                else None
            ),
        ).to(self.device)
        self.shared_target = self.model.shared_target  # EMA-free: no target copy, no EMA
        self.warm_start: WarmStart | None = None  # what train.init_from copied (a new run)
        if t.init_from and not run_checkpoint.has_checkpoint(self.run_dir):  # its own one wins
            self.warm_start = load_init_weights(self.model, cfg, self.device)
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
        self.max_grad_norm = t.grad_clip if t.grad_clip > 0 else math.inf
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        # Step 5 of train_step, or the ablation's EMA before each optimizer step.
        self.ema_after_step = not self.shared_target and t.ema_timing == "after_step"
        if not self.shared_target and t.ema_timing == "before_step":
            ema_before_each_step(
                self.optimizer,
                self.model.target_encoder,
                self.model.context_encoder,
                lambda: self.momentum_at(self.step),  # the step about to be taken
            )
        self.weights = level_weights(cfg)
        # Prediction loss + regularisers + contrast, every term logged (losses/combined.py).
        self.objective = Objective.from_config(cfg, multicrop=multicrop)
        self.two_views = self.objective.needs_two_views
        if self.two_views:
            sizes.check_two_views(self.micro_batch)
        self.step = 0
        self.skipped_steps = 0  # optimizer steps skipped for non-finite values (nonfinite=skip)
        self.saved_step: int | None = None  # step of the newest complete checkpoint on disk
        self.run_only_changes: list[recipe.Change] = []  # accepted differences on resume
        self.recipe_changes: list[recipe.Change] = []  # allowed (allow_config_change) ones

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

    # -- one step --------------------------------------------------------------------------
    def train_step(self, micro_batches: Sequence[tuple[int, Tensor]]) -> StepResult:
        """One optimizer step over ``micro_batches``, the ``(number, uint8 images)`` pairs of
        its accumulated micro-batches, in the order of the algorithm."""
        terms = []
        for i, (micro, images) in enumerate(micro_batches):
            # 1. Inputs: augmented view(s) and multi-block masks, each from its own stream.
            second = self.inputs.second_view(images, micro) if self.two_views else None
            x, index, views = self.inputs(images, micro)
            accumulate = i < len(micro_batches) - 1  # DDP all-reduces after the last one only
            with self._no_sync(accumulate), attention_backend(self.cfg.model.attention):
                with self._autocast():
                    # 2. Forward: target encoder on the whole image (no gradient), context
                    #    encoder on the context tokens, predictor at every level's targets.
                    out = self.ddp(x, index, views, second)
                    # 3. Loss: weighted per-level prediction loss + regularisers.
                    loss, parts = self.objective(out, step=self.step)
                # 4. Backward; gradients add up over the micro-batches of the step.
                self.scaler.scale(loss / len(micro_batches)).backward()
            terms.append(torch.stack([loss.detach(), *(p.detach() for p in parts.values())]))
        # Averaged over ranks: every rank takes the same skip decision, logs are global.
        mean_terms = distributed.mean_over_ranks(torch.stack(terms).mean(0), self.dist)
        # 4. Optimizer step on the clipped gradient, unless a loss term or the gradient is not
        #    finite (under fp16 the GradScaler itself skips overflowing gradients).
        set_schedule(self.optimizer, self.lr_at(self.step), self.wd_at(self.step))
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        names = self.term_names(mean_terms.numel())
        skip = nonfinite_reason(mean_terms, grad_norm, names, not self.scaler.is_enabled())
        if skip is None:
            self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        # 5. EMA: the target encoder moves towards the weights of the step just taken.
        if skip is None and self.ema_after_step:
            momentum = self.momentum_at(self.step)
            ema_update(self.model.target_encoder, self.model.context_encoder, momentum)
        # A skipped step still counts: schedules, data order and the checkpointed step stay
        # aligned, so a resumed run still repeats this one exactly.
        self.step += 1
        self.skipped_steps += skip is not None
        return StepResult(mean_terms, grad_norm, skip)

    def _no_sync(self, accumulate: bool):
        """Skip DDP's gradient all-reduce on micro-batches before the last of a step."""
        return self.ddp.no_sync() if self.dist.enabled and accumulate else contextlib.nullcontext()

    def _autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def term_names(self, count: int) -> list[str]:
        """Names of the ``count`` values of :attr:`StepResult.terms` (loss first)."""
        names = ["loss", *self.objective.term_names]
        return names if len(names) == count else [f"term{i}" for i in range(count)]

    # -- data ------------------------------------------------------------------------------
    def batches(self) -> Iterator[tuple[int, Tensor]]:
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

    def step_batches(self) -> Iterator[list[tuple[int, Tensor]]]:
        """The micro-batches of each optimizer step (``train.accum_steps`` of them) from the
        current step on: what :meth:`train_step` takes."""
        batches = self.batches()
        while True:
            yield [next(batches) for _ in range(self.cfg.train.accum_steps)]

    # -- checkpoints -----------------------------------------------------------------------
    def state_dict(self) -> dict:
        return run_checkpoint.state_dict(self)

    def load_state_dict(self, state: dict) -> None:
        run_checkpoint.load_state_dict(self, state)

    def save(self) -> None:
        # Never replace a good checkpoint with broken weights (an update can overflow even
        # when the loss and gradient that produced it were finite).
        if not all(bool(torch.isfinite(p).all()) for p in self.model.parameters()):
            raise NonFiniteLossError(
                f"the weights became non-finite at step {self.step}; not saving them over "
                f"{self._last_good()}: lower optim.lr or raise the clipping (train.grad_clip)"
            )
        run_checkpoint.write(self)
        self.saved_step = self.step

    def _last_good(self) -> str:
        return run_checkpoint.last_good(self.run_dir, self.saved_step)

    # -- the loop --------------------------------------------------------------------------
    def fit(self) -> dict:
        """Train until ``total_steps`` (or ``stop_after`` more steps); returns the last metrics.

        SIGINT/SIGTERM end the run after the current optimizer step, with a checkpoint:
        :class:`TrainingInterrupted` (see :mod:`hjepa.train.interrupt`). The run dir is this
        process's while it trains (:mod:`hjepa.runlock`): another trainer on it is refused.
        """
        with StopSignals() as stop, self._own_run_dir():
            return self._fit(stop)

    @contextlib.contextmanager
    def _own_run_dir(self) -> Iterator[None]:
        """Rank 0 holds the run dir's lock for the whole fit: rank 0 alone writes it, so the
        ranks of one torchrun job share it and a second job is refused."""
        if not self.dist.is_main:
            yield
            return
        lock = runlock.acquire(self.run_dir)
        if lock.took_over():
            console.say(f"{self.run_dir}: {lock.took_over()}", file=sys.stderr)
        try:
            yield
        finally:
            lock.release()

    def _interrupted(self, signum: int, progress, logger) -> TrainingInterrupted:
        """Save the step just finished (rank 0, unless saved already), then every rank stops."""
        if self.dist.is_main and self.step and self.saved_step != self.step:
            self.save()
        progress.close()
        logger.close()
        distributed.barrier(self.dist)
        last = run_checkpoint.last_path(self.run_dir) if self.saved_step is not None else None
        return TrainingInterrupted(signum, self.step, self.total_steps, last, self.dist.is_main)

    def _fit(self, stop: StopSignals) -> dict:
        t, run = self.cfg.train, self.cfg.run
        resumed = run_checkpoint.prepare_run_dir(self)
        main = self.dist.is_main  # rank 0 alone logs, probes and writes checkpoints
        if main:  # every invocation, resumes included, next to config.yaml
            rundir.record_invocation(
                self.run_dir, self.device, step=self.step, world_size=self.dist.world_size
            )
        logger = (
            MetricsLogger(self.run_dir, tensorboard=run.tensorboard, start_step=self.step)
            if main
            else distributed.NullLogger()
        )
        probe = OnlineProbe(self.cfg, self.channels, self.mean, self.std, self.device)
        end = self.total_steps
        if t.stop_after:
            end = min(end, self.step + t.stop_after)
        if main and self.step < end and (t.knn_every or end == self.total_steps):
            probe.datasets()  # a missing or damaged test split fails now, not after training
        if resumed and main:
            also = self.run_only_changes + self.recipe_changes
            shown = f" ({', '.join(map(str, also))})" if also else ""
            print(f"resuming {self.run_dir} from step {self.step}/{self.total_steps}{shown}")
        if self.recipe_changes:
            changes = {c.key: [c.old, c.new] for c in self.recipe_changes}
            logger.log(self.step, "config_change", {"changes": changes, "file": recipe.HISTORY})
        if self.warm_start is not None and main:
            print(self.warm_start.describe())
            logger.log(self.step, "init_from", self.warm_start.record())
        last: dict = {}
        if self.step >= end:
            return last
        progress = console.progress_bar(run.progress and main, self.step, self.total_steps)
        signum = stop.agreed(self.dist, self.device)
        if signum:  # a signal during setup: nothing new to save
            raise self._interrupted(signum, progress, logger)
        self.model.train()
        window_images, window_start = 0, time.perf_counter()
        for micro_batches in self.step_batches():
            result = self.train_step(micro_batches)
            window_images += sum(len(images) for _, images in micro_batches) * self.dist.world_size
            if result.skip_reason is not None:
                self._nonfinite_policy(result.skip_reason, logger)
            if self.step % t.log_every == 0 or self.step == end:
                elapsed = time.perf_counter() - window_start
                last = self._train_record(result, window_images / max(elapsed, 1e-9))
                logger.log(self.step, "train", last)
                progress.set_postfix(
                    loss=f"{float(result.terms[0]):.4f}",
                    lr=f"{last['lr']:.2e}",
                    img_s=f"{last['images_per_s']:.0f}",
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
                console.say(console.probe_line(self.step, probed))
                warning = collapse_warning(self.step, probed)
                if warning:
                    console.say(warning, file=sys.stderr)
                self.model.train()
            if main and (finished or self.step % run.checkpoint_every == 0):
                self.save()
            if finished:
                break
            signum = stop.agreed(self.dist, self.device)  # every rank: the same answer
            if signum:
                raise self._interrupted(signum, progress, logger)
        progress.close()
        logger.close()
        return last

    def _nonfinite_policy(self, reason: str, logger) -> None:
        """``train.nonfinite``: ``stop`` raises; ``skip`` reports the skipped step and goes on."""
        if self.cfg.train.nonfinite == "stop":
            raise NonFiniteLossError(
                f"{reason} at step {self.step}; training stopped, {self._last_good()}; lower "
                "optim.lr, check the data for NaN/inf, or set train.nonfinite=skip"
            )
        if self.dist.is_main:
            console.say(f"step {self.step}: skipped, {reason}", file=sys.stderr)
            logger.log(
                self.step, "nonfinite", {"reason": reason, "skipped_steps": self.skipped_steps}
            )

    def _train_record(self, result: StepResult, images_per_s: float) -> dict:
        """The ``train`` line of ``metrics.jsonl`` for the step just taken."""
        t, step = self.cfg.train, self.step - 1  # the schedules' values that step used
        values = result.terms.tolist()
        named = dict(zip(self.term_names(len(values)), values))
        # The prediction part of the loss, sum_l w_l * loss_level_l.
        pred = sum(w * named[f"loss_level{i}"] for i, w in enumerate(self.weights))
        record = {
            **named,  # loss, loss_level*, then sigreg, vicreg_*, contrastive, multicrop
            "loss_pred": pred,
            "lr": self.lr_at(step),
            "weight_decay": self.wd_at(step),
            **({} if self.shared_target else {"ema_momentum": self.momentum_at(step)}),
            "grad_norm": float(result.grad_norm),
            "images_per_s": images_per_s,
            "epoch": (self.step * t.accum_steps) / self.micro_per_epoch,
        }
        if t.nonfinite == "skip":
            record["skipped_steps"] = self.skipped_steps
        if not self.loader.in_memory:  # decoded from files: unreadable ones are skipped
            record["skipped_images"] = distributed.sum_over_ranks(
                self.loader.skipped, self.dist, self.device
            )
        return record


def nonfinite_reason(
    terms: Tensor, grad_norm: Tensor, names: list[str], check_grad: bool
) -> str | None:
    """Why a step must not be applied (a NaN/inf loss term or gradient), or None.

    ``terms``: the loss then each term (``names``). The gradient is checked too when
    ``check_grad``: it can overflow while the loss is finite (under fp16 the GradScaler
    already skips such steps, so only the loss is checked there).
    """
    checks = [terms.detach().float().flatten()]
    if check_grad:
        checks.append(grad_norm.detach().float().reshape(1))
    if bool(torch.isfinite(torch.cat(checks)).all()):  # one host sync
        return None
    if not bool(torch.isfinite(terms).all()):
        values = dict(zip(names, terms.flatten().tolist()))
        bad = [f"{k}={v}" for k, v in list(values.items())[1:] if not math.isfinite(v)]
        return f"non-finite loss ({', '.join(bad or [f'loss={values[next(iter(values))]}'])})"
    return (
        f"non-finite gradient (grad norm {float(grad_norm)}) from a finite loss "
        f"(loss={float(terms.flatten()[0]):.4g})"
    )


def _training_set(cfg: Config, device: torch.device) -> Dataset:
    """The training split, its first image checked against the model's input; small in-memory
    sets live on the GPU, so batches are gathered there with no host copies."""
    train_set = dataset_from_config(cfg, "train")
    channels = resolve_channels(cfg, train_set)  # data.channels=0 takes the data's
    check_first_image(train_set, cfg.data.name, channels)
    images = getattr(train_set, "images", None)
    if device.type == "cuda" and images is not None and images.nbytes <= GPU_DATA_BYTES:
        train_set.images = images.to(device)
    return train_set


def train(cfg: Config, allow_config_change: bool = False) -> Trainer:
    """Train ``cfg`` (resuming its run dir); :class:`TrainingInterrupted` on SIGINT/SIGTERM."""
    trainer = Trainer(cfg, allow_config_change=allow_config_change)
    try:
        with console.warnings_above():  # above the progress bar, not into it
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


__all__ = ["Trainer", "StepResult", "train", "NonFiniteLossError", "TrainingInterrupted"]
