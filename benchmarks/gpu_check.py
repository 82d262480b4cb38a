"""GPU check: training throughput, peak memory and the attention kernels actually used.

Runs the ``imagenet100_vits16`` model (ViT-S/16 at 224 px, predictor 384 x 12, 3 levels) on
synthetic 224 px RGB images through the real training step (augmentation, masks, forward,
backward, AdamW, EMA) for each predictor mode, and prints one JSON object::

    python benchmarks/gpu_check.py                       # ~1 minute on one H100
    python benchmarks/gpu_check.py --steps 50 --batch 64 --modes repeat --compile

Per mode: images/s over ``--steps`` timed steps (after ``--warmup``), milliseconds per step,
peak GPU memory, and the attention kernels of one profiled step (``torch.profiler`` kernel
names): ``flash_attention_used`` is true when a kernel whose name contains ``flash`` ran.
The predictor's ``shared`` mode computes its block-diagonal attention as two unmasked SDPA
calls (``ContextBlocks``), so flash kernels serve it too. Never asserts a speed.
"""

from __future__ import annotations

import argparse
import gc
import json
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


def attention_kernels(step) -> dict[str, int]:
    """CUDA kernels of one step whose names look like attention, with their call counts."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    names: dict[str, int] = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            name = event.name
            if any(word in name.lower() for word in ATTENTION_WORDS):
                short = name[:120]
                names[short] = names.get(short, 0) + 1
    return names


def measure(mode: str, args: argparse.Namespace) -> dict:
    trainer = build_trainer(mode, args.batch, args.precision, args.compile, args.overrides)
    batches = trainer._batches()

    def step() -> None:
        micro, images = next(batches)
        trainer._micro_step(images, micro)
        trainer._optimizer_step()

    start = time.perf_counter()
    for _ in range(args.warmup):  # includes compilation when --compile
        step()
    torch.cuda.synchronize()
    warmup_s = time.perf_counter() - start
    kernels = attention_kernels(step)
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
        "flash_attention_used": any("flash" in name.lower() for name in kernels),
        "attention_kernels": kernels,
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
