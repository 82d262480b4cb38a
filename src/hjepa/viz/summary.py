"""Report plots: accuracy under corruption, and the ablation's bars with error bars."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps

from hjepa.viz.common import new_figure, save


def plot_robustness(robustness: dict[str, Any], path: str | Path) -> Path:
    """Accuracy vs severity per corruption: encoder solid, pixels dashed, clean at severity 0."""
    acc = robustness["accuracy"]
    names = list(acc["encoder"])
    colours = colormaps["tab10"].colors
    fig = new_figure(10.0, 4.5)
    ax_curves, ax_bars = fig.subplots(1, 2, width_ratios=[3, 2])
    for i, name in enumerate(names):
        for model, style in (("encoder", "-"), ("pixels", "--")):
            severities = sorted(acc[model][name], key=int)
            xs = [0, *map(int, severities)]
            ys = [robustness["clean"][model], *(acc[model][name][s] for s in severities)]
            label = name if model == "encoder" else None
            ax_curves.plot(xs, ys, style, color=colours[i % 10], label=label, marker=".")
    ax_curves.set_xlabel("severity (0 = clean)")
    ax_curves.set_ylabel("linear-probe accuracy")
    ax_curves.set_title("encoder (solid) vs pixels (dashed)", fontsize=10)
    ax_curves.legend(fontsize=7, ncol=2)
    ax_curves.grid(alpha=0.3)
    ce = robustness.get("ce") or {}
    if ce:
        ax_bars.barh(list(ce), list(ce.values()), color=[colours[i % 10] for i in range(len(ce))])
        ax_bars.axvline(1.0, color="black", linewidth=0.8)
        mce = robustness.get("mce")
        ax_bars.set_title(f"CE vs pixels (mCE {mce:.3f})", fontsize=10)
        ax_bars.invert_yaxis()
    else:
        ax_bars.text(0.5, 0.5, "CE undefined", ha="center", va="center")
    return save(fig, path)


def plot_ablation(rows: list[dict[str, Any]], metrics: list[str], path: str | Path) -> Path:
    """Grouped bars: one group per variant, one bar per metric, error bars = std over seeds.

    ``rows[i][metric]`` is a list of per-seed values (missing or empty: no bar).
    """
    width = 0.8 / max(len(metrics), 1)
    colours = colormaps["tab10"].colors
    fig = new_figure(max(6.0, 1.2 * len(rows) + 2.0), 4.5)
    ax = fig.subplots()
    x = np.arange(len(rows))
    for j, metric in enumerate(metrics):
        means, stds = [], []
        for row in rows:
            values = row.get(metric) or []
            means.append(float(np.mean(values)) if values else np.nan)
            stds.append(float(np.std(values, ddof=1)) if len(values) > 1 else 0.0)
        ax.bar(
            x + (j - (len(metrics) - 1) / 2) * width,
            means,
            width,
            yerr=stds,
            capsize=3,
            label=metric,
            color=colours[j % 10],
        )
    ax.set_xticks(x, [row["name"] for row in rows], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("accuracy (mean ± std over seeds)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return save(fig, path)
