"""Markdown reports (readable on GitHub) of one evaluated run and of a set of runs.

``write_eval_report(run_dir, results)`` writes ``RUN_DIR/report.md`` with the probe, collapse,
low-shot, robustness and transfer tables of ``eval.json`` and the plots (training curves,
accuracy under corruption, and any ``hjepa viz`` pictures) linked relatively.

``write_ablation_report(out_dir, run_dirs)`` groups run directories named ``<name>_s<seed>``
by name and writes ``ablation.md`` (mean ± sample std over seeds), ``ablation.png`` (bars with
error bars), ``correlation.md``/``.json`` and ``report.md`` combining them.
"""

from __future__ import annotations

import json
import os
import re
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hjepa.train.logging import read_metrics
from hjepa.viz.curves import plot_curves
from hjepa.viz.summary import plot_ablation, plot_robustness

SEED_SUFFIX = re.compile(r"_s(\d+)$")
#: Ablation metrics: (column title, key in a run summary); plotted ones first.
PLOTTED = ("kNN concat", "linear concat", "kNN level0", "linear level0")
METRICS = (
    ("kNN concat", "knn_concat"),
    ("linear concat", "linear_concat"),
    ("kNN level0", "knn_level0"),
    ("linear level0", "linear_level0"),
    ("linear 1% labels", "low_shot_0.01"),
    ("linear 10% labels", "low_shot_0.1"),
    ("mCE vs pixels", "mce"),
)
#: The same table from each run's last online probe (``metrics.jsonl``) instead of
#: ``eval.json``: kNN on the probe's small bank and query set, and the collapse statistics.
ONLINE_PLOTTED = ("kNN concat", "kNN level0")
ONLINE_METRICS = (
    ("kNN concat", "knn_concat"),
    ("kNN level0", "knn_level0"),
    ("eff. rank level0", "rank_level0"),
    ("norm. std level0", "std_level0"),
)
SOURCES = ("eval", "online")


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    if not values:
        raise ValueError("mean_std: no values")
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return statistics.fmean(values), std


def fmt_mean_std(values: Sequence[float], digits: int = 4) -> str:
    """``0.8123 ± 0.0040`` (``-`` for no values; just the value for one)."""
    if not values:
        return "-"
    mean, std = mean_std(values)
    return f"{mean:.{digits}f}" if len(values) == 1 else f"{mean:.{digits}f} ± {std:.{digits}f}"


# ----------------------------------------------------------------------------- one run


def _probe_rows(results: dict[str, Any]) -> list[str]:
    trained, rand = results.get("trained", {}), results.get("random_init", {})
    lines = [
        "| features | trained kNN | trained linear | random-init kNN | random-init linear |",
        "|---|---|---|---|---|",
    ]

    def acc(d: dict, key: str) -> str:
        return f"{d[key]:.4f}" if key in d else "-"

    for name, accs in trained.items():
        r = rand.get(name, {})
        lines.append(
            f"| {name} | {acc(accs, 'knn')} | {acc(accs, 'linear')} | {acc(r, 'knn')} | "
            f"{acc(r, 'linear')} |"
        )
    for name, accs in results.get("pixels", {}).items():
        lines.append(f"| raw {name} | {acc(accs, 'knn')} | {acc(accs, 'linear')} | | |")
    return lines


def _attentive_rows(attentive: dict[str, Any]) -> list[str]:
    trained, rand = attentive.get("trained", {}), attentive.get("random_init", {})
    lines = ["| tokens | trained | random init |", "|---|---|---|"]

    def acc(fit: dict | None) -> str:
        return "-" if fit is None else f"{fit['accuracy']:.4f}"

    for name, fit in trained.items():
        lines.append(f"| {name} | {acc(fit)} | {acc(rand.get(name))} |")
    for name, fit in attentive.get("pixels", {}).items():
        lines.append(f"| raw {name} (patches) | {acc(fit)} | |")
    return lines


def _collapse_rows(collapse: dict[str, Any]) -> list[str]:
    lines = [
        "| level | effective rank | rank / dim | normalised std (healthy) | collapsed |",
        "|---|---|---|---|---|",
    ]
    for name, r in collapse.items():
        lines.append(
            f"| {name} | {r['effective_rank']:.1f} | {r['effective_rank_fraction']:.3f} | "
            f"{r['normalized_embedding_std']:.4f} ({r['normalized_embedding_std_healthy']:.4f}) "
            f"| {'**yes**' if r['collapsed'] else 'no'} |"
        )
    return lines


def _low_shot_rows(low: dict[str, Any]) -> list[str]:
    models = [m for m in ("trained", "pixels") if m in low]
    lines = [
        "| labels | " + " | ".join(f"{m} (mean ± std)" for m in models) + " |",
        "|---" * (len(models) + 1) + "|",
    ]
    for fraction in low["trained"]:
        cells = [fmt_mean_std(low[m][fraction]["per_seed"]) for m in models]
        lines.append(f"| {float(fraction):.0%} | " + " | ".join(cells) + " |")
    return lines


def _robustness_rows(rob: dict[str, Any]) -> list[str]:
    acc = rob["accuracy"]
    lines = [
        "| corruption | encoder (mean over severities) | pixels | CE |",
        "|---|---|---|---|",
    ]
    for name in acc["encoder"]:
        enc = statistics.fmean(acc["encoder"][name].values())
        pix = statistics.fmean(acc["pixels"][name].values())
        ce = rob.get("ce", {}).get(name)
        lines.append(f"| {name} | {enc:.4f} | {pix:.4f} | {'-' if ce is None else f'{ce:.3f}'} |")
    mca = rob["mean_corruption_accuracy"]
    mce = "undefined" if rob.get("mce") is None else f"{rob['mce']:.3f}"
    lines.append(
        f"| **all** (clean {rob['clean']['encoder']:.4f} / {rob['clean']['pixels']:.4f}) | "
        f"**{mca['encoder']:.4f}** | **{mca['pixels']:.4f}** | **mCE {mce}** |"
    )
    return lines


def _transfer_rows(transfer: dict[str, Any]) -> list[str]:
    lines = ["| dataset | encoder | features | kNN | linear |", "|---|---|---|---|---|"]
    for name, entry in transfer.items():
        for group in ("trained", "random_init", "pixels"):
            for feat, accs in entry.get(group, {}).items():
                linear = f"{accs['linear']:.4f}" if "linear" in accs else "-"
                lines.append(f"| {name} | {group} | {feat} | {accs['knn']:.4f} | {linear} |")
    return lines


def eval_markdown(results: dict[str, Any], images: dict[str, str]) -> str:
    """The report of one ``eval.json``; ``images`` maps a caption to a relative PNG path."""
    run = Path(results["run_dir"]).name
    out = [f"# Evaluation of `{run}` (step {results['step']})", ""]
    out += ["## Frozen-feature probes", "", *_probe_rows(results), ""]
    if results.get("attentive"):
        out += ["## Attentive probe (frozen tokens)", "", *_attentive_rows(results["attentive"])]
        out.append("")
    if results.get("collapse"):
        out += ["## Collapse diagnostics (test features)", "", *_collapse_rows(results["collapse"])]
        out.append("")
    if results.get("low_shot"):
        low = results["low_shot"]
        seeds = len(next(iter(low["trained"].values()))["per_seed"])
        out += [
            f"## Low-shot linear probe ({low['features']} features, {seeds} seeds)",
            "",
            *_low_shot_rows(low),
            "",
        ]
    if results.get("robustness"):
        rob = results["robustness"]
        out += [
            f"## Robustness ({rob['images']} corrupted test images, {rob['features']} features)",
            "",
            "Linear probes fit on clean training features, scored on the corrupted test "
            "images; CE = encoder errors / pixel-probe errors summed over severities 1-5.",
            "",
            *_robustness_rows(rob),
            "",
        ]
    if results.get("transfer"):
        out += ["## Transfer", "", *_transfer_rows(results["transfer"]), ""]
    if images:
        out += ["## Plots", ""]
        for caption, rel in images.items():
            out += [f"### {caption}", "", f"![{caption}]({rel})", ""]
    return "\n".join(out)


VIZ_CAPTIONS = {
    "masks.png": "Mask samples per level",
    "attention.png": "Attention of the target encoder's last block",
    "pca.png": "PCA of patch features (RGB)",
}


def write_eval_report(run_dir: str | Path, results: dict[str, Any]) -> Path:
    """Write ``RUN_DIR/report.md`` (and its plots under ``RUN_DIR/viz``); return its path."""
    run_dir = Path(run_dir)
    viz = run_dir / "viz"
    images: dict[str, str] = {}
    records = read_metrics(run_dir)
    if records:
        plot_curves(records, viz / "curves.png")
        images["Training curves"] = "viz/curves.png"
    if results.get("robustness"):
        plot_robustness(results["robustness"], viz / "robustness.png")
        images["Accuracy under corruption"] = "viz/robustness.png"
    for name, caption in VIZ_CAPTIONS.items():
        if (viz / name).is_file():  # written by `hjepa viz`
            images[caption] = f"viz/{name}"
    path = run_dir / "report.md"
    path.write_text(eval_markdown(results, images))
    return path


# ----------------------------------------------------------------------------- many runs


def run_summary(run_dir: str | Path) -> dict[str, Any] | None:
    """Flat numbers of one run's ``eval.json`` (None when it has not been evaluated)."""
    path = Path(run_dir) / "eval.json"
    if not path.is_file():
        return None
    results = json.loads(path.read_text())
    trained = results.get("trained", {})
    level0 = trained.get("level0", {})
    concat = trained.get("concat", level0)  # one level: level 0 is all there is
    out: dict[str, Any] = {
        "knn_concat": concat.get("knn"),
        "linear_concat": concat.get("linear"),
        "knn_level0": level0.get("knn"),
        "linear_level0": level0.get("linear"),
        "collapsed": any(r["collapsed"] for r in results.get("collapse", {}).values()),
    }
    for fraction, stats in results.get("low_shot", {}).get("trained", {}).items():
        out[f"low_shot_{fraction}"] = stats["mean"]
    out["mce"] = results.get("robustness", {}).get("mce")
    return {k: v for k, v in out.items() if v is not None}


def online_summary(run_dir: str | Path) -> dict[str, Any] | None:
    """Flat numbers of a run's last online probe (None when it logged no probe)."""
    probes = [r for r in read_metrics(Path(run_dir)) if r.get("kind") == "probe"]
    if not probes:
        return None
    last = probes[-1]
    out = {key: last[key] for _, key in ONLINE_METRICS if key in last}
    out.setdefault("knn_concat", last.get("knn_level0"))  # one level: level 0 is all there is
    out["collapsed"] = any(v for k, v in last.items() if k.startswith("collapsed_"))
    out["step"] = last["step"]
    return {k: v for k, v in out.items() if v is not None}


def _check_source(source: str) -> None:
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")


def group_runs(run_dirs: Sequence[str | Path]) -> dict[str, list[Path]]:
    """Run directories grouped by name without the ``_s<seed>`` suffix, in first-seen order."""
    groups: dict[str, list[Path]] = {}
    for run_dir in map(Path, run_dirs):
        groups.setdefault(SEED_SUFFIX.sub("", run_dir.name), []).append(run_dir)
    return groups


def ablation_rows(groups: dict[str, list[Path]], source: str = "eval") -> list[dict[str, Any]]:
    """Per group: per-metric lists of seed values, evaluated/total runs, collapsed count.

    ``source="eval"`` reads each run's ``eval.json``; ``"online"`` its last online probe.
    """
    _check_source(source)
    summarize, metrics = (
        (run_summary, METRICS) if source == "eval" else (online_summary, ONLINE_METRICS)
    )
    rows = []
    for name, dirs in groups.items():
        summaries = [s for s in map(summarize, dirs) if s is not None]
        row: dict[str, Any] = {
            "name": name,
            "runs": len(dirs),
            "evaluated": len(summaries),
            "collapsed": sum(bool(s["collapsed"]) for s in summaries),
        }
        for title, key in metrics:
            row[title] = [s[key] for s in summaries if key in s]
        rows.append(row)
    return rows


def ablation_markdown(rows: list[dict[str, Any]]) -> str:
    """Markdown table (mean ± std over seeds); metrics no run has are left out."""
    titles = [title for title, _ in (*METRICS, *ONLINE_METRICS)]
    metrics = [t for t in dict.fromkeys(titles) if any(row.get(t) for row in rows)]
    lines = [
        "| variant | seeds | " + " | ".join(metrics) + " | collapse |",
        "|---|---|" + "---|" * len(metrics) + "---|",
    ]
    for row in rows:
        if row["evaluated"] == 0:
            verdict = "not evaluated"
        elif row["collapsed"]:
            verdict = f"**collapsed** ({row['collapsed']}/{row['evaluated']} seeds)"
        else:
            verdict = "healthy"
        digits = {"mCE vs pixels": 3, "eff. rank level0": 1}
        cells = [fmt_mean_std(row[m], digits.get(m, 4)) for m in metrics]
        seeds = f"{row['evaluated']}/{row['runs']}"
        lines.append(f"| {row['name']} | {seeds} | " + " | ".join(cells) + f" | {verdict} |")
    return "\n".join(lines) + "\n"


def write_ablation_report(
    out_dir: str | Path,
    run_dirs: Sequence[str | Path],
    *,
    title: str = "Ablation",
    preamble: str = "",
    source: str = "eval",
) -> dict[str, Path]:
    """Write ``ablation.md``, ``ablation.png``, ``correlation.{md,json}`` and ``report.md``.

    ``source="online"`` builds them from the runs' last online probes (runs not evaluated).
    """
    from hjepa.experiments.correlation import correlation_markdown, correlation_report

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = ablation_rows(group_runs(run_dirs), source)
    table = ablation_markdown(rows)
    paths = {"ablation.md": out_dir / "ablation.md"}
    paths["ablation.md"].write_text(f"# {title}\n\n{table}")
    plotted = PLOTTED if source == "eval" else ONLINE_PLOTTED
    paths["ablation.png"] = plot_ablation(
        [{"name": r["name"], **{m: r[m] for m in plotted}} for r in rows],
        list(plotted),
        out_dir / "ablation.png",
    )
    summarize = run_summary if source == "eval" else online_summary
    evaluated = [d for d in run_dirs if summarize(d) is not None]
    corr = correlation_report(evaluated, source)
    paths["correlation.json"] = out_dir / "correlation.json"
    paths["correlation.json"].write_text(json.dumps(corr, indent=2))
    corr_md = correlation_markdown(corr)
    paths["correlation.md"] = out_dir / "correlation.md"
    paths["correlation.md"].write_text(f"# Loss vs accuracy\n\n{corr_md}")
    report = [
        f"# {title}",
        "",
        preamble,
        "## Results (mean ± sample std over seeds)"
        + ("" if source == "eval" else ", from each run's last online probe"),
        "",
        table,
        "![ablation](ablation.png)",
        "",
        "## Loss vs accuracy",
        "",
        corr_md,
        "## Runs",
        "",
        *(_run_link(Path(d), out_dir) for d in evaluated),
        "",
    ]
    paths["report.md"] = out_dir / "report.md"
    paths["report.md"].write_text("\n".join(report))
    return paths


def _run_link(run_dir: Path, out_dir: Path) -> str:
    report = run_dir / "report.md"
    if not report.is_file():
        return f"- `{run_dir.name}`"
    return f"- [`{run_dir.name}`]({os.path.relpath(report, out_dir)})"
