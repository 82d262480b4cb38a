"""The quickstart's clock: training time, evaluation time and their ratio, in one run.

Usage::

    python benchmarks/quickstart_clock.py [--threads 2] [--steps 12] [--cold] [--ijepa PATH]

1. Training: the quickstart preset's ``Trainer.fit`` is timed over a short and a long
   ``train.stop_after`` call; their difference per step, times the preset's total steps, plus
   the online kNN probe times the number of probes the preset runs, is the projected training
   time of the whole quickstart (``hjepa train`` as the README runs it).
2. Evaluation: ``hjepa eval`` on the checkpoint just written. By default with the baselines
   off, which is the work of an evaluation whose baselines come from the cache (the cache
   read itself is a JSON file); with ``--cold``, first with an empty cache (the very first
   evaluation of this data, architecture and seed, and the whole cost of every evaluation
   before the cache existed), then with the cache it filled. An evaluation's cost does not
   depend on how long the encoder trained.
3. With ``--ijepa``, the official I-JEPA model step on the race's ViT (``race_ijepa.py``),
   measured in the same run, so a README line can quote both with the same day's img/s.

Prints JSON; wall times are printed for context, the ratios are what to compare.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch


def _timed(fn) -> tuple[float, float]:
    """Wall and process CPU seconds of ``fn()``. On a shared machine the wall time of a phase
    depends on who else runs; the CPU seconds our process spends mostly do not."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12, help="extra steps of the long fit")
    parser.add_argument("--cold", action="store_true", help="also time an empty-cache eval")
    parser.add_argument("--ijepa", type=Path, default=None, help="official checkout (optional)")
    parser.add_argument("overrides", nargs="*", help="key=value on top of the quickstart preset")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from hjepa.config import load_config
    from hjepa.eval.runner import evaluate_run
    from hjepa.train.monitor import OnlineProbe
    from hjepa.train.trainer import Trainer

    report: dict = {"threads": args.threads}
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        cfg = load_config("quickstart", [*args.overrides, f"run.dir={run}", "run.progress=false"])
        knn_every = cfg.train.knn_every
        cfg.train.knn_every = 0  # probes are timed apart and added per probe the preset runs
        trainer = Trainer(cfg)
        total = trainer.total_steps
        # The preset probes every knn_every steps and after the last one.
        probes = total // knn_every + (total % knn_every != 0) if knn_every else 1
        probe = OnlineProbe.from_config(cfg, trainer.mean, trainer.std, trainer.device)

        def fit(steps: int) -> tuple[float, float]:
            return _timed(lambda: trainer.fit(stop_after=steps))

        def training() -> tuple[float, float]:
            """Projected (wall, CPU) seconds of the whole preset's training."""
            short, long = fit(2), fit(2 + args.steps)
            per_probe = _timed(lambda: probe(trainer.model.target_encoder))
            return tuple(
                total * (long[i] - short[i]) / args.steps + probes * per_probe[i] for i in range(2)
            )

        fit(2)  # warm-up
        probe(trainer.model.target_encoder)  # warm-up: the first call pays one-off costs
        before = training()
        cache = [f"eval.cache_dir={Path(tmp) / 'cache'}"]
        runs = (
            {"cold": cache, "warm": cache}
            if args.cold
            else {"warm_equivalent": ["eval.baselines=false"]}
        )
        spent = {}
        for name, overrides in runs.items():
            spent[name] = _timed(
                lambda o=overrides: evaluate_run(run, overrides=o, progress_bar=False)
            )
            parts = json.loads((run / "eval.json").read_text())["seconds"]
            report.setdefault("eval", {})[name] = {
                "wall_s": spent[name][0],
                "cpu_s": spent[name][1],
                "parts_wall_s": parts,
            }
        after = training()  # training timed on both sides of the evaluation
        train = [(before[i] + after[i]) / 2 for i in range(2)]
        report["train"] = {
            "steps": total,
            "probes": probes,
            "projected_wall_s": {"before_eval": before[0], "after_eval": after[0]},
            "projected_cpu_s": {"before_eval": before[1], "after_eval": after[1]},
            "images_per_s_wall": total * cfg.train.batch_size / (train[0] or 1.0),
        }
        report["eval_over_train"] = {
            name: {"wall": w / train[0], "cpu": c / train[1]} for name, (w, c) in spent.items()
        }
    if args.ijepa is not None:
        from hjepa.experiments.race import BATCH, Official, Ours, official_inputs

        official, drawer = Official(args.ijepa), Ours("ijepa", "repeat")
        times = []
        for _ in range(5):
            inputs = official_inputs(*drawer.draw())
            times.append(_timed(lambda inputs=inputs: official.model_step(inputs))[0])
        report["official_step_images_per_s"] = BATCH / sorted(times)[len(times) // 2]
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
