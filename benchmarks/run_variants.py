"""Run many training variants side by side and collect their results in one JSON-lines file.

Each line of a variants file is ``name|key=value key=value ...`` (overrides on top of the
preset). Every variant is trained and then evaluated (``hjepa eval``); at most ``--parallel``
run at once, each with ``--threads`` CPU threads. The summary holds each run's eval.json, its
online-probe records and its last train record, so tables can be built afterwards with
``benchmarks/summarize_runs.py``.

    python benchmarks/run_variants.py benchmarks/variants/*.txt --out OUT --parallel 8 \
        --device cuda --set data.root=/path/to/fashion-mnist
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path


def read_variants(paths: list[str]) -> list[tuple[str, list[str]]]:
    variants = []
    for path in paths:
        for line in Path(path).read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                name, _, args = line.partition("|")
                variants.append((name.strip(), args.split()))
    names = [n for n, _ in variants]
    duplicates = {n for n in names if names.count(n) > 1}
    if duplicates:
        sys.exit(f"duplicate variant names: {sorted(duplicates)}")
    return variants


def same_as_earlier(
    variants: list[tuple[str, list[str]]], preset: str, extra: list[str]
) -> dict[str, str]:
    """``{name: earlier name}`` for variants whose resolved config repeats an earlier one's
    (``loss.regularizer=none`` and an explicit default such as ``train.ema_timing=after_step``
    resolve alike)."""
    from hjepa.config import load_config

    first: dict[str, str] = {}
    duplicates = {}
    for name, overrides in variants:
        key = json.dumps(load_config(preset, [*extra, *overrides]).to_dict(), sort_keys=True)
        if key in first:
            duplicates[name] = first[key]
        else:
            first[key] = name
    return duplicates


def run_one(name: str, overrides: list[str], args: argparse.Namespace) -> dict:
    if args.deadline and time.time() > args.started + args.deadline:
        return {"name": name, "overrides": overrides, "rc": None, "seconds": 0.0,
                "skipped": f"not started: past --deadline {args.deadline:g} s"}  # fmt: skip
    run_dir = Path(args.runs) / name
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONUNBUFFERED="1")
    common = [
        f"run.dir={run_dir}",
        f"train.device={args.device}",
        "run.progress=false",
        "run.tensorboard=false",
        f"train.threads={args.threads}",
        *args.extra,
    ]
    train = [sys.executable, "-m", "hjepa", "train", "--config", args.config, *common, *overrides]
    evaluate = [sys.executable, "-m", "hjepa", "eval", str(run_dir)] if args.eval else []
    if evaluate and name not in args.baselines_for:
        evaluate.append("--no-baselines")
    start = time.time()
    log = Path(args.runs) / f"{name}.log"
    with log.open("w") as f:
        rc = subprocess.call(train, stdout=f, stderr=subprocess.STDOUT, env=env)
        if rc == 0 and evaluate:
            rc = subprocess.call(evaluate, stdout=f, stderr=subprocess.STDOUT, env=env)
    record: dict = {"name": name, "overrides": overrides, "rc": rc, "seconds": time.time() - start}
    if (run_dir / "eval.json").is_file():
        record["eval"] = json.loads((run_dir / "eval.json").read_text())
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        records = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
        record["probes"] = [r for r in records if r["kind"] == "probe"]
        record["train_last"] = [r for r in records if r["kind"] == "train"][-1:]
    if rc != 0:
        record["log_tail"] = log.read_text()[-2000:]
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variants", nargs="+")
    parser.add_argument("--out", required=True, help="folder for summary.jsonl")
    parser.add_argument("--runs", default=None, help="folder for run dirs (default OUT/runs)")
    parser.add_argument("--config", default="quickstart")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--parallel", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--no-eval",
        dest="eval",
        action="store_false",
        help="skip hjepa eval: judge runs by their online probe records",
    )
    parser.add_argument(
        "--baselines-for",
        nargs="*",
        default=[],
        help="variant names whose eval also probes pixels and random init",
    )
    parser.add_argument(
        "--set",
        dest="extra",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="overrides applied to every variant",
    )
    parser.add_argument(
        "--skip-duplicates",
        action="store_true",
        help="run a variant whose resolved config repeats an earlier variant's only once",
    )
    parser.add_argument(
        "--deadline",
        type=float,
        default=0,
        metavar="SECONDS",
        help="start no run later than this after launch (0: no limit); list order is priority",
    )
    args = parser.parse_args()
    args.started = time.time()
    args.runs = args.runs or str(Path(args.out) / "runs")
    Path(args.runs).mkdir(parents=True, exist_ok=True)
    summary = Path(args.out) / "summary.jsonl"
    variants = read_variants(args.variants)
    if args.skip_duplicates:
        duplicates = same_as_earlier(variants, args.config, args.extra)
        for name, earlier in duplicates.items():
            print(f"{name}: same config as {earlier}, not run", flush=True)
            with summary.open("a") as f:
                f.write(json.dumps({"name": name, "same_as": earlier}) + "\n")
        variants = [(n, o) for n, o in variants if n not in duplicates]
    with ThreadPoolExecutor(args.parallel) as pool:
        futures = [pool.submit(run_one, n, o, args) for n, o in variants]
        for fut in as_completed(futures):  # write each result as soon as it exists
            record = fut.result()
            with summary.open("a") as f:
                f.write(json.dumps(record) + "\n")
            print(f"{record['name']}: rc={record['rc']} {record['seconds']:.0f}s", flush=True)


if __name__ == "__main__":
    main()
