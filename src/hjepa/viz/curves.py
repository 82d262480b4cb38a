"""Training curves from ``metrics.jsonl``: loss terms, schedules and the online probe.

Six panels: the loss terms (total, per level, regularisers; log scale), the learning rate, the
EMA momentum, online kNN accuracy per feature set, effective rank (RankMe) per level and the
normalised embedding std per level. ``train`` records feed the first three, ``probe`` records
the last three; a panel without data says so instead of staying blank.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hjepa.viz.common import new_figure, save

REGULARIZER_KEYS = ("sigreg", "vicreg", "contrastive")


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pairs = [(r["step"], r[key]) for r in records if isinstance(r.get(key), int | float)]
    return [p[0] for p in pairs], [float(p[1]) for p in pairs]


def _keys(records: list[dict[str, Any]], prefix: str) -> list[str]:
    seen: dict[str, None] = {}
    for r in records:
        for k in r:
            if k.startswith(prefix) and not isinstance(r[k], bool):
                seen[k] = None
    return list(seen)


def plot_curves(records: list[dict[str, Any]], path: str | Path) -> Path:
    """Write the six-panel figure (1200 x 700 pixels) of a run's metrics records."""
    train = [r for r in records if r.get("kind") == "train"]
    probe = [r for r in records if r.get("kind") == "probe"]
    loss_keys = [
        "loss",
        *(k for k in _keys(train, "loss_")),
        *(k for k in REGULARIZER_KEYS if any(k in r for r in train)),
    ]
    panels = [
        ("loss terms", train, loss_keys, True),
        ("learning rate", train, ["lr"], False),
        ("EMA momentum", train, ["ema_momentum"], False),
        ("online kNN accuracy", probe, _keys(probe, "knn_"), False),
        ("effective rank (RankMe)", probe, _keys(probe, "rank_"), False),
        ("normalised embedding std", probe, _keys(probe, "std_"), False),
    ]
    fig = new_figure(12.0, 7.0)
    axes = fig.subplots(2, 3).flatten()
    for ax, (title, recs, keys, log) in zip(axes, panels):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        drawn = False
        for key in keys:
            steps, values = _series(recs, key)
            if steps:
                ax.plot(steps, values, label=key, marker="." if len(steps) < 30 else None)
                drawn = True
        if not drawn:
            ax.text(0.5, 0.5, "no records", ha="center", va="center", transform=ax.transAxes)
            continue
        if log and all(v > 0 for k in keys for v in _series(recs, k)[1]):
            ax.set_yscale("log")
        if len(keys) > 1:
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    return save(fig, path)
