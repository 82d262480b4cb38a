"""Does a DataLoader worker that draws the masks and crops ahead speed up a CPU quickstart?

Usage::

    flock /tmp/cpu.lock python benchmarks/draw_workers.py [--samples 12] [--steps 3] [key=value ...]

Two trainers of the quickstart preset (plus the overrides) live in this process: one draws
each micro-batch's masks and crop boxes in its batch producer (``draw_workers=0``, the CPU
default of :func:`hjepa.train.parts.build_inputs`), the other in one DataLoader worker process
(``draw_workers=1``, the accelerator default). One sample is ``--steps`` steps of each, back to
back (the order alternates from sample to sample), every step its producer's ``next`` and
``Trainer.train_step``, so a change of load on a shared machine hits both alike. Reported:
the median of the per-sample ratios in-process time / worker time (> 1: the worker is faster),
its 25th-75th percentiles, and each side's median seconds per step, on wall and process CPU
time (the worker's own CPU time is not in the latter: wall time is the verdict).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time

from hjepa.config import load_config
from hjepa.train.parts import build_inputs, build_parts
from hjepa.train.trainer import Trainer


def _trainer(overrides: list[str], run_dir: str, draw_workers: int) -> Trainer:
    cfg = load_config("quickstart", [*overrides, f"run.dir={run_dir}"])
    parts = build_parts(cfg)
    inputs = build_inputs(cfg, parts.data, parts.env, parts.device, draw_workers=draw_workers)
    trainer = Trainer(cfg, parts=dataclasses.replace(parts, inputs=inputs))
    trainer.model.train()
    return trainer


def _timed_steps(trainer: Trainer, batches, steps: int) -> tuple[float, float]:
    """(wall s, process CPU s) per step over ``steps`` steps."""
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        trainer.train_step(next(batches))
    return (time.perf_counter() - wall) / steps, (time.process_time() - cpu) / steps


def _quartiles(values: list[float]) -> dict[str, float]:
    q1, median, q3 = statistics.quantiles(values, n=4)
    return {"median": round(median, 4), "p25": round(q1, 4), "p75": round(q3, 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=12)
    parser.add_argument("--steps", type=int, default=3, help="steps per side and sample")
    parser.add_argument("overrides", nargs="*", help="config overrides (key=value)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        sides = {w: _trainer(args.overrides, f"{tmp}/w{w}", w) for w in (0, 1)}
        batches = {w: trainer.step_batches() for w, trainer in sides.items()}
        for w, trainer in sides.items():  # warm-up: optimizer state, worker start
            _timed_steps(trainer, batches[w], 2)
        times: dict[int, list[tuple[float, float]]] = {0: [], 1: []}
        for sample in range(args.samples):
            for w in (0, 1) if sample % 2 == 0 else (1, 0):
                times[w].append(_timed_steps(sides[w], batches[w], args.steps))
    report = {"overrides": args.overrides, "samples": args.samples, "steps": args.steps}
    for clock, k in (("wall", 0), ("cpu", 1)):
        ratios = [a[k] / b[k] for a, b in zip(times[0], times[1], strict=True)]
        report[f"{clock}_ratio_in_process_over_worker"] = _quartiles(ratios)
        for w in (0, 1):
            report[f"{clock}_s_per_step_workers{w}"] = round(
                statistics.median(t[k] for t in times[w]), 4
            )
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
