"""Summarise short runs by their last online-probe record (no ``hjepa eval`` needed).

Usage: ``python benchmarks/summarize_probes.py RUNS_DIR [NAME ...]``

Runs named ``<name>_s<seed>`` are grouped by ``<name>``; each column is the mean ± sample std
over seeds of the final ``probe`` record in ``metrics.jsonl`` (online kNN on the fixed held-out
subset, effective rank and normalised std of level-0 features) and of the final prediction loss.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from hjepa.experiments.report import fmt_mean_std
from hjepa.train.logging import read_metrics


def last_probe(run_dir: Path) -> tuple[dict, dict] | None:
    probes, train = read_metrics(run_dir, "probe"), read_metrics(run_dir, "train")
    return (probes[-1], train[-1]) if probes and train else None


def main(argv: list[str]) -> int:
    runs_dir, wanted = Path(argv[0]), argv[1:]
    groups: dict[str, list[tuple[dict, dict]]] = {}
    for run in sorted(p for p in runs_dir.iterdir() if p.is_dir()):
        found = last_probe(run)
        if found:
            groups.setdefault(re.sub(r"_s\d+$", "", run.name), []).append(found)
    names = wanted or sorted(groups)
    print("| run | seeds | step | kNN level0 | kNN concat | rank level0 | std level0 | pred loss |")
    print("|---|---|---|---|---|---|---|---|")
    for name in names:
        recs = groups.get(name, [])
        if not recs:
            continue

        def col(key: str, src: int = 0, d: int = 3, recs=recs) -> str:
            return fmt_mean_std([r[src].get(key, float("nan")) for r in recs], d)

        concat = "knn_concat" if "knn_concat" in recs[0][0] else "knn_level0"
        loss = "loss_pred" if "loss_pred" in recs[0][1] else "loss"
        print(
            f"| {name} | {len(recs)} | {recs[0][0]['step']} | {col('knn_level0')} | "
            f"{col(concat)} | {col('rank_level0', d=1)} | {col('std_level0', d=4)} | "
            f"{col(loss, 1)} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
