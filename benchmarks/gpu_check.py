"""GPU check: training throughput, peak memory and the attention kernels actually used.

Runs the ``imagenet100_vits16`` model (ViT-S/16 at 224 px, predictor 384 x 12, 3 levels) on
synthetic 224 px RGB images through the real training step (augmentation, masks, forward,
backward, AdamW, EMA) for each predictor mode, and prints one JSON object::

    python benchmarks/gpu_check.py                       # ~1 minute on one H100
    python benchmarks/gpu_check.py --steps 50 --batch 64 --modes repeat --compile

Per mode: images/s over ``--steps`` timed steps (after ``--warmup``), milliseconds per step,
peak GPU memory, and one step under ``torch.profiler`` (``profiled_step``): the attention
kernels (``flash_attention_used`` is true when a kernel whose name contains ``flash`` ran), the
fraction of the step's wall time in which some kernel ran (``gpu_busy_fraction``: far below 1,
the step is bound by the host, not the GPU), kernel launches, host syncs, and the kernels and
CPU ops that took longest.
The predictor's ``shared`` mode computes its block-diagonal attention as two unmasked SDPA
calls (``ContextBlocks``), so flash kernels serve it too. Never asserts a speed.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time

import torch

ATTENTION_WORDS = ("flash", "fmha", "attention", "attn", "efficient")


def build_trainer(mode: str, batch: int, precision: str, compile_: bool, extra: list[str]):
    from hjepa.config import load_config
    from hjepa.train.trainer import Trainer

    cfg = load_config(
        "imagenet100_vits16",
        [
            "data.name=synthetic",
            "data.class_subset=",
            "data.image_size=224",
            "data.channels=3",
            f"data.synthetic_size={max(2 * batch, 256)}",
            f"train.batch_size={batch}",
            "train.accum_steps=1",
            "train.max_steps=100000",
            f"train.precision={precision}",
            f"train.compile={str(compile_).lower()}",
            f"model.predictor_mode={mode}",
            "run.dir=/tmp/hjepa_gpu_check",
            "run.tensorboard=false",
            "run.progress=false",
            *extra,
        ],
    )
    trainer = Trainer(cfg)
    trainer.model.train()
    return trainer


def busy_time(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of ``[start, end)`` intervals: time in which at least one kernel ran
    (kernels that overlap on several streams count once)."""
    total, reach = 0.0, -math.inf
    for start, end in sorted(intervals):
        if end <= reach:
            continue
        total += end - max(start, reach)
        reach = end
    return total


# Calls after which the host waits for the GPU (a plain cudaMemcpy blocks; the Async one not).
HOST_SYNC_CALLS = {
    "cudaDeviceSynchronize",
    "cudaStreamSynchronize",
    "cudaEventSynchronize",
    "cudaMemcpy",
    "aten::_local_scalar_dense",  # .item(), bool(tensor) and the like
}


def profile_step(step, top: int = 12) -> dict:
    """One profiled step: the attention kernels (name -> calls), how busy the GPU was over the
    step's wall time, the kernels and CPU ops that took longest, and the host syncs.

    A GPU busy fraction well below 1 means the step waits on the host (Python, launches, syncs,
    data) rather than on kernels; that is what ``images/s`` alone cannot tell.
    """
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        wall_us = (time.perf_counter() - start) * 1e6
    events = prof.events()
    cuda = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    attention: dict[str, int] = {}
    kernel_us: dict[str, list[float]] = {}
    for e in cuda:
        name = e.name[:120]
        if any(word in name.lower() for word in ATTENTION_WORDS):
            attention[name] = attention.get(name, 0) + 1
        kernel_us.setdefault(name, []).append(e.time_range.end - e.time_range.start)
    busy_us = busy_time([(e.time_range.start, e.time_range.end) for e in cuda])
    cpu_ops = sorted(
        (e for e in prof.key_averages() if e.self_cpu_time_total > 0),
        key=lambda e: -e.self_cpu_time_total,
    )
    # The synchronize that ends the profiled step is one of them.
    syncs = sum(1 for e in events if e.name in HOST_SYNC_CALLS)
    longest = sorted(kernel_us.items(), key=lambda kv: -sum(kv[1]))[:top]
    return {
        "attention_kernels": attention,
        "step_wall_ms": wall_us / 1e3,
        "gpu_busy_ms": busy_us / 1e3,
        "gpu_busy_fraction": busy_us / wall_us,
        "kernel_launches": len(cuda),
        "host_syncs": syncs,
        "top_kernels_ms": {name: [len(ts), sum(ts) / 1e3] for name, ts in longest},
        "top_cpu_ops_ms": {e.key: e.self_cpu_time_total / 1e3 for e in cpu_ops[:top]},
    }


def measure(mode: str, args: argparse.Namespace) -> dict:
    trainer = build_trainer(mode, args.batch, args.precision, args.compile, args.overrides)
    batches = trainer.step_batches()

    def step() -> None:
        trainer.train_step(next(batches))

    start = time.perf_counter()
    for _ in range(args.warmup):  # includes compilation when --compile
        step()
    torch.cuda.synchronize()
    warmup_s = time.perf_counter() - start
    profiled = profile_step(step)
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    result = {
        "images_per_s": args.steps * args.batch / elapsed,
        "ms_per_step": 1000 * elapsed / args.steps,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
        "warmup_s": warmup_s,
        "precision": trainer.precision,
        "flash_attention_used": any("flash" in n.lower() for n in profiled["attention_kernels"]),
        "profiled_step": profiled,
    }
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="timed steps per mode")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--batch", type=int, default=128, help="images per step (one GPU)")
    parser.add_argument("--modes", default="repeat,shared", help="predictor modes to run")
    parser.add_argument("--precision", default="auto", help="auto (bf16) | bf16 | fp16 | fp32")
    parser.add_argument("--compile", action="store_true", help="train.compile=true")
    parser.add_argument("overrides", nargs="*", help="extra key=value config overrides")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(json.dumps({"error": "no CUDA GPU visible"}))
        return 1
    report = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "batch": args.batch,
        "steps": args.steps,
        "compile": args.compile,
        "sdpa_enabled": {
            "flash": torch.backends.cuda.flash_sdp_enabled(),
            "efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
            "math": torch.backends.cuda.math_sdp_enabled(),
        },
        "modes": {},
    }
    for mode in args.modes.split(","):
        report["modes"][mode] = measure(mode, args)
        gc.collect()  # the previous mode's model and optimizer leave the GPU
        torch.cuda.empty_cache()
    rates = {m: r["images_per_s"] for m, r in report["modes"].items()}
    if {"repeat", "shared"} <= rates.keys():
        report["shared_over_repeat"] = rates["shared"] / rates["repeat"]
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
