"""Does the training loss say anything about representation quality? Spearman correlations.

A JEPA loss can fall while the encoder collapses, so the review asked how well the loss tracks
accuracy. We measure it with Spearman's rank correlation

.. math::
    \\rho(x, y) = \\frac{\\operatorname{cov}(R(x), R(y))}{\\sigma_{R(x)} \\sigma_{R(y)}},

where :math:`R` gives ranks 1..n, tied values sharing the mean of the ranks they span (the
Pearson correlation of the ranks, as ``scipy.stats.spearmanr``); it is undefined (NaN) when
either side is constant or has fewer than two points.

* **Within a run**, at each online-probe step :math:`p_i` of ``metrics.jsonl``: the mean over
  the ``train`` records with :math:`p_{i-1} < step \\le p_i` of the prediction loss
  :math:`\\sum_l w_l \\cdot loss_l` (and, when logged, of the ``sigreg`` term separately),
  against the probe's kNN accuracy (``knn_concat``, else ``knn_level0``).
* **Across runs**: each run's final window (the one ending at its last probe) against its final
  ``eval.json`` accuracy (kNN and linear of the best feature set).

A good loss would give a strongly *negative* rho (lower loss, higher accuracy).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from hjepa.config import from_dict, level_weights
from hjepa.train.logging import read_metrics

TERMS = ("prediction", "sigreg")


def average_ranks(values: Sequence[float]) -> list[float]:
    """Ranks 1..n of ``values``; tied values get the mean of the ranks they occupy."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        stop = start
        while stop + 1 < len(order) and values[order[stop + 1]] == values[order[start]]:
            stop += 1
        shared = (start + stop) / 2 + 1  # mean of ranks start+1 .. stop+1
        for j in range(start, stop + 1):
            ranks[order[j]] = shared
        start = stop + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rho of paired samples (NaN when undefined; see the module docstring)."""
    if len(x) != len(y):
        raise ValueError(f"spearman: x has {len(x)} values but y has {len(y)}")
    n = len(x)
    if n < 2:
        return math.nan
    rx, ry = average_ranks(x), average_ranks(y)
    mean = (n + 1) / 2  # the mean of any average-rank vector
    cov = sum((a - mean) * (b - mean) for a, b in zip(rx, ry))
    var_x = sum((a - mean) ** 2 for a in rx)
    var_y = sum((b - mean) ** 2 for b in ry)
    if var_x == 0 or var_y == 0:
        return math.nan
    return cov / math.sqrt(var_x * var_y)


def _accuracy_key(record: dict[str, Any]) -> str | None:
    return next((k for k in ("knn_concat", "knn_level0") if k in record), None)


def prediction_loss(record: dict[str, Any], weights: Sequence[float]) -> float | None:
    """``sum_l w_l * loss_level{l}`` of a train record (its ``loss`` when levels are absent)."""
    terms = [record.get(f"loss_level{lv}") for lv in range(len(weights))]
    if all(isinstance(t, int | float) for t in terms):
        return sum(w * t for w, t in zip(weights, terms))
    return record.get("loss")


def probe_windows(records: list[dict[str, Any]], weights: Sequence[float]) -> list[dict]:
    """Per probe step: the window-mean loss terms and the probe's kNN accuracy.

    Probes whose window holds no train record (``log_every`` > ``knn_every``) are left out.
    """
    train = sorted((r for r in records if r.get("kind") == "train"), key=lambda r: r["step"])
    probes = sorted((r for r in records if r.get("kind") == "probe"), key=lambda r: r["step"])
    points, previous = [], -math.inf
    for probe in probes:
        key = _accuracy_key(probe)
        window = [r for r in train if previous < r["step"] <= probe["step"]]
        previous = probe["step"]
        if key is None or not window:
            continue
        point: dict[str, Any] = {"step": probe["step"], "knn": float(probe[key])}
        losses = [prediction_loss(r, weights) for r in window]
        point["prediction"] = sum(losses) / len(losses)
        sig = [r["sigreg"] for r in window if isinstance(r.get("sigreg"), int | float)]
        if sig:
            point["sigreg"] = sum(sig) / len(sig)
        points.append(point)
    return points


def _run_weights(run_dir: Path) -> list[float]:
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a run directory?")
    return level_weights(from_dict(yaml.safe_load(path.read_text())))


def _rho_or_none(x: Sequence[float], y: Sequence[float]) -> float | None:
    rho = spearman(x, y)
    return None if math.isnan(rho) else rho


def within_run(run_dir: str | Path) -> dict[str, Any]:
    """Spearman rho of each loss term vs online kNN over a run's probe steps."""
    run_dir = Path(run_dir)
    points = probe_windows(read_metrics(run_dir), _run_weights(run_dir))
    out: dict[str, Any] = {"points": len(points)}
    for term in TERMS:
        pairs = [(p[term], p["knn"]) for p in points if term in p]
        if pairs:
            out[term] = _rho_or_none([a for a, _ in pairs], [b for _, b in pairs])
    return out


def _final_accuracies(run_dir: Path, source: str = "eval") -> dict[str, float] | None:
    if source == "online":  # the last online probe's kNN (no linear probe online)
        probes = [r for r in read_metrics(run_dir) if r.get("kind") == "probe"]
        key = _accuracy_key(probes[-1]) if probes else None
        return {"knn": float(probes[-1][key])} if key else None
    path = run_dir / "eval.json"
    if not path.is_file():
        return None
    trained = json.loads(path.read_text()).get("trained", {})
    best = trained.get("concat") or trained.get("level0")
    return (
        None if best is None else {k: float(v) for k, v in best.items() if k in ("knn", "linear")}
    )


def across_runs(run_dirs: Sequence[str | Path], source: str = "eval") -> dict[str, Any]:
    """Spearman rho of final-window loss terms vs final accuracy over runs: that of
    ``eval.json`` (``source="eval"``) or of the last online probe (``"online"``)."""
    rows = []
    for run_dir in map(Path, run_dirs):
        accs = _final_accuracies(run_dir, source)
        points = probe_windows(read_metrics(run_dir), _run_weights(run_dir))
        if accs and points:
            rows.append({"run": run_dir.name, **accs, **{t: points[-1].get(t) for t in TERMS}})
    out: dict[str, Any] = {"runs": len(rows), "rows": rows}
    for term in TERMS:
        for metric in ("knn", "linear"):
            pairs = [(r[term], r[metric]) for r in rows if r.get(term) is not None and metric in r]
            if pairs:
                out[f"{term}_vs_{metric}"] = _rho_or_none(
                    [a for a, _ in pairs], [b for _, b in pairs]
                )
                out[f"{term}_n"] = len(pairs)
    return out


def correlation_report(run_dirs: Sequence[str | Path], source: str = "eval") -> dict[str, Any]:
    """``{"within": {run name: within_run}, "across": across_runs}`` for a set of runs."""
    return {
        "within": {Path(r).name: within_run(r) for r in run_dirs},
        "across": across_runs(run_dirs, source),
        "source": source,
    }


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.3f}"


def correlation_markdown(report: dict[str, Any]) -> str:
    """Markdown tables of a :func:`correlation_report` (n/a: undefined, e.g. constant kNN)."""
    lines = [
        "Spearman rho between training loss and accuracy (negative = lower loss, better "
        "accuracy; n/a = undefined, e.g. constant accuracy or fewer than 2 points).",
        "",
        "Within each run (loss averaged over the train records since the previous online "
        "probe, vs the probe's kNN accuracy):",
        "",
        "| run | probe points | prediction loss | sigreg |",
        "|---|---|---|---|",
    ]
    for name, w in report["within"].items():
        lines.append(
            f"| {name} | {w['points']} | {_fmt(w.get('prediction'))} | "
            f"{_fmt(w.get('sigreg')) if 'sigreg' in w else '-'} |"
        )
    a = report["across"]
    lines += [
        "",
        f"Across runs ({a['runs']} runs; final loss window vs final "
        f"{'online-probe' if report.get('source') == 'online' else 'eval'} accuracy):",
        "",
        "| loss term | runs | vs kNN | vs linear |",
        "|---|---|---|---|",
    ]
    for term in TERMS:
        if f"{term}_n" in a:
            knn, linear = _fmt(a.get(f"{term}_vs_knn")), _fmt(a.get(f"{term}_vs_linear"))
            lines.append(f"| {term} | {a[f'{term}_n']} | {knn} | {linear} |")
    return "\n".join(lines) + "\n"
