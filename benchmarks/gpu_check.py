"""GPU check: what one training step costs on an accelerator, in one short call (< 5 minutes).

For each configuration (a preset, eager or compiled) it trains on synthetic RGB images through
the real training step (``Trainer.train_step``: augmentation, masks, forward, loss, backward,
AdamW, EMA) and records:

* ``series_ms``: the wall time of each of the first ``--series`` steps, each synchronised
  (cold: the first steps build plans and, compiled, graphs; warm: the rest);
* ``images_per_s``: ``--steps`` warm steps timed as one block (one synchronisation at the end,
  so the host may run ahead of the device as in training);
* ``flops_per_step`` (``FlopCounterMode`` over one eager step: forward and backward matmuls,
  convolutions and attention) and ``mfu``: achieved FLOP/s over the card's dense bf16 peak
  (:data:`BF16_PEAK_TFLOPS`, or ``--peak-tflops``); a compiled configuration computes the same
  FLOPs as its eager one, which is counted;
* ``peak_memory_gib`` (CUDA);
* one profiled step: ``kernel_launches`` (CUDA kernels; on the CPU the ``aten`` ops run),
  ``host_syncs`` (operations that read a device value on the host, and CUDA synchronisations),
  ``attention_ops`` (the scaled-dot-product kernel the dispatcher chose, e.g.
  ``aten::_scaled_dot_product_flash_attention``) and ``gpu_busy_fraction``.

Writes one JSON to ``--out`` (rewritten after every configuration, so a run cut short keeps
what it measured) and prints it::

    python benchmarks/gpu_check.py --out gpu_check.json                # both presets, both modes
    python benchmarks/gpu_check.py --configs imagenet100_vits16:eager --steps 50 --out x.json
    python benchmarks/gpu_check.py --smoke --out /tmp/smoke.json        # CPU, tiny, seconds

``--smoke`` runs the two presets shrunk to a tiny model on the CPU, so the output schema and the
FLOP count are tested without a GPU (``tests/test_gpu_check.py``). Never asserts a speed.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

PRESETS = ("imagenet100_vits16", "imagenet1k_vitb16")
MODES = ("eager", "compiled")
#: Dense bf16 tensor-core peaks (TFLOP/s, no sparsity), by a substring of the device name;
#: the first match counts, so the more specific names come first.
BF16_PEAK_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),
    ("H200", 989.4),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
)
#: Small enough for a CPU test: 32 px, patch 8 (16 tokens), width 32, two blocks.
SMOKE_OVERRIDES = (
    "data.image_size=32",
    "model.patch_size=8",
    "model.embed_dim=32",
    "model.depth=2",
    "model.num_heads=2",
    "model.predictor_embed_dim=16",
    "model.predictor_depth=1",
    "model.predictor_num_heads=2",
    "model.levels=2",
    "masking.min_context=2",
    "train.device=cpu",
    "model.attention=math",  # FlopCounterMode counts no fused CPU attention kernel
)
ATTENTION_WORDS = ("scaled_dot_product", "flash", "fmha", "attention", "efficient", "cudnn")
#: Profiler events after which the host has waited for a device value or the device.
HOST_SYNC_EVENTS = frozenset(
    {
        "aten::_local_scalar_dense",  # .item(), bool(tensor), float(tensor)
        "aten::nonzero",  # and boolean-mask indexing: the output size is data-dependent
        "aten::is_nonzero",
        "cudaDeviceSynchronize",
        "cudaStreamSynchronize",
        "cudaEventSynchronize",
        "cudaMemcpy",  # a plain (not Async) copy blocks
    }
)


def peak_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of a known card, else None."""
    for word, tflops in BF16_PEAK_TFLOPS:
        if word in device_name:
            return tflops
    return None


def build_trainer(preset: str, mode: str, args: argparse.Namespace):
    from hjepa.config import load_config
    from hjepa.train.trainer import Trainer

    overrides = [
        "data.name=synthetic",
        "data.class_subset=",
        "data.channels=3",
        f"data.synthetic_size={max(2 * args.batch, 64)}",
        f"train.batch_size={args.batch}",
        "train.accum_steps=1",
        "train.max_steps=100000",
        "train.num_workers=0",
        f"train.precision={args.precision}",
        f"train.compile={str(mode == 'compiled').lower()}",
        f"run.dir={args.run_dir}",
        "run.tensorboard=false",
        "run.progress=false",
        *(SMOKE_OVERRIDES if args.smoke else ("data.image_size=224",)),
        *args.overrides,
    ]
    trainer = Trainer(load_config(preset, overrides))
    trainer.model.train()
    return trainer


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def count_flops(step: Callable[[], object]) -> int:
    """FLOPs of one call of ``step`` (forward and backward), by ``FlopCounterMode``."""
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return int(counter.get_total_flops())


def profile_step(step: Callable[[], object], device: torch.device) -> dict:
    """Launches, host syncs, the attention ops and kernels, and the device's busy share of one
    step, from ``torch.profiler``."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    synchronize(device)
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        step()
        synchronize(device)
        wall_us = (time.perf_counter() - start) * 1e6
    events = prof.events()
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    ops = [e for e in events if e.name.startswith("aten::")]
    attention: dict[str, int] = {}
    for e in ops + kernels:
        if any(word in e.name.lower() for word in ATTENTION_WORDS):
            name = e.name[:120]
            attention[name] = attention.get(name, 0) + 1
    busy_us = busy_time([(e.time_range.start, e.time_range.end) for e in kernels])
    return {
        "kernel_launches": len(kernels) if cuda else len(ops),
        "launches_are": "cuda kernels" if cuda else "aten ops (CPU)",
        # The synchronize that closes the profiled step counts as one on CUDA.
        "host_syncs": sum(e.name in HOST_SYNC_EVENTS for e in events) - cuda,
        "attention_ops": attention,
        "step_wall_ms": wall_us / 1e3,
        "gpu_busy_fraction": busy_us / wall_us if cuda else None,
    }


def busy_time(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of ``[start, end)`` intervals (overlapping kernels count once)."""
    total, reach = 0.0, -math.inf
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def timed_series(step: Callable[[], object], device: torch.device, count: int) -> list[float]:
    """Milliseconds of each of ``count`` steps, each synchronised."""
    times = []
    for _ in range(count):
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return times


def measure(preset: str, mode: str, args: argparse.Namespace, flops: dict) -> dict:
    """One configuration (module docstring); ``flops[preset]`` is counted on its eager run."""
    start = time.perf_counter()
    trainer = build_trainer(preset, mode, args)
    build_s = time.perf_counter() - start
    device = trainer.device
    batches = trainer.step_batches()
    step = lambda: trainer.train_step(next(batches))  # noqa: E731
    series = timed_series(step, device, args.series)
    if mode == "eager" and preset not in flops:
        flops[preset] = count_flops(step)
    profiled = profile_step(step, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    synchronize(device)
    elapsed = time.perf_counter() - start
    rate = args.steps * args.batch / elapsed
    step_flops = flops.get(preset)
    tflops = None if step_flops is None else step_flops * rate / args.batch / 1e12
    peak = args.peak_tflops
    warm = series[1:] or series
    return {
        "build_s": build_s,
        "precision": trainer.precision,
        "series_ms": series,
        "cold_ms": series[0],
        "warm_median_ms": statistics.median(warm),
        "images_per_s": rate,
        "ms_per_step": 1e3 * elapsed / args.steps,
        "flops_per_step": step_flops,
        "tflops_per_s": tflops,
        "mfu": None if tflops is None or not peak else tflops / peak,
        "peak_memory_gib": (
            torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        ),
        "profiled_step": profiled,
    }


def parse_configs(text: str) -> list[tuple[str, str]]:
    """``preset:mode,...`` -> pairs; eager before compiled for each preset (FLOPs are counted
    eagerly)."""
    pairs = []
    for item in text.split(","):
        preset, _, mode = item.strip().partition(":")
        if preset not in PRESETS or mode not in MODES:
            raise SystemExit(
                f"--configs entry {item!r}: use PRESET:MODE with PRESET in {', '.join(PRESETS)} "
                f"and MODE in {', '.join(MODES)}"
            )
        pairs.append((preset, mode))
    return sorted(pairs, key=lambda p: (PRESETS.index(p[0]), MODES.index(p[1])))


def header(args: argparse.Namespace) -> dict:
    cuda = torch.cuda.is_available() and not args.smoke
    name = torch.cuda.get_device_name() if cuda else "cpu"
    if args.peak_tflops is None and cuda:
        args.peak_tflops = peak_tflops(name)
    return {
        "device": name,
        "torch": torch.__version__,
        "smoke": args.smoke,
        "batch": args.batch,
        "steps": args.steps,
        "series": args.series,
        "peak_bf16_tflops": args.peak_tflops,
        "overrides": list(args.overrides),
        "sdpa_enabled": (
            {
                "flash": torch.backends.cuda.flash_sdp_enabled(),
                "efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
                "cudnn": torch.backends.cuda.cudnn_sdp_enabled(),
                "math": torch.backends.cuda.math_sdp_enabled(),
            }
            if cuda
            else None
        ),
        "configs": {},
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", help="JSON file to write (the JSON is printed either way)")
    parser.add_argument(
        "--configs",
        default=",".join(f"{p}:{m}" for p in PRESETS for m in MODES),
        help="PRESET:MODE list (modes: eager, compiled)",
    )
    parser.add_argument("--steps", type=int, default=30, help="warm steps timed as one block")
    parser.add_argument(
        "--series", "--warmup", type=int, default=8, help="steps timed one by one first (warm-up)"
    )
    parser.add_argument("--batch", type=int, default=128, help="images per step (one device)")
    parser.add_argument("--precision", default="auto", help="auto (bf16 on CUDA) | bf16 | fp32")
    parser.add_argument("--peak-tflops", type=float, help="the card's dense bf16 peak")
    parser.add_argument(
        "--run-dir",
        default="/tmp/hjepa_gpu_check",
        help="run.dir of the trainers it builds (they write no checkpoint)",
    )
    parser.add_argument(
        "--budget-s", type=float, default=240, help="start no configuration after this long"
    )
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU (tests)")
    parser.add_argument("overrides", nargs="*", help="extra key=value config overrides")
    args = parser.parse_args(argv)
    if args.smoke and "--batch" not in (argv or sys.argv):
        args.batch = 8
    if min(args.steps, args.series, args.batch) < 1:
        parser.error("--steps, --series and --batch must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configs = parse_configs(args.configs)
    if not args.smoke and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU visible; --smoke runs a tiny model on the CPU instead")
        return 1
    report = header(args)
    flops: dict[str, int] = {}
    out = Path(args.out) if args.out else None
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for preset, mode in configs:
        name = f"{preset}:{mode}"
        if time.perf_counter() - start > args.budget_s:  # keep the call short; say what is left
            report["configs"][name] = {"skipped": f"past --budget-s {args.budget_s:g}"}
        else:
            report["configs"][name] = measure(preset, mode, args, flops)
        if out is not None:
            out.write_text(json.dumps(report, indent=1) + "\n")
        gc.collect()  # the previous model and optimizer leave the device
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
