"""End-to-end race: the whole ``hjepa train`` loop against the official I-JEPA model step.

Usage::

    python benchmarks/race_loop.py --ijepa /path/to/ijepa-checkout [--threads 2] [--budget-s 120]

Where ``benchmarks/race_ijepa.py`` times our *model step* (forward, backward, optimizer, EMA)
against the official one on identical batches, this script times everything a user's run pays
per step: data loading, augmentation, mask sampling and index building, the model step,
SIGReg, logging every ``train.log_every`` steps, and checkpoint bookkeeping. It runs
:meth:`hjepa.train.trainer.Trainer.fit` on the quickstart preset with the race's ViT (28 px,
patch 4, width 192, depth 6, 3 heads; predictor 96 x 4; batch 128; Fashion-MNIST when it is
installed, else synthetic images of the same shape).

One sample is three timings taken back to back, so that a change of load on a shared machine
hits all three alike:

* ``loop``: one step of our ``fit`` loop, from the start of one of its steps to the start of
  the next, less what this script runs in between (below): everything the loop does per step
  and nothing of a ``fit`` call's start and end (opening the logger, the last checkpoint).
  Split into ``train_step`` (``Trainer.train_step``: inputs, model, optimizer, EMA), its
  ``inputs`` (augmentation, masks, index building) and ``between`` (the rest of the loop:
  the next batch, logging, checkpoint cadence, signal checks).
* ``official``: the official model step (``hjepa.experiments.race.Official``) on a batch and
  masks drawn by ``hjepa.experiments.race.Ours`` (synthetic images, our mask sampler);
* ``model``: our model step (``Ours`` with the variant's predictor mode) on that *same* batch
  and masks.

``fit`` runs with its ``train_step`` wrapped: after each of our loop's steps the other two run
(their order alternates from sample to sample). Variants take turns in calls of ``--steps``
steps until ``--budget-s`` is spent. Reported per variant: the median of the per-sample
ratios (> 1: ours faster) with their 25th-75th percentiles, on wall time and on process CPU
time (the CPU seconds a side used: less sensitive to other jobs than wall time), the images/s
of each side, and the load average at the start and the end. The online kNN probe is off
(``knn_every=0``); ``--probe`` times one call of it separately for amortising (the quickstart
runs it every ``train.knn_every`` steps).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from hjepa.experiments.race import (
    BATCH,
    RACE_VIT,
    SYNTHETIC,
    Official,
    Ours,
    data_overrides,
    median_quartiles,
    official_inputs,
)

#: name -> (config overrides of the loop, predictor mode of the model step it is paired with)
VARIANTS = {
    "quickstart": ([], "shared"),  # the preset as shipped (predictor_mode=shared)
    "quickstart_repeat": (["model.predictor_mode=repeat"], "repeat"),
    "quickstart_synthetic": (SYNTHETIC, "shared"),  # the race's data: does the data matter?
    "levels1": (["model.levels=1"], "shared"),
    # Options that change the rounding, not the math (docs/speed.md):
    "quickstart_bf16": (["train.precision=bf16"], "shared"),
    "quickstart_math": (["model.attention=math"], "shared"),
}
SIDES = ("loop", "train_step", "inputs", "between", "official", "model")


class _Clock:
    """Wall and process-CPU seconds of a span."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def since(self, start: _Clock) -> tuple[float, float]:
        return self.wall - start.wall, self.cpu - start.cpu


def _minus(a: tuple[float, float], *others: tuple[float, float]) -> tuple[float, float]:
    return a[0] - sum(o[0] for o in others), a[1] - sum(o[1] for o in others)


class Loop:
    """One ``Trainer`` whose ``fit`` is called again and again, ``stop_after`` steps a call,
    and the race's model step it is paired with (``model_side``: a
    ``hjepa.experiments.race.Ours``, whose ``draw`` gives the batch both model steps run on)."""

    def __init__(self, trainer, model_side) -> None:
        self.trainer, self.model_side = trainer, model_side
        self.flip = False

    @classmethod
    def build(cls, extra: list[str], mode: str, run_dir: Path) -> Loop:
        """The quickstart preset on the race's ViT plus ``extra``; model step in ``mode``."""
        from hjepa.config import load_config
        from hjepa.train.trainer import Trainer

        overrides = [*RACE_VIT, *data_overrides(), *extra, f"run.dir={run_dir}"]
        return cls(Trainer(load_config("quickstart", overrides)), Ours("quickstart", mode))

    def paired_fit(self, steps: int, official: Official) -> list[dict[str, tuple[float, float]]]:
        """``fit`` for ``steps`` steps with the official and our model step after each of ours:
        one sample (side -> (wall s, CPU s)) per step of ours but the last."""
        trainer = self.trainer
        starts: list[_Clock] = []
        samples: list[dict[str, tuple[float, float]]] = []
        timed = _TimedInputs(trainer.inputs)
        inputs_s = timed.spans

        def paired_step(step, micro_batches):
            starts.append(_Clock())
            result = step(micro_batches)
            aside = _Clock()
            sample = {"train_step": aside.since(starts[-1]), "inputs": inputs_s[-1]}
            drawn = self.model_side.draw()
            sides = [
                ("official", official, official_inputs(*drawn)),
                ("model", self.model_side, drawn),
            ]
            for name, side, inputs in reversed(sides) if self.flip else sides:
                begin = _Clock()
                side.model_step(inputs)
                sample[name] = _Clock().since(begin)
            self.flip = not self.flip
            sample["aside"] = _Clock().since(aside)
            samples.append(sample)
            return result

        quiet = contextlib.redirect_stdout(io.StringIO())  # its "resuming ..." lines
        with trainer.using(inputs=timed), quiet:
            trainer.fit(stop_after=steps, around_step=paired_step)
        for sample, begin, end in zip(samples, starts, starts[1:]):
            sample["loop"] = _minus(end.since(begin), sample.pop("aside"))
            sample["between"] = _minus(sample["loop"], sample["train_step"])
        return samples[:-1]

    def probe(self) -> float:
        from hjepa.train.monitor import OnlineProbe

        t = self.trainer
        probe = OnlineProbe.from_config(t.cfg, t.mean, t.std, t.device)
        probe(t.model.target_encoder)  # warm-up: the first call pays one-off costs
        start = time.perf_counter()
        probe(t.model.target_encoder)
        t.model.train()
        return time.perf_counter() - start


class _TimedInputs:
    """The trainer's input pipeline, each call's (wall, CPU) seconds appended to ``spans``."""

    def __init__(self, pipeline) -> None:
        self.pipeline, self.spans = pipeline, []

    def __call__(self, images, micro):
        begin = _Clock()
        result = self.pipeline(images, micro)
        self.spans.append(_Clock().since(begin))
        return result

    def second_view(self, images, micro):
        return self.pipeline.second_view(images, micro)


def summarise(samples: list[dict[str, tuple[float, float]]]) -> dict:
    """Per clock (wall, CPU): each side's images/s by its median time, and the medians and
    quartiles of the per-sample ratios."""
    report: dict = {"samples": len(samples)}
    for k, clock in enumerate(("wall", "cpu")):
        t = {side: [s[side][k] for s in samples] for side in SIDES}
        ratio = {
            "loop_vs_official": [o / lp for o, lp in zip(t["official"], t["loop"])],
            "model_vs_official": [o / m for o, m in zip(t["official"], t["model"])],
            "train_step_vs_official": [o / s for o, s in zip(t["official"], t["train_step"])],
            "loop_vs_model": [m / lp for m, lp in zip(t["model"], t["loop"])],
            "outside_model_share_of_loop": [
                (i + b) / lp for i, b, lp in zip(t["inputs"], t["between"], t["loop"])
            ],
        }
        report[clock] = {
            "ms": {side: 1e3 * statistics.median(ts) for side, ts in t.items()},
            "images_per_s": {
                side: BATCH / statistics.median(t[side]) for side in ("loop", "official", "model")
            },
            "ratios": {name: median_quartiles(values) for name, values in ratio.items()},
        }
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ijepa", type=Path, required=True, help="checkout of the official code")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=150,
        help="seconds for the whole run, set-up included: no new round starts that would end later",
    )
    parser.add_argument("--steps", type=int, default=5, help="steps per fit call")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variants", default="quickstart,quickstart_repeat")
    parser.add_argument("--probe", action="store_true", help="time the online kNN probe once")
    parser.add_argument(
        "--samples-out", type=Path, help="also write every sample (side -> [wall s, CPU s]) here"
    )
    args = parser.parse_args(argv)
    if not (args.ijepa / "src" / "models" / "vision_transformer.py").is_file():
        parser.error(f"{args.ijepa} is not a checkout of facebookresearch/ijepa")
    torch.set_num_threads(args.threads)
    from hjepa.config import load_config

    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}: choose from {sorted(VARIANTS)}")
    begin, load_start = time.perf_counter(), os.getloadavg()
    official = Official(args.ijepa)
    with tempfile.TemporaryDirectory() as tmp:
        loops = {name: Loop.build(*VARIANTS[name], Path(tmp) / name) for name in names}
        for loop in loops.values():  # warm-up: first batches, allocator, lazy initialisation
            loop.paired_fit(3, official)
        samples: dict[str, list] = {name: [] for name in names}
        while True:  # variants take turns, at least once each
            start = time.perf_counter()
            for name, loop in loops.items():
                samples[name] += loop.paired_fit(args.steps, official)
            now = time.perf_counter()
            print(f"round of {now - start:.0f} s at {now - begin:.0f} s", file=sys.stderr)
            if now + (now - start) - begin > args.budget_s:
                break
        probe = next(iter(loops.values())).probe() if args.probe else None
    report = {
        "threads": args.threads,
        "batch": BATCH,
        "data": "synthetic" if data_overrides() else "fashion_mnist",
        "load_average_1min": {"start": load_start[0], "end": os.getloadavg()[0]},
        "variants": {name: summarise(per) for name, per in samples.items()},
    }
    if probe is not None:
        report["probe_s"] = probe
        report["knn_every"] = load_config("quickstart").train.knn_every  # the preset's cadence
    if args.samples_out:  # runs can be pooled: each sample's ratios stand on their own
        args.samples_out.write_text(json.dumps(samples))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
