"""The training loop: data -> masks -> model -> loss -> AdamW step -> EMA -> logs/checkpoints.

The trainer runs the parts :func:`hjepa.train.parts.build_parts` makes from the config (a tool
passes its own: ``Trainer(cfg, parts=dataclasses.replace(build_parts(cfg), inputs=...))``).
:meth:`Trainer.train_step` is one optimizer step in the order of the algorithm;
:meth:`Trainer.fit` runs it and does everything around it (logging, probes, checkpoint cadence,
the non-finite policy). Every random draw of a step comes from streams seeded by
``(train.seed, micro-batch number)`` (train/inputs.py), and the data order of an epoch from
``(train.seed, epoch)``, so a run resumed from a checkpoint repeats exactly what the
uninterrupted run does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from hjepa import rundir, runlock
from hjepa.config import Config
from hjepa.models.vit import attention_backend
from hjepa.train import console, distributed, recipe, resume
from hjepa.train.compiled import CompiledUpdate, compiled_forward_loss
from hjepa.train.ema import ema_before_each_step, ema_update
from hjepa.train.inputs import InputPipeline
from hjepa.train.interrupt import StopSignals, TrainingInterrupted
from hjepa.train.logging import MetricsLogger
from hjepa.train.monitor import OnlineProbe, collapse_warning
from hjepa.train.optim import finite_step, set_schedule, step_unless
from hjepa.train.parts import Parts, build_parts


class NonFiniteLossError(RuntimeError):
    """A loss term, the gradient or the weights became NaN/inf (``train.nonfinite=stop``)."""


@dataclass
class StepResult:
    """What one optimizer step measured, as device tensors: reading one waits for the step
    (the trainer reads them on its logging and checkpoint cadence only)."""

    terms: Tensor  # [loss, *objective terms], averaged over micro-batches and ranks
    grad_norm: Tensor  # before clipping
    applied: Tensor  # bool []: False where the update was skipped (non-finite values)
    step: int  # the trainer's step count after this step (what messages name)
    names: list[str]  # of ``terms``
    check_grad: bool  # whether a non-finite gradient alone skips it (not under fp16)

    @property
    def skip_reason(self) -> str | None:
        """Why the update was not applied, or None (reads the step's flag back)."""
        if bool(self.applied):
            return None
        return nonfinite_reason(self.terms, self.grad_norm, self.names, self.check_grad)


#: ``around_step(train_step, micro_batches) -> StepResult``: see :meth:`Trainer.fit`.
AroundStep = Callable[..., "StepResult"]


def _part(name: str) -> property:
    """A read-only view of one of the trainer's parts (they are built and replaced whole, in
    :func:`build_parts`, never assigned on a trainer)."""
    return property(lambda self: getattr(self.parts, name), doc=f"``parts.{name}``")


def _data(name: str) -> property:
    return property(lambda self: getattr(self.parts.data, name), doc=f"``parts.data.{name}``")


class Trainer:
    """One run of ``parts`` (by default those ``cfg`` describes). ``allow_config_change``:
    resume even when the config changes the recipe of the run in ``run.dir`` (recorded in
    ``config_history.yaml``); see :mod:`hjepa.train.recipe`."""

    model = _part("model")
    inputs = _part("inputs")
    objective = _part("objective")
    optimizer = _part("optimizer")
    scaler = _part("scaler")
    ddp = _part("ddp")
    dist = _part("env")
    device = _part("device")
    precision = _part("precision")
    params = _part("params")
    warm_start = _part("warm_start")
    train_set = _data("train_set")
    loader = _data("loader")
    micro_batch = _data("micro_batch")
    channels = _data("channels")
    mean = _data("mean")
    std = _data("std")

    def __init__(self, cfg: Config, allow_config_change: bool = False, parts: Parts | None = None):
        self.cfg = cfg
        self.parts = build_parts(cfg) if parts is None else parts
        self.allow_config_change = allow_config_change
        self.run_dir = Path(cfg.run.dir)
        self.step = 0
        # Optimizer steps skipped for non-finite values, counted on the device (no step waits).
        self._skipped = torch.zeros((), dtype=torch.int64, device=self.device)
        self.saved_step: int | None = None  # step of the newest complete checkpoint on disk
        self.run_only_changes: list[recipe.Change] = []  # accepted differences on resume
        self.recipe_changes: list[recipe.Change] = []  # allowed (allow_config_change) ones
        if self.parts.ema_timing == "before_step":  # the ablation: EMA of the pre-step weights
            model = self.model
            ema_before_each_step(
                self.optimizer,
                model.target_encoder,
                model.context_encoder,
                lambda: self.momentum_at(self.step),  # the step about to be taken
            )

    @property
    def skipped_steps(self) -> int:
        """Optimizer steps skipped for non-finite values (reads the device's count back)."""
        return int(self._skipped)

    @skipped_steps.setter
    def skipped_steps(self, count: int) -> None:
        self._skipped = torch.full((), count, dtype=torch.int64, device=self.device)

    @property
    def ema_after_step(self) -> bool:
        """Whether step 5 of :meth:`train_step` takes the EMA (not EMA-free, not the ablation)."""
        return self.parts.ema_timing == "after_step"

    @property
    def total_steps(self) -> int:
        return self.parts.schedules.total_steps

    @property
    def micro_per_epoch(self) -> int:
        return len(self.loader)

    @property
    def weights(self) -> list[float]:
        """:math:`w_l`, the objective's weight of each level's prediction loss."""
        return self.objective.level_weights

    # -- schedules -------------------------------------------------------------------------
    def lr_at(self, step: int) -> float:
        return self.parts.schedules.lr_at(step)

    def wd_at(self, step: int) -> float:
        return self.parts.schedules.wd_at(step)

    def momentum_at(self, step: int) -> float:
        return self.parts.schedules.momentum_at(step)

    # -- one step --------------------------------------------------------------------------
    def train_step(self, micro_batches: Sequence[tuple[int, Tensor]]) -> StepResult:
        """One optimizer step over ``micro_batches``, the ``(number, uint8 images)`` pairs of
        its accumulated micro-batches, in the order of the algorithm."""
        terms = []
        for i, (micro, images) in enumerate(micro_batches):
            # 1. Inputs: augmented view(s) and multi-block masks, each from its own stream.
            second = (
                self.inputs.second_view(images, micro) if self.objective.needs_two_views else None
            )
            x, index, views = self.inputs(images, micro)
            accumulate = i < len(micro_batches) - 1  # DDP all-reduces after the last one only
            with self._no_sync(accumulate), attention_backend(self.cfg.model.attention):
                with self._autocast():
                    # 2. Forward: target encoder on the whole image (no gradient), context
                    #    encoder on the context tokens, predictor at every level's targets.
                    # 3. Loss: weighted per-level prediction loss + regularisers.
                    loss, parts = self._forward_loss(x, index, views, second)
                # 4. Backward; gradients add up over the micro-batches of the step.
                self.scaler.scale(loss / len(micro_batches)).backward()
            terms.append(torch.stack([loss.detach(), *(p.detach() for p in parts.values())]))
        # Averaged over ranks: every rank takes the same skip decision, logs are global.
        mean_terms = distributed.mean_over_ranks(torch.stack(terms).mean(0), self.dist)
        # 4. Optimizer step on the clipped gradient, unless a loss term or the gradient is not
        #    finite, decided on the device: the step never waits for the flag, the trainer
        #    reads it later.
        # 5. EMA: the target encoder moves towards the weights of the step just taken.
        grad_norm, applied, check_grad = self._update(mean_terms)
        self.optimizer.zero_grad(set_to_none=True)
        # A skipped step still counts: schedules, data order and the checkpointed step stay
        # aligned, so a resumed run still repeats this one exactly.
        self.step += 1
        self._skipped += ~applied
        names = self.term_names(mean_terms.numel())
        return StepResult(mean_terms, grad_norm, applied, self.step, names, check_grad)

    def _forward_loss(self, x: Tensor, index, views, second) -> tuple[Tensor, dict[str, Tensor]]:
        """Steps 2 and 3 of :meth:`train_step`; under ``train.compile`` one graph per token
        bucket, with SIGReg's directions of the step drawn before it (hjepa.train.compiled)."""
        if not self.cfg.train.compile:
            return self.objective(self.ddp(x, index, views, second), step=self.step)
        dtype = torch.float64 if self.params[0].dtype == torch.float64 else torch.float32
        draws = self.objective.draws(self.step, self.cfg.model.embed_dim, dtype, self.device)
        return compiled_forward_loss(self.ddp, self.objective, x, index, views, second, draws)

    def _update(self, mean_terms: Tensor) -> tuple[Tensor, Tensor, bool]:
        """Steps 4 and 5 of :meth:`train_step` (after the backward): ``(grad_norm, applied,
        check_grad)``. Under ``train.compile`` (not fp16) one graph, :class:`CompiledUpdate`."""
        lr, weight_decay = self.lr_at(self.step), self.wd_at(self.step)
        set_schedule(self.optimizer, lr, weight_decay)
        if self._compiled_update is not None:
            momentum = self.momentum_at(self.step)
            grad_norm, applied = self._compiled_update(mean_terms, lr, weight_decay, momentum)
            return grad_norm, applied, True
        check_grad = not self.scaler.is_enabled()
        if not check_grad:  # fp16: the GradScaler skips what a non-finite loss leaves too
            applied = finite_step(mean_terms, None)
            poison_unless(applied, [p.grad for p in self.params if p.grad is not None])
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.parts.max_grad_norm)
        if check_grad:
            applied = finite_step(mean_terms, grad_norm)
        self._optimizer_step(applied)
        if self.ema_after_step:
            momentum = self.momentum_at(self.step)
            ema_update(self.model.target_encoder, self.model.context_encoder, momentum, applied)
        return grad_norm, applied, check_grad

    @functools.cached_property
    def _compiled_update(self) -> CompiledUpdate | None:
        """Steps 4 and 5 as one compiled graph under ``train.compile``; None otherwise, and
        under fp16, whose GradScaler takes its own (eager) optimizer step."""
        if not self.cfg.train.compile or self.scaler.is_enabled():
            return None
        timing = self.parts.ema_timing
        ema_pair = (self.model.target_encoder, self.model.context_encoder)
        return CompiledUpdate(
            self.optimizer,
            self.params,
            self.parts.max_grad_norm,
            ema_pair if timing != "none" else None,
            timing if timing != "none" else None,
        )

    def _optimizer_step(self, applied: Tensor) -> None:
        """The optimizer step where ``applied``; a skipped one changes no weight and no state."""
        if self.scaler.is_enabled():  # fp16: the scaler's own found_inf, on the device too
            self.scaler.step(self.optimizer)
            self.scaler.update()
        elif getattr(self.optimizer, "_step_supports_amp_scaling", False):
            step_unless(self.optimizer, (~applied).float())
        elif bool(applied):  # an optimizer that cannot skip on the device: the host decides
            self.optimizer.step()

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
        # Masks (and crops of in-memory images) drawn ahead by number, in the pipeline's
        # DataLoader workers: the step only applies them. A tool's own inputs draw their own.
        pipeline = self.inputs if isinstance(self.inputs, InputPipeline) else None
        drawn = pipeline.prepared_from(micro) if pipeline is not None else None
        while True:
            epoch, start = divmod(micro, self.micro_per_epoch)
            for images, _labels in self.loader.iter_epoch(epoch, start_batch=start):
                if images.shape[0] < self.micro_batch:  # the loader dropped unreadable images
                    # Refill from the same batch: every rank keeps the shapes (and random
                    # draws) of the others, and every step sees a full batch.
                    refill = torch.arange(self.micro_batch - images.shape[0]) % images.shape[0]
                    images = torch.cat([images, images[refill]])
                if pipeline is not None:
                    pipeline.keep(next(drawn))
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
        """The parts' own state dicts and the trainer's counters: everything a resumed run
        needs to repeat the uninterrupted one exactly."""
        return {
            **self.parts.state_dict(),
            "step": self.step,
            "total_steps": self.total_steps,
            "nonfinite_skipped": self.skipped_steps,
            "config": self.cfg.to_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue the run ``state`` holds: :class:`ConfigError` (a
        :class:`recipe.RecipeChangeError` for a changed recipe) before any weight is touched."""
        resume.check_modules(state, self.model.optional_modules(), self.run_dir)
        self.run_only_changes, self.recipe_changes = recipe.check_resume(
            state["config"], self.cfg, self.run_dir, allow=self.allow_config_change
        )
        stored_init = state["config"].get("train", {}).get("init_from", "")
        if stored_init and not self.cfg.train.init_from:  # keep the record of where it started
            self.cfg.train.init_from = stored_init
        self.parts.load_state_dict(state)
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
        resume.write(self.run_dir, self.state_dict(), self.cfg.run.keep_every)
        self.saved_step = self.step

    def _last_good(self) -> str:
        return resume.last_good(self.run_dir, self.saved_step)

    def _open_run_dir(self) -> bool:
        """Resume from the newest usable checkpoint, if any (a refused resume leaves every file
        of the run dir as it was); rank 0 then records the (re)start. Whether it resumed."""
        restore = lambda path: resume.read(path, self.device, self.load_state_dict)
        restored = resume.open_run_dir(self.run_dir, self.dist, self.train_set, restore)
        if restored is not None:
            self.saved_step = self.step
        if self.dist.is_main:
            resume.record_start(
                self.run_dir, self.cfg, self.train_set, self.step, restored, self.recipe_changes
            )
            distributed.barrier(self.dist)  # the other ranks resume after rank 0
        return restored is not None

    # -- the loop --------------------------------------------------------------------------
    def fit(self, stop_after: int | None = None, around_step: AroundStep | None = None) -> dict:
        """Train until ``total_steps``, or ``stop_after`` more steps (default
        ``train.stop_after``; 0: to the end); returns the last metrics. ``around_step(step,
        micro_batches)``, when given, takes each step in place of ``step(micro_batches)``
        (:meth:`train_step`): a tool's hook to time or pair it.

        SIGINT/SIGTERM end the run after the current optimizer step, with a checkpoint:
        :class:`TrainingInterrupted` (see :mod:`hjepa.train.interrupt`). The run dir is this
        process's while it trains (:mod:`hjepa.runlock`): another trainer on it is refused.
        """
        stop_after = self.cfg.train.stop_after if stop_after is None else stop_after
        step = self.train_step if around_step is None else partial(around_step, self.train_step)
        with StopSignals() as stop, self._own_run_dir():
            return self._fit(stop, stop_after, step)

    @contextlib.contextmanager
    def using(self, **parts: Any) -> Iterator[None]:
        """Run with some parts replaced, restored after: ``with trainer.using(inputs=timed):``
        (a tool's hook to time or stub a part of a built trainer)."""
        kept = self.parts
        self.parts = dataclasses.replace(kept, **parts)
        try:
            yield
        finally:
            self.parts = kept

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
        last = resume.last_path(self.run_dir) if self.saved_step is not None else None
        return TrainingInterrupted(signum, self.step, self.total_steps, last, self.dist.is_main)

    def _fit(self, stop: StopSignals, stop_after: int, step: AroundStep) -> dict:
        t = self.cfg.train
        logger, probe, end = self._start(stop_after)
        last: dict = {}
        if self.step >= end:
            return last
        main = self.dist.is_main
        progress = console.progress_bar(self.cfg.run.progress and main, self.step, self.total_steps)
        signum = stop.agreed(self.dist, self.device)
        if signum:  # a signal during setup: nothing new to save
            raise self._interrupted(signum, progress, logger)
        self.model.train()
        window_images, window_start = 0, time.perf_counter()
        unread: list[StepResult] = []  # steps whose skip flags nobody has read yet
        for micro_batches in self.step_batches():
            result = step(micro_batches)
            unread.append(result)
            window_images += sum(len(images) for _, images in micro_batches) * self.dist.world_size
            log_now = self.step % t.log_every == 0 or self.step == end
            if log_now or self.step % self.cfg.run.checkpoint_every == 0:
                self._read_skips(unread, logger)  # one host read for the steps since the last
                unread = []
            if log_now:
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
            self._probe_and_save(probe, logger, finished=self.step == end)
            if self.step == end:
                break
            signum = stop.agreed(self.dist, self.device)  # every rank: the same answer
            if signum:
                self._read_skips(unread, logger)  # train.nonfinite=stop wins over saving
                raise self._interrupted(signum, progress, logger)
        progress.close()
        logger.close()
        return last

    def _start(
        self, stop_after: int
    ) -> tuple[MetricsLogger | distributed.NullLogger, OnlineProbe | None, int]:
        """Open the run dir (resuming), its logger and online probe (None where this process
        never probes), and say where the run stands. Returns them and the step this invocation
        ends at."""
        t, main = self.cfg.train, self.dist.is_main  # rank 0 alone logs, probes and writes
        resumed = self._open_run_dir()
        if main:  # every invocation, resumes included, next to config.yaml
            rundir.record_invocation(
                self.run_dir, self.device, step=self.step, world_size=self.dist.world_size
            )
        logger = (
            MetricsLogger(self.run_dir, tensorboard=self.cfg.run.tensorboard, start_step=self.step)
            if main
            else distributed.NullLogger()
        )
        end = min(self.total_steps, self.step + stop_after) if stop_after else self.total_steps
        probe = None  # rank 0 probes on the knn_every cadence and at the end of the schedule
        if main and self.step < end and (t.knn_every or end == self.total_steps):
            probe = OnlineProbe.from_config(self.cfg, self.mean, self.std, self.device)
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
        return logger, probe, end

    def _probe_and_save(self, probe: OnlineProbe | None, logger, finished: bool) -> None:
        """The online kNN probe on its cadence (and at the end of the schedule), then the
        checkpoint on its cadence (and when this invocation ends); rank 0 only."""
        if not self.dist.is_main:
            return
        every = self.cfg.train.knn_every
        due = self.step == self.total_steps or (every and self.step % every == 0)
        if due:
            assert probe is not None, "_start builds the probe whenever one is due"
            probed = probe(self.model.target_encoder)
            logger.log(self.step, "probe", probed)
            console.say(console.probe_line(self.step, probed))
            warning = collapse_warning(self.step, probed)
            if warning:
                console.say(warning, file=sys.stderr)
            self.model.train()
        if finished or self.step % self.cfg.run.checkpoint_every == 0:
            self.save()

    def _read_skips(self, results: list[StepResult], logger) -> None:
        """Read the skip flags of ``results`` back (one host read) and apply the non-finite
        policy to every skipped step among them, in order."""
        if not results:
            return
        applied = torch.stack([r.applied for r in results]).tolist()
        skipped = self.skipped_steps - applied.count(False)  # before the first of them
        for result, ok in zip(results, applied):
            if not ok:
                skipped += 1
                self._nonfinite_policy(result, skipped, logger)

    def _nonfinite_policy(self, result: StepResult, skipped: int, logger) -> None:
        """``train.nonfinite``: ``stop`` raises; ``skip`` reports the skipped step and goes on."""
        reason, step = result.skip_reason, result.step
        if self.cfg.train.nonfinite == "stop":
            raise NonFiniteLossError(
                f"{reason} at step {step}; training stopped, {self._last_good()}; lower "
                "optim.lr, check the data for NaN/inf, or set train.nonfinite=skip"
            )
        if self.dist.is_main:
            console.say(f"step {step}: skipped, {reason}", file=sys.stderr)
            logger.log(step, "nonfinite", {"reason": reason, "skipped_steps": skipped})

    def _train_record(self, result: StepResult, images_per_s: float) -> dict:
        """The ``train`` line of ``metrics.jsonl`` for the step just taken."""
        t, step = self.cfg.train, self.step - 1  # the schedules' values that step used
        values = result.terms.tolist()
        named = dict(zip(self.term_names(len(values)), values))
        # The prediction part of the loss, sum_l w_l * loss_level_l.
        pred = sum(w * named[f"loss_level{i}"] for i, w in enumerate(self.objective.level_weights))
        record = {
            **named,  # loss, loss_level*, then sigreg, vicreg_*, contrastive, multicrop
            "loss_pred": pred,
            "lr": self.lr_at(step),
            "weight_decay": self.wd_at(step),
            **({} if self.model.shared_target else {"ema_momentum": self.momentum_at(step)}),
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


def poison_unless(applied: Tensor, grads: list[Tensor]) -> None:
    """Make ``grads`` NaN where ``applied`` is False (the fp16 GradScaler then skips the step),
    unchanged otherwise; on the device."""
    if grads:
        torch._foreach_mul_(grads, torch.where(applied, 1.0, math.nan).to(grads[0].dtype))


def nonfinite_reason(
    terms: Tensor, grad_norm: Tensor, names: list[str], check_grad: bool
) -> str | None:
    """Why a step must not be applied (a NaN/inf loss term or gradient), or None.

    ``terms``: the loss then each term (``names``). The gradient is checked too when
    ``check_grad``: it can overflow while the loss is finite (under fp16 the GradScaler
    already skips such steps, so only the loss is checked there).
    """
    if bool(finite_step(terms, grad_norm if check_grad else None)):  # one host sync
        return None
    if not bool(torch.isfinite(terms).all()):
        values = dict(zip(names, terms.flatten().tolist()))
        bad = [f"{k}={v}" for k, v in list(values.items())[1:] if not math.isfinite(v)]
        return f"non-finite loss ({', '.join(bad or [f'loss={values[next(iter(values))]}'])})"
    return (
        f"non-finite gradient (grad norm {float(grad_norm)}) from a finite loss "
        f"(loss={float(terms.flatten()[0]):.4g})"
    )


@dataclass(frozen=True)
class TrainResult:
    """Where a :func:`train` call left its run: ``step`` of the schedule's ``total_steps``, and
    whether this process is rank 0 (the one that reports, under torchrun)."""

    step: int
    total_steps: int
    is_main: bool


def train(cfg: Config, allow_config_change: bool = False) -> TrainResult:
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
        trainer.parts.drop_ddp()
        gc.collect()
        distributed.cleanup(trainer.dist)  # leaves the process group torchrun's job set up
    return TrainResult(trainer.step, trainer.total_steps, trainer.dist.is_main)


__all__ = [
    "Trainer",
    "StepResult",
    "TrainResult",
    "train",
    "NonFiniteLossError",
    "TrainingInterrupted",
]
