"""What a training step asks of an accelerator, counted on the CPU.

Usage::

    python benchmarks/step_audit.py [--preset quickstart] [--steps 8] [--mask-steps 1000]
        [--mask-presets quickstart,imagenet100_vits16] [--compile-steps 12] [key=value ...]
    python benchmarks/step_audit.py --race-steps 60 [--out FILE.json] [key=value ...]

Builds the trainer of ``--preset`` with ``key=value`` overrides (default: the preset on the
race's synthetic data, see :data:`hjepa.experiments.race.SYNTHETIC`) and reports, per
optimizer step after two warm-up steps:

* ``host_syncs``: operations that need a value on the host (``aten._local_scalar_dense``,
  ``nonzero``, ``masked_select``, ``is_nonzero``, ``equal``, boolean-mask indexing; see
  :data:`hjepa.train.sync_audit.SYNC_OPS`) and tensors made from host values (``lift_fresh``,
  which are host-to-device copies on a GPU), counted with a ``TorchDispatchMode`` inside
  ``Trainer.train_step`` and, separately, in the batch producer (``Trainer.step_batches``);
* ``ops``: aten operations dispatched per step, and the events ``torch.profiler`` records;
* ``attention_lengths``: the distinct key lengths the step's attention calls saw.

Then, for each of ``--mask-presets``, the distinct attention key lengths over ``--mask-steps``
micro-batches of its mask sampler (drawn at the preset's global micro-batch, from the
trainer's own mask streams, no model), unpadded (an eager CPU step) and padded to token
buckets (an accelerator or ``train.compile``; :mod:`hjepa.data.buckets`), and with
``--compile-steps`` the graphs Dynamo built and the graph breaks it met over that many steps
of ``train.compile=true``. Prints JSON.

``--race-steps N`` instead times ``train.compile=true`` against the eager step, paired step by
step in one process (:func:`compiled_vs_eager`); ``--out`` also writes the report to a file.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from hjepa.config import load_config
from hjepa.experiments.race import SYNTHETIC
from hjepa.grid import grid_side
from hjepa.train import sizes
from hjepa.train.parts import mask_preparer
from hjepa.train.sync_audit import SyncCounter, attention_key_lengths


def build_trainer(preset: str, overrides: list[str], run_dir: str):
    from hjepa.train.trainer import Trainer

    cfg = load_config(
        preset,
        [
            *SYNTHETIC,
            "train.threads=1",
            "run.progress=false",
            "run.tensorboard=false",
            f"run.dir={run_dir}",
            *overrides,
        ],
    )
    return Trainer(cfg)


def step_counts(trainer, steps: int, warmup: int = 2) -> dict:
    """Syncs, ops and attention lengths per step of ``trainer`` (after ``warmup`` steps)."""
    batches = trainer.step_batches()
    trainer.model.train()
    for _ in range(warmup):
        trainer.train_step(next(batches))
    in_step, producer = SyncCounter(), SyncCounter()
    events = 0
    for _ in range(steps):
        with producer:
            micro_batches = next(batches)
        with profile(activities=[ProfilerActivity.CPU]) as prof, in_step:
            trainer.train_step(micro_batches)
        events += sum(1 for e in prof.events() if e.name.startswith("aten::"))
    return {
        "host_syncs_per_step": in_step.per_step(steps),
        "producer_syncs_per_step": producer.per_step(steps),
        "aten_ops_per_step": in_step.ops / steps,
        "profiler_aten_events_per_step": events / steps,
        "attention_key_lengths_seen": sorted(in_step.attention_lengths),
    }


def mask_lengths(preset: str, steps: int) -> dict:
    """Distinct attention key lengths over ``steps`` micro-batches of ``preset``'s masks."""
    cfg = load_config(preset, ["data.name=synthetic", "data.channels=3"])
    batch = sizes.micro_batch_size(cfg, 1)
    report = {"batch": batch, "predictor_mode": cfg.model.predictor_mode}
    for padded in (False, True):
        lengths: dict[int, int] = {}
        try:
            prepare = mask_preparer(cfg, batch, pad_tokens=True) if padded else None
        except TypeError:  # the code before token buckets
            continue
        prepare = prepare or mask_preparer(cfg, batch)
        for micro in range(steps):
            index = prepare(micro)
            for n in attention_key_lengths(index, cfg.model.predictor_mode, grid_tokens(cfg)):
                lengths[n] = lengths.get(n, 0) + 1
        key = "padded" if padded else "unpadded"
        report[key] = {"distinct": len(lengths), "lengths": dict(sorted(lengths.items()))}
    return report


def grid_tokens(cfg) -> int:
    return grid_side(cfg.data.image_size, cfg.model.patch_size) ** 2


def compile_counts(preset: str, overrides: list[str], steps: int) -> dict:
    """Graphs and graph breaks Dynamo met over ``steps`` compiled steps."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = build_trainer(preset, ["train.compile=true", *overrides], run_dir)
        batches = trainer.step_batches()
        trainer.model.train()
        error = None
        try:
            for _ in range(steps):
                trainer.train_step(next(batches))
        except Exception as e:  # a failed compile is a finding: report it, keep the rest
            error = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
    stats = counters["stats"]
    return {
        "steps": steps,
        "error": error,
        "unique_graphs": stats.get("unique_graphs", 0),
        "frames_compiled": stats.get("calls_captured", 0),
        "graph_breaks": sum(counters["graph_break"].values()),
        "graph_break_reasons": dict(counters["graph_break"]),
        "recompiles": dict(counters["recompiles"]) if "recompiles" in counters else {},
    }


def _timed_step(trainer, micro_batches) -> tuple[float, float, int]:
    """(wall s, process CPU s, graphs Dynamo built) of one ``train_step``, waited for."""
    from torch._dynamo.utils import counters

    graphs = counters["stats"].get("unique_graphs", 0)
    wall, cpu = time.perf_counter(), time.process_time()
    float(trainer.train_step(micro_batches).terms[0])  # waits for the step
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return wall, cpu, counters["stats"].get("unique_graphs", 0) - graphs


def compiled_vs_eager(preset: str, overrides: list[str], steps: int) -> dict:
    """``train.compile=true`` against the eager step in one process, over ``steps`` steps of
    ``preset``: each step number runs on the eager trainer and on the compiled one (the same
    batch and masks; which goes first alternates). Steps on which Dynamo built a graph are left
    out (they time the compiler); the others give per-pair ratios eager / compiled (> 1:
    compiled faster), on wall and on process CPU time."""
    import torch._dynamo

    torch._dynamo.reset()
    pairs, compiling = [], 0
    with tempfile.TemporaryDirectory() as eager_dir, tempfile.TemporaryDirectory() as graph_dir:
        eager = build_trainer(preset, ["train.compile=false", *overrides], eager_dir)
        compiled = build_trainer(preset, ["train.compile=true", *overrides], graph_dir)
        eager_batches, compiled_batches = eager.step_batches(), compiled.step_batches()
        eager.model.train(), compiled.model.train()
        for step in range(steps):
            eager_step = (eager, next(eager_batches))
            compiled_step = (compiled, next(compiled_batches))
            order = [eager_step, compiled_step] if step % 2 else [compiled_step, eager_step]
            timed = {id(t): _timed_step(t, b) for t, b in order}
            (e_wall, e_cpu, _), (c_wall, c_cpu, built) = timed[id(eager)], timed[id(compiled)]
            print(
                f"step {step}: eager {e_wall:.3f} s, compiled {c_wall:.3f} s, {built} graph(s)",
                file=sys.stderr,
                flush=True,
            )
            if built:
                compiling += 1
                continue
            pairs.append((e_wall / c_wall, e_cpu / c_cpu, e_wall, c_wall))
    return _ratio_report(pairs, steps, compiling, eager.micro_batch)


def _ratio_report(pairs: list[tuple], steps: int, compiling: int, batch: int) -> dict:
    def summary(values: list[float]) -> dict:
        q = statistics.quantiles(values, n=4) if len(values) > 1 else values * 3
        return {"median": statistics.median(values), "p25": q[0], "p75": q[2]}

    return {
        "steps": steps,
        "steps_that_compiled": compiling,
        "pairs_timed": len(pairs),
        "ratio_wall_eager_over_compiled": summary([p[0] for p in pairs]),
        "ratio_cpu_eager_over_compiled": summary([p[1] for p in pairs]),
        "eager_images_per_s": batch / statistics.median(p[2] for p in pairs),
        "compiled_images_per_s": batch / statistics.median(p[3] for p in pairs),
        "load_average_at_end": os.getloadavg(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="quickstart")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--mask-steps", type=int, default=1000)
    parser.add_argument("--mask-presets", default="quickstart,imagenet100_vits16")
    parser.add_argument("--compile-steps", type=int, default=12, help="0: skip")
    parser.add_argument(
        "--race-steps", type=int, default=0, help="time compiled against eager steps (0: skip)"
    )
    parser.add_argument("--out", default="", help="also write the report (JSON) here")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.race_steps:  # this comparison alone: it takes minutes of compilation already
        report = {"preset": args.preset, "overrides": args.overrides, "threads": 1}
        report["compiled_vs_eager"] = compiled_vs_eager(
            args.preset, args.overrides, args.race_steps
        )
        return _emit(report, args.out)
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = build_trainer(args.preset, args.overrides, run_dir)
        report = {"preset": args.preset, "overrides": args.overrides}
        report["step"] = step_counts(trainer, args.steps)
    report["masks"] = {
        name: mask_lengths(name, args.mask_steps) for name in args.mask_presets.split(",") if name
    }
    if args.compile_steps:
        report["compile"] = compile_counts(args.preset, args.overrides, args.compile_steps)
    return _emit(report, args.out)


def _emit(report: dict, out: str) -> int:
    text = json.dumps(report, indent=2)
    print(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
