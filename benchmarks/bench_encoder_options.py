"""Cost of the encoder and data options, measured side by side in one run.

Three tables (wall times printed, never asserted):

* ``memory``: peak memory of one training step (forward + backward) with and without
  ``model.grad_checkpointing``. On CUDA: ``torch.cuda.max_memory_allocated`` minus the memory
  allocated before the step. On CPU: the growth of the process's peak resident set size
  (``VmHWM`` in ``/proc/self/status``, reset through ``/proc/self/clear_refs``) during the
  step, each setting in a fresh subprocess so that allocator caches of one cannot hide the
  other.
* ``step``: training-step time (forward, backward, optimizer, EMA) per attention backend
  available on the device and per model option (RoPE, LayerScale, FPN, checkpointing,
  multi-crop), as a ratio to the plain configuration; repeats are interleaved round-robin and
  the median is kept.
* ``augment``: time of each augmentation on one batch, as a ratio to the base crop + flip and
  to one plain training step.

Usage: ``python benchmarks/bench_encoder_options.py [--quick] [--device cpu|cuda]
[--batch B] [--repeats R] [--threads T]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from hjepa.config import load_config
from hjepa.data.deit3 import DeiT3Augment
from hjepa.data.multicrop import LocalCrops
from hjepa.train.trainer import Trainer

MODEL = [  # the quickstart encoder and predictor, on synthetic Fashion-MNIST-sized images
    "data.name=synthetic",
    "data.channels=1",
    "data.image_size=28",
    "data.synthetic_size=512",
    "model.patch_size=4",
    "model.embed_dim=128",
    "model.depth=6",
    "model.num_heads=4",
    "model.predictor_embed_dim=64",
    "model.predictor_depth=3",
    "model.predictor_num_heads=4",
    "run.progress=false",
    "run.tensorboard=false",
]

OPTIONS = {
    "plain": [],
    "rope": ["model.pos_embed=rope"],
    "layer_scale": ["model.layer_scale=0.1"],
    "fpn_add": ["model.fpn=add"],
    "fpn_concat": ["model.fpn=concat"],
    "checkpointing": ["model.grad_checkpointing=true"],
    "multicrop2": ["data.multicrop.num_local=2", "data.multicrop.local_size=16"],
    "multicrop4": ["data.multicrop.num_local=4", "data.multicrop.local_size=16"],
}

AUGMENTS = {
    "three_augment": dict(three_augment=1.0),
    "color_jitter": dict(color_jitter=0.3),
    "mixup": dict(mixup=0.8),
    "cutmix": dict(cutmix=1.0),
    "random_erasing": dict(random_erasing=0.25),
    "all_deit3": dict(three_augment=1.0, color_jitter=0.3, mixup=0.8, cutmix=1.0),
}


def _trainer(device: str, batch: int, overrides: list[str], tmp: Path) -> Trainer:
    cfg = load_config(
        None,
        [
            *MODEL,
            f"train.device={device}",
            f"train.batch_size={batch}",
            "train.max_steps=1000",
            f"run.dir={tmp}",
            *overrides,
        ],
    )
    trainer = Trainer(cfg)
    trainer.model.train()
    return trainer


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _step_fn(trainer: Trainer) -> Callable[[], None]:
    batches = trainer.step_batches()

    def step() -> None:
        trainer.train_step(next(batches))

    return step


def _round_robin(fns: dict[str, Callable[[], object]], repeats: int, device) -> dict[str, float]:
    for fn in fns.values():  # warm-up (allocations, kernel selection)
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(_timed(fn, device))
    return {name: statistics.median(t) for name, t in times.items()}


# -- memory ---------------------------------------------------------------------------------


def _hwm_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status")


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def memory_child(device: str, batch: int, checkpointing: bool, tmp: Path) -> dict[str, float]:
    """Peak memory of one training step (after a warm-up step), in MiB."""
    trainer = _trainer(device, batch, [f"model.grad_checkpointing={checkpointing}"], tmp)
    step = _step_fn(trainer)
    step()  # optimizer state and caches exist from here on
    dev = trainer.device
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
        step()
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev)
        return {"step_peak_mib": (peak - before) / 2**20, "total_peak_mib": peak / 2**20}
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS to the current RSS
    before = _rss_kib()
    step()
    return {"step_peak_mib": (_hwm_kib() - before) / 1024, "total_peak_mib": _hwm_kib() / 1024}


def memory_table(device: str, batch: int, tmp: Path) -> dict[str, dict[str, float]]:
    out = {}
    for ckpt in (False, True):
        if device == "cuda":  # one process is enough: the CUDA peak counter is exact
            out[str(ckpt)] = memory_child(device, batch, ckpt, tmp / f"mem{ckpt}")
            continue
        cmd = [sys.executable, __file__, "--memory-child", str(int(ckpt)), "--batch", str(batch)]
        cmd += ["--device", device, "--tmp", str(tmp / f"mem{ckpt}")]
        result = subprocess.run(cmd, check=True, capture_output=True, text=True)
        out[str(ckpt)] = json.loads(result.stdout.strip().splitlines()[-1])
    return out


# -- main -----------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="small batch, few repeats")
    parser.add_argument("--batch", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--memory-child", type=int, default=-1, help=argparse.SUPPRESS)
    parser.add_argument("--tmp", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    batch = args.batch or (32 if args.quick else 128)
    repeats = args.repeats or (3 if args.quick else 10)
    tmp = Path(args.tmp or f"/tmp/bench_encoder_options_{time.time_ns()}")
    if args.memory_child >= 0:
        print(json.dumps(memory_child(args.device, batch, bool(args.memory_child), tmp)))
        return
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device {name}, batch {batch}, repeats {repeats}, threads {torch.get_num_threads()}")

    mem = memory_table(args.device, batch, tmp)
    off, on = mem["False"]["step_peak_mib"], mem["True"]["step_peak_mib"]
    how = "cuda max_memory_allocated" if device.type == "cuda" else "peak RSS growth (VmHWM)"
    print(f"\n## memory of one training step ({how})")
    print("| grad_checkpointing | step peak MiB | total peak MiB |\n|---|---|---|")
    for key, label in (("False", "off"), ("True", "on")):
        print(f"| {label} | {mem[key]['step_peak_mib']:.1f} | {mem[key]['total_peak_mib']:.1f} |")
    print(f"ratio on/off: {on / max(off, 1e-9):.2f}")

    backends = ["auto", "math"] + (["efficient", "flash"] if device.type == "cuda" else [])
    steps: dict[str, Callable[[], None]] = {}
    for backend in backends:
        trainer = _trainer(args.device, batch, [f"model.attention={backend}"], tmp / backend)
        steps[f"attention={backend}"] = _step_fn(trainer)
    for option, overrides in OPTIONS.items():
        if option != "plain":
            steps[option] = _step_fn(_trainer(args.device, batch, overrides, tmp / option))
    timings = _round_robin(steps, repeats, device)
    base = timings["attention=auto"]
    print("\n## training step time (median), ratio to attention=auto without options")
    print("| setting | ms/step | ratio |\n|---|---|---|")
    for key, seconds in timings.items():
        print(f"| {key} | {1000 * seconds:.1f} | {seconds / base:.2f} |")

    trainer = _trainer(args.device, batch, [], tmp / "aug")
    images = next(trainer.batches())[1].to(device)
    mean, std = trainer.mean.flatten().tolist(), trainer.std.flatten().tolist()
    gen = torch.Generator().manual_seed(0)
    crop_flip = trainer.inputs.augment
    x = crop_flip(images, gen)
    fns: dict[str, Callable[[], object]] = {"crop_flip": lambda: crop_flip(images, gen)}
    for key, kw in AUGMENTS.items():
        aug = DeiT3Augment(mean=mean, std=std, **kw)
        fns[key] = lambda aug=aug: aug(x, gen)
    for n in (2, 4):
        crops = LocalCrops(n, 16, (0.05, 0.4), mean=mean, std=std)
        fns[f"local_crops{n}"] = lambda crops=crops: crops(images, gen)
    aug_times = _round_robin(fns, repeats * 3, device)
    print(f"\n## augmentation cost per batch of {batch} (added on top of crop_flip)")
    print("| augmentation | ms/batch | / crop_flip | / training step |\n|---|---|---|---|")
    for key, seconds in aug_times.items():
        crop = aug_times["crop_flip"]
        print(f"| {key} | {1000 * seconds:.2f} | {seconds / crop:.2f} | {seconds / base:.3f} |")


if __name__ == "__main__":
    main()
