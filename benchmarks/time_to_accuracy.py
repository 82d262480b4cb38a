"""Time-to-accuracy: train a preset and record, every ``--every`` steps, the online kNN and a
linear probe of the target encoder against images seen and training wall time.

    python benchmarks/time_to_accuracy.py --config quickstart --out runs/tta_quickstart \\
        --every 117 [key=value ...]
    python benchmarks/time_to_accuracy.py --plot runs/tta_a/curve.jsonl runs/tta_b/curve.jsonl \\
        --labels "old recipe" "new recipe" --out docs/img/time_to_accuracy.png

Training is the ordinary trainer run in stretches of ``--every`` steps (``train.stop_after``)
on one run directory, so the curve is that of the uninterrupted run (resume is bit-identical on
CPU) and a killed benchmark continues where it stopped: run the same command again. The probe
is the trainer's own online probe (``train.knn_bank_size`` bank images, ``train.knn_query_size``
test images) with its linear probe switched on; raw pixels and the random initialisation (the
step-0 encoder) are probed the same way once and drawn as horizontal lines. Wall time counts
the training stretches only, not the probes.

``curve.jsonl`` holds one record per line: ``{"kind": "pixels", "knn", "linear"}``, then
``{"kind": "probe", "step", "images_seen", "epoch", "train_s", "knn_<feature>",
"linear_<feature>", ...}`` with step 0 the random initialisation.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from hjepa.config import load_config
from hjepa.train.monitor import OnlineProbe
from hjepa.train.trainer import Trainer
from hjepa.viz.common import new_figure, save

CURVE = "curve.jsonl"


def read_curve(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _append(path: Path, record: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def _probe_record(probe: OnlineProbe, trainer: Trainer, train_s: float) -> dict:
    t = trainer.cfg.train
    started = time.perf_counter()
    values = probe(trainer.model.target_encoder)
    trainer.model.train()
    return {
        "kind": "probe",
        "step": trainer.step,
        "images_seen": trainer.step * t.batch_size,
        "epoch": trainer.step * t.accum_steps / trainer.micro_per_epoch,
        "train_s": round(train_s, 2),
        "probe_s": round(time.perf_counter() - started, 2),
        **{k: v for k, v in values.items() if isinstance(v, int | float)},
    }


def run_curve(
    preset: str,
    out: Path,
    every: int,
    overrides: list[str],
    until: int = 0,
    linear: tuple[str, ...] = ("concat",),
) -> Path:
    """Train ``preset`` in ``out/run``, probing every ``every`` steps, up to step ``until``
    (0: the end of the run; rerun to continue); ``linear``: the features that also get a
    linear probe (``concat`` means level 0 on a flat model). Returns the curve file."""
    out.mkdir(parents=True, exist_ok=True)
    curve = out / CURVE
    cfg = load_config(preset, [*overrides, f"run.dir={out / 'run'}", "train.knn_every=0"])
    done = read_curve(curve)
    trainer = Trainer(cfg)  # holds the seed's random initialisation until the first fit()
    if cfg.model.levels == 1:
        linear = tuple(dict.fromkeys("level0" if n == "concat" else n for n in linear))
    probe = OnlineProbe.from_config(cfg, trainer.mean, trainer.std, trainer.device, linear)
    if not any(r["kind"] == "pixels" for r in done):
        _append(curve, {"kind": "pixels", **probe.pixels()})
    probes = [r for r in done if r["kind"] == "probe"]
    if not probes:
        record = _probe_record(probe, trainer, 0.0)
        _append(curve, record)
        probes = [record]
    train_s, step = probes[-1]["train_s"], probes[-1]["step"]
    last = min(until, trainer.total_steps) if until > 0 else trainer.total_steps
    while step < last:
        cfg.train.stop_after = min(every, last - step)
        started = time.perf_counter()
        trainer.fit()  # resumes from last.pt (written by the previous stretch), runs `every` steps
        train_s += time.perf_counter() - started
        if trainer.step <= step:
            break  # nothing left to train: the checkpoint is already past the curve's end
        record = _probe_record(probe, trainer, train_s)
        _append(curve, record)
        probes.append(record)
        step = trainer.step
        knn = {k: round(v, 3) for k, v in record.items() if k.startswith(("knn_", "linear_"))}
        print(f"step {trainer.step}/{trainer.total_steps} train {train_s:.0f}s {knn}", flush=True)
    return curve


def plot_curves(curves: list[str], labels: list[str], out: str | Path, feature: str) -> Path:
    """kNN and linear accuracy against images seen and training minutes, one line per curve;
    each curve's pixel and random-init baselines as horizontal lines of its colour."""
    fig = new_figure(11, 7.5)
    axes = fig.subplots(2, 2, sharey="row")
    colours = [f"C{i}" for i in range(10)]
    for i, (path, label) in enumerate(zip(curves, labels)):
        records = read_curve(path)
        pixels = next(r for r in records if r["kind"] == "pixels")
        probes = [r for r in records if r["kind"] == "probe"]
        key = feature if f"knn_{feature}" in probes[0] else "level0"
        init, trained = probes[0], probes[1:]
        colour = colours[i % len(colours)]
        for row, metric in enumerate(("knn", "linear")):
            if f"{metric}_{key}" not in init:  # no linear probe of this feature (--linear)
                continue
            for col, (x_key, scale) in enumerate((("images_seen", 1e3), ("train_s", 60.0))):
                ax = axes[row][col]
                xs = [r[x_key] / scale for r in trained]
                ys = [r[f"{metric}_{key}"] for r in trained]
                ax.plot(xs, ys, "o-", color=colour, ms=3, label=f"{label} ({key})")
                ax.axhline(init[f"{metric}_{key}"], color=colour, ls=":", lw=1)
                if i == 0:  # pixels do not depend on the run: one line
                    ax.axhline(pixels[metric], color="k", ls="--", lw=1, label="raw pixels")
    for row, metric in enumerate(("kNN (online bank)", "linear probe (online bank)")):
        axes[row][0].set_ylabel(metric)
    axes[1][0].set_xlabel("thousand images seen")
    axes[1][1].set_xlabel("training minutes (this machine)")
    axes[0][0].legend(fontsize=7, loc="lower right")
    fig.suptitle("time to accuracy (dotted: each run's random init; dashed: raw pixels)")
    return save(fig, out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="quickstart", help="preset name or YAML path")
    parser.add_argument("--out", required=True, help="output folder (train) or PNG (--plot)")
    parser.add_argument("--every", type=int, default=117, help="steps between probes")
    parser.add_argument("--until", type=int, default=0, help="stop at this step (rerun: go on)")
    parser.add_argument("--plot", nargs="+", metavar="CURVE", help="plot these curve.jsonl files")
    parser.add_argument("--labels", nargs="+", help="one label per --plot curve")
    parser.add_argument("--feature", default="concat", help="level0, level1, ... or concat")
    parser.add_argument(
        "--linear", nargs="+", default=["concat"], help="features that get a linear probe"
    )
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args(argv)
    if args.plot:
        labels = args.labels or [Path(p).parent.name for p in args.plot]
        if len(labels) != len(args.plot):
            parser.error("give one --labels entry per --plot curve")
        print(plot_curves(args.plot, labels, args.out, args.feature))
        return 0
    if args.every < 1:
        parser.error("--every must be >= 1")
    curve = run_curve(
        args.config, Path(args.out), args.every, args.overrides, args.until, tuple(args.linear)
    )
    plot_curves([str(curve)], [Path(args.out).name], Path(args.out) / "curve.png", args.feature)
    print(curve)
    return 0


if __name__ == "__main__":
    sys.exit(main())
