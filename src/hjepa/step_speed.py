"""Throughput of a full training step, as a ratio to the context encoder's forward+backward.

Both are timed side by side on the same batches (interleaved repeats, median), so the ratio
holds on a noisy shared machine where a bare wall time would not.
"""

from __future__ import annotations

import statistics
import time

import torch

from hjepa.config import Config


def _timed(fn) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - wall, time.process_time() - cpu


def benchmark_step(cfg: Config, steps: int = 10, warmup: int = 3) -> dict[str, float]:
    from hjepa.data.normalize import to_input
    from hjepa.train.trainer import Trainer

    cfg.run.tensorboard = False
    trainer = Trainer(cfg)
    trainer.model.train()
    batches = trainer.step_batches()
    encoder = trainer.model.context_encoder

    def train_step():
        trainer.train_step(next(batches))

    _, sample = next(trainer.batches())
    x = to_input(sample.to(trainer.device), trainer.mean, trainer.std, cfg.data.image_size)

    def encoder_step():
        encoder(x).float().pow(2).mean().backward()
        encoder.zero_grad(set_to_none=True)

    step_times, enc_times = [], []
    for i in range(warmup + steps):
        s = _timed(train_step)
        e = _timed(encoder_step)
        if i >= warmup:
            step_times.append(s)
            enc_times.append(e)
    batch = cfg.train.batch_size
    step_wall = statistics.median(t[0] for t in step_times)
    enc_wall = statistics.median(t[0] for t in enc_times) * cfg.train.accum_steps
    return {
        "batch_size": batch,
        "device": str(trainer.device),
        "train_images_per_s": batch / step_wall,
        "encoder_fwd_bwd_images_per_s": batch / enc_wall,
        "train_step_over_encoder_fwd_bwd": step_wall / enc_wall,
        "train_cpu_s_per_image": statistics.median(t[1] for t in step_times) / batch,
    }
