"""Summarise a folder of evaluated runs as the ablation's Markdown table (+ plot, correlation).

Usage: ``python benchmarks/summarize_runs.py RUNS_DIR [--out DIR] [--title TEXT] [--online]``

Every sub-folder of RUNS_DIR with a ``config.yaml`` is a run; runs named ``<name>_s<seed>`` are
grouped by ``<name>`` and reported as mean ± sample std over seeds (kNN and linear of all
levels concatenated and of level 0, low-shot and mCE when evaluated, collapse verdict), with
the loss-vs-accuracy Spearman correlations from their ``metrics.jsonl``. Writes
``ablation.md``, ``ablation.png``, ``correlation.{md,json}`` and ``report.md`` into ``--out``
(default RUNS_DIR) and prints the table. Same code as ``hjepa ablate`` (experiments/report.py).
``--online`` reads each run's last online probe instead of ``eval.json`` (runs trained with
``run_variants.py --no-eval``): kNN on the probe's bank, effective rank and normalised std.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hjepa.experiments.report import (
    ablation_markdown,
    ablation_rows,
    group_runs,
    write_ablation_report,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs_dir", type=Path)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--title", default="Ablation")
    parser.add_argument("--online", action="store_true", help="use the last online probes")
    args = parser.parse_args(argv)
    if not args.runs_dir.is_dir():
        print(f"summarize_runs: {args.runs_dir} is not a folder", file=sys.stderr)
        return 2
    runs = sorted(d for d in args.runs_dir.iterdir() if (d / "config.yaml").is_file())
    if not runs:
        print(
            f"summarize_runs: no run folders (with config.yaml) in {args.runs_dir}", file=sys.stderr
        )
        return 2
    source = "online" if args.online else "eval"
    write_ablation_report(args.out or args.runs_dir, runs, title=args.title, source=source)
    print(ablation_markdown(ablation_rows(group_runs(runs), source)), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
