"""Throughput race: our training step against the official I-JEPA step, side by side.

Usage::

    python benchmarks/race_ijepa.py --ijepa /path/to/ijepa-checkout [--threads 2] [--repeats 15]

``--ijepa`` is a local checkout of https://github.com/facebookresearch/ijepa; its code is
imported from there (:mod:`hjepa.experiments.race`), never copied here. Both steps train the
same ViT
(28 px, patch 4, width 192, depth 6, 3 heads; predictor width 96, depth 4) on batches of 128
synthetic one-channel images with the same mask settings (4 target blocks of scale 0.15-0.2
and aspect 0.75-1.5, one context block of scale 0.85-1.0), AdamW and the EMA update.

Each repeat draws one batch with our sampler and gives the *same* images and masks to every
side (the official ``MaskCollator`` draws other token counts: it keeps its context block below
the full grid side and off the last row and column, so on a 7 x 7 grid its context averages 7
tokens against our 15). Per repeat and side, interleaved so that slow phases of a shared
machine hit all sides alike:

* ``model``: forward, backward, optimizer step and EMA on the repeat's batch and masks;
* ``masks``: drawing one batch's masks with the side's own sampler (ours also augments);
* ``full``: the two together.

A step's time depends on the batch's context size (the minimum over its samples), so speedups
are medians of per-repeat ratios. FLOPs per image (``FlopCounterMode``: matmuls, convolutions
and attention, forward + backward, on the same batches) tell "less work" from "faster
kernels". The roofline: each repeat also times the largest matmul of the race's ViT (the
MLP's ``B*49 x 192 -> 768`` at batch 128) as ``sgemm``, the speed this machine's BLAS reaches on
that shape at that moment; ``fraction_of_sgemm`` is each side's GFLOP/s over it, per repeat (a
step at 1.0 would run every FLOP at the speed of its biggest matmul). Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from hjepa.experiments.race import (
    BATCH,
    IMAGE,
    PATCH,
    WIDTH,
    Official,
    Ours,
    official_inputs,
)

FLAGS = {"compile": "train.compile=true"}  # optional third part of an --ours spec


# -- measurement -------------------------------------------------------------------------------
def flops_per_image(ours: Ours, official: Official, draws: int = 5) -> tuple[float, float]:
    """Mean FLOPs per image of one step on the same batches and masks.

    Our attention runs on SDPA's math backend here (``model.attention=math`` for the count: the
    trainer sets the SDPA kernels itself): the counter does not see inside the fused CPU kernel,
    and the official attention (explicit matmuls) is counted in full.
    """
    model_cfg = ours.trainer.cfg.model
    chosen, model_cfg.attention = model_cfg.attention, "math"
    totals = [0, 0]
    try:
        for _ in range(draws):
            inputs = ours.draw()
            sides = ((ours, inputs), (official, official_inputs(*inputs)))
            for i, (side, args) in enumerate(sides):
                with (
                    FlopCounterMode(display=False) as counter,
                    torch.compiler.set_stance("force_eager"),  # compiled graphs are not counted
                ):
                    side.model_step(args)
                totals[i] += counter.get_total_flops()
    finally:
        model_cfg.attention = chosen
    return totals[0] / (draws * BATCH), totals[1] / (draws * BATCH)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, *args) -> float:
    _sync()
    start = time.perf_counter()
    fn(*args)
    _sync()  # GPU work is asynchronous: count it in the step that queued it
    return time.perf_counter() - start


SGEMM_SHAPE = (BATCH * (IMAGE // PATCH) ** 2, WIDTH, 4 * WIDTH)  # the encoder MLP's first matmul


class Sgemm:
    """The roofline probe: the race ViT's largest matmul, timed like a side. A call is short
    (~15 ms) and a step long (seconds): the mean of 16 back-to-back calls sees about the same
    share of a loaded machine as a step does, where the best single call would not."""

    flops = 2 * SGEMM_SHAPE[0] * SGEMM_SHAPE[1] * SGEMM_SHAPE[2]

    def __init__(self, device: str = "cpu"):
        m, k, n = SGEMM_SHAPE
        gen = torch.Generator().manual_seed(0)
        self.a = torch.randn(m, k, generator=gen).to(device)
        self.b = torch.randn(k, n, generator=gen).to(device)

    def time(self) -> float:
        return timed(lambda: [torch.mm(self.a, self.b) for _ in range(16)]) / 16


def race(
    official: Official, ours: dict[str, Ours], repeats: int, warmup: int, sgemm: Sgemm
) -> dict:
    """Interleaved timings (seconds) per repeat and side: ``masks`` (drawing one batch's masks;
    ours also augments), ``model`` (the step on the repeat's batch and masks, identical for all
    sides) and ``full`` (their sum). The step time depends on the batch's context size (the
    minimum over its samples), so sides are compared repeat by repeat (paired ratios). Each
    repeat also times the roofline probe (``times["sgemm"]``)."""
    names = ["official", *ours]
    times: dict[str, dict[str, list[float]]] = {n: {"masks": [], "model": []} for n in names}
    probe: list[float] = []
    # The deepest hierarchy draws: its level-0 masks are all a shallower model reads.
    first = max(ours.values(), key=lambda side: side.trainer.cfg.model.levels)
    for i in range(warmup + repeats):
        inputs = first.draw()
        shared = {name: inputs for name in ours}
        shared["official"] = official_inputs(*inputs)
        for name in names:
            side = official if name == "official" else ours[name]
            masks = timed(side.draw)
            model = timed(side.model_step, shared[name])
            if i >= warmup:
                times[name]["masks"].append(masks)
                times[name]["model"].append(model)
        if i >= warmup:
            probe.append(sgemm.time())
    for per in times.values():
        per["full"] = [a + b for a, b in zip(per["masks"], per["model"])]
    return {**times, "sgemm": probe}


def roofline(times: dict, flops: dict[str, float]) -> dict:
    """Each side's model-step GFLOP/s and its fraction of the sgemm probe's, paired per repeat."""
    probe = times["sgemm"]
    peak = [Sgemm.flops / t for t in probe]
    return {
        "sgemm_shape": list(SGEMM_SHAPE),
        "sgemm_gflops_per_s": statistics.median(peak) / 1e9,
        "model_gflops_per_s": {
            name: statistics.median(flops[name] * BATCH / t for t in per["model"]) / 1e9
            for name, per in times.items()
            if name != "sgemm"
        },
        "fraction_of_sgemm": {
            name: statistics.median(flops[name] * BATCH / t / p for t, p in zip(per["model"], peak))
            for name, per in times.items()
            if name != "sgemm"
        },
    }


def summarise(times: dict) -> dict:
    base = times["official"]
    times = {name: per for name, per in times.items() if name != "sgemm"}
    return {
        "images_per_s": {
            name: {kind: BATCH / statistics.median(ts) for kind, ts in per.items()}
            for name, per in times.items()
        },
        "speedup_vs_official": {
            name: {
                kind: statistics.median(o / t for o, t in zip(base[kind], per[kind]))
                for kind in ("model", "full")
            }
            for name, per in times.items()
            if name != "official"
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ijepa", type=Path, required=True, help="checkout of the official code")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--device", default="cpu", help="cpu | cuda (both sides, fp32)")
    parser.add_argument(
        "--ours",
        default="ijepa:repeat,ijepa:shared,default:repeat",
        help="our variants, comma separated: OBJECTIVE:PREDICTOR_MODE[:compile] with OBJECTIVE "
        "'ijepa' (1 level, smooth L1, no clipping), 'default' (3 levels, mse, clip 1) or "
        "'quickstart' (the quickstart preset's recipe: conv stem, 3 levels, SIGReg); "
        "':compile' adds train.compile=true (torch.compile; give it --warmup 3 or more)",
    )
    args = parser.parse_args(argv)
    if not (args.ijepa / "src" / "models" / "vision_transformer.py").is_file():
        parser.error(f"{args.ijepa} is not a checkout of facebookresearch/ijepa")
    torch.set_num_threads(args.threads)
    official = Official(args.ijepa, device=args.device)
    ours = {}
    for spec in args.ours.split(","):
        variant, mode, *flags = spec.split(":")
        extra = tuple(FLAGS[flag] for flag in flags)
        ours["_".join(["ours", variant, mode, *flags])] = Ours(variant, mode, extra, args.device)
    flops = {}
    for name, side in ours.items():
        flops[name], flops["official"] = flops_per_image(side, official)
    times = race(official, ours, args.repeats, args.warmup, Sgemm(args.device))
    report = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "threads": args.threads,
        "batch": BATCH,
        "repeats": args.repeats,
        **summarise(times),
        "gflops_per_image": {name: f / 1e9 for name, f in flops.items()},
        "flops_ratio_official_over_ours": {
            name: flops["official"] / f for name, f in flops.items() if name != "official"
        },
        "roofline": roofline(times, flops),
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
