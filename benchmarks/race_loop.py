"""End-to-end race: the whole ``hjepa train`` loop against the official I-JEPA model step.

Usage::

    python benchmarks/race_loop.py --ijepa /path/to/ijepa-checkout [--threads 2] [--repeats 5]

Where ``benchmarks/race_ijepa.py`` times our *model step* (forward, backward, optimizer, EMA)
against the official one on identical batches, this script times everything a user's run pays
per step: data loading, augmentation, mask sampling and index building, the model step,
SIGReg, logging every ``train.log_every`` steps, and checkpoint bookkeeping. It runs
:meth:`hjepa.train.trainer.Trainer.fit` on the quickstart preset with the race's ViT (28 px,
patch 4, width 192, depth 6, 3 heads; predictor 96 x 4; batch 128; Fashion-MNIST when it is
installed, else synthetic images of the same shape).

Timing is paired step by step: ``fit`` runs with its ``train_step`` wrapped so that right after
each of our steps the official model step (``race_ijepa.Official``, fp32, on a batch and masks
drawn by our sampler as in ``race_ijepa``) runs once, timed on its own. Our loop's time for a
step is the time from the start of one of our steps to the start of the next, less the official
step and the drawing of its inputs inside it: everything the loop does per step (data,
augmentation, masks, the step, logging) and nothing of a ``fit`` call's start and end (opening
the logger, the last checkpoint). A change of load on a shared machine then hits both sides
of a pair alike, where timing two ``fit`` calls of different lengths is a difference of two
noisy totals. The online kNN probe is off (``knn_every=0``): it runs every
``train.knn_every`` steps in the quickstart, so it is timed separately (``probe_s``) and
amortised.

Prints JSON: images/s of each side and the median of the per-step ratios (> 1: ours faster).
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
    # Options that change the rounding, not the math (docs/speed.md):
    "quickstart_bf16": ["train.precision=bf16"],  # bf16 autocast (AVX512-BF16 CPUs gain)
    "quickstart_math": ["model.attention=math"],  # SDPA's math kernel instead of flash
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

    def paired_fit(self, steps: int, official: Official, drawer: Ours) -> list[tuple[float, float]]:
        """``fit`` for ``steps`` steps with the official step after each of ours: per step of
        ours but the last, (official step time, our loop's time for that step)."""
        trainer, step = self.trainer, self.trainer.train_step
        starts: list[float] = []
        official_s: list[float] = []
        aside: list[float] = []  # time spent on the official side (its inputs and its step)

        def paired_step(micro_batches):
            starts.append(time.perf_counter())
            result = step(micro_batches)
            drawn = time.perf_counter()
            inputs = official_inputs(*drawer.draw())
            begin = time.perf_counter()
            official.model_step(inputs)
            end = time.perf_counter()
            official_s.append(end - begin)
            aside.append(end - drawn)
            return result

        trainer.cfg.train.stop_after = steps
        trainer.train_step = paired_step
        try:
            trainer.fit()
        finally:
            del trainer.train_step  # the method again
        loop_s = [b - a - o for a, b, o in zip(starts, starts[1:], aside)]
        return list(zip(official_s, loop_s))

    def probe(self) -> float:
        from hjepa.train.monitor import OnlineProbe

        t = self.trainer
        probe = OnlineProbe(t.cfg, t.channels, t.mean, t.std, t.device)
        probe(t.model.target_encoder)  # first call loads the probe's data
        start = time.perf_counter()
        probe(t.model.target_encoder)
        t.model.train()
        return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ijepa", type=Path, required=True, help="checkout of the official code")
    parser.add_argument("--repeats", type=int, default=3, help="fit calls per variant")
    parser.add_argument("--steps", type=int, default=6, help="steps per fit call")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variants", default="quickstart,quickstart_shared,levels1")
    args = parser.parse_args(argv)
    if not (args.ijepa / "src" / "models" / "vision_transformer.py").is_file():
        parser.error(f"{args.ijepa} is not a checkout of facebookresearch/ijepa")
    torch.set_num_threads(args.threads)
    from hjepa.config import load_config

    names = args.variants.split(",")
    official, drawer = Official(args.ijepa), Ours("ijepa", "repeat")
    with tempfile.TemporaryDirectory() as tmp:
        loops = {name: Loop(VARIANTS[name], Path(tmp) / name) for name in names}
        for loop in loops.values():  # warm-up: first batches, allocator, lazy initialisation
            loop.paired_fit(2, official, drawer)
        pairs: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
        for _ in range(args.repeats):  # variants take turns, so load changes hit all of them
            for name, loop in loops.items():
                pairs[name] += loop.paired_fit(args.steps, official, drawer)
        probe = next(iter(loops.values())).probe()  # the same encoder in every variant
    official_s = [o for per in pairs.values() for o, _ in per]
    knn_every = load_config("quickstart").train.knn_every  # the preset's probe cadence
    report = {
        "threads": args.threads,
        "batch": BATCH,
        "paired_steps": {n: len(per) for n, per in pairs.items()},
        "data": "synthetic" if _data_overrides() else "fashion_mnist",
        "images_per_s": {
            "official": BATCH / statistics.median(official_s),
            **{n: BATCH / statistics.median(t for _, t in per) for n, per in pairs.items()},
        },
        "loop_speedup_vs_official_step": {
            n: statistics.median(o / t for o, t in per) for n, per in pairs.items()
        },
        "probe_s": probe,
        "knn_every": knn_every,
        "loop_speedup_with_probe_amortised": {
            n: statistics.median(o / (t + probe / knn_every) for o, t in per)
            for n, per in pairs.items()
        },
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
