"""End-to-end race: the whole ``hjepa train`` loop against the official I-JEPA model step.

Usage::

    python benchmarks/race_loop.py --ijepa /path/to/ijepa-checkout [--threads 2] [--repeats 5]

Where ``benchmarks/race_ijepa.py`` times our *model step* (forward, backward, optimizer, EMA)
against the official one on identical batches, this script times everything a user's run pays
per step: data loading, augmentation, mask sampling and index building, the model step,
SIGReg, logging every ``train.log_every`` steps, and checkpoint bookkeeping. It runs
:meth:`hjepa.train.trainer.Trainer.fit` on the quickstart preset with the race's ViT (28 px,
patch 4, width 192, depth 6, 3 heads; predictor 96 x 4; batch 128; Fashion-MNIST when it is
installed, else synthetic images of the same shape) and times, per repeat, a short and a long
``fit`` (``train.stop_after``): their difference over the extra steps is the loop's time per
step without the per-call costs (opening the logger, the last checkpoint). The official model
step (``race_ijepa.Official``, fp32, on our batches and masks as in ``race_ijepa``) runs between
them, so every repeat compares steps measured within seconds of each other. The online kNN
probe is off (``knn_every=0``): it runs every 200 steps in the quickstart, so it is timed
separately (``probe_s``) and amortised.

Prints JSON: images/s of each side and the median of per-repeat ratios (> 1: ours faster).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from race_ijepa import (  # noqa: E402
    BATCH,
    DEPTH,
    HEADS,
    PRED_DEPTH,
    PRED_WIDTH,
    WIDTH,
    Official,
    Ours,
    official_inputs,
)

RACE_VIT = [
    f"model.embed_dim={WIDTH}",
    f"model.depth={DEPTH}",
    f"model.num_heads={HEADS}",
    f"model.predictor_embed_dim={PRED_WIDTH}",
    f"model.predictor_depth={PRED_DEPTH}",
    f"model.predictor_num_heads={HEADS}",
    f"train.batch_size={BATCH}",
    "train.knn_every=0",
    "run.progress=false",
    "run.tensorboard=false",
    "run.checkpoint_every=100",
]
VARIANTS = {
    "quickstart": [],
    "quickstart_shared": ["model.predictor_mode=shared"],
    "levels1": ["model.levels=1"],
}


def _data_overrides() -> list[str]:
    from hjepa.data.datasets import build_dataset

    try:
        build_dataset("fashion_mnist", None, "train", image_size=28)
        return []
    except (FileNotFoundError, ValueError):
        return ["data.name=synthetic", "data.channels=1", "data.synthetic_size=4096"]


class Loop:
    """One ``Trainer`` whose ``fit`` is called again and again, ``stop_after`` steps a call."""

    def __init__(self, extra: list[str], run_dir: Path) -> None:
        from hjepa.config import load_config
        from hjepa.train.trainer import Trainer

        overrides = [*RACE_VIT, *_data_overrides(), *extra, f"run.dir={run_dir}"]
        self.trainer = Trainer(load_config("quickstart", overrides))

    def fit(self, steps: int) -> float:
        self.trainer.cfg.train.stop_after = steps
        start = time.perf_counter()
        self.trainer.fit()
        return time.perf_counter() - start

    def probe(self) -> float:
        from hjepa.train.monitor import OnlineProbe

        t = self.trainer
        probe = OnlineProbe(t.cfg, t.channels, t.mean, t.std, t.device)
        probe(t.model.target_encoder)  # first call loads the probe's data
        start = time.perf_counter()
        probe(t.model.target_encoder)
        t.model.train()
        return time.perf_counter() - start


def official_step_time(official: Official, drawer: Ours, steps: int) -> float:
    """The official model step alone (as ``race_ijepa``'s ``model``), on our batches and masks:
    the official collator's context is smaller than ours, so its own masks would do less work."""
    total = 0.0
    for _ in range(steps):
        inputs = official_inputs(*drawer.draw())
        start = time.perf_counter()
        official.model_step(inputs)
        total += time.perf_counter() - start
    return total / steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ijepa", type=Path, required=True, help="checkout of the official code")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--short", type=int, default=3, help="steps of the short fit")
    parser.add_argument("--long", type=int, default=13, help="steps of the long fit")
    parser.add_argument("--official-steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variants", default="quickstart,quickstart_shared,levels1")
    args = parser.parse_args(argv)
    if not (args.ijepa / "src" / "models" / "vision_transformer.py").is_file():
        parser.error(f"{args.ijepa} is not a checkout of facebookresearch/ijepa")
    torch.set_num_threads(args.threads)
    names = args.variants.split(",")
    official, drawer = Official(args.ijepa), Ours("ijepa", "repeat")
    with tempfile.TemporaryDirectory() as tmp:
        loops = {name: Loop(VARIANTS[name], Path(tmp) / name) for name in names}
        for loop in loops.values():
            loop.fit(2)  # warm-up: first batches, allocator, lazy initialisation
        official_step_time(official, drawer, 2)
        per_step: dict[str, list[float]] = {name: [] for name in ["official", *names]}
        for _ in range(args.repeats):
            per_step["official"].append(official_step_time(official, drawer, args.official_steps))
            for name, loop in loops.items():
                short, long = loop.fit(args.short), loop.fit(args.long)
                per_step[name].append((long - short) / (args.long - args.short))
        probe = next(iter(loops.values())).probe()  # the same encoder in every variant
        probe_s = {name: probe for name in loops}
        knn_every = 200  # the quickstart preset's train.knn_every
    base = per_step["official"]
    report = {
        "threads": args.threads,
        "batch": BATCH,
        "repeats": args.repeats,
        "data": "synthetic" if _data_overrides() else "fashion_mnist",
        "images_per_s": {n: BATCH / statistics.median(ts) for n, ts in per_step.items()},
        "loop_speedup_vs_official_step": {
            n: statistics.median(o / t for o, t in zip(base, per_step[n])) for n in names
        },
        "probe_s": probe_s,
        "loop_speedup_with_probe_amortised": {
            n: statistics.median(
                o / (t + probe_s[n] / knn_every) for o, t in zip(base, per_step[n])
            )
            for n in names
        },
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
