"""``hjepa eval RUN_DIR``: frozen-feature kNN and linear probes of a trained run.

The same protocol runs on three feature sets, side by side: the trained target encoder (per
hierarchy level and all levels concatenated), the same architecture at its random
initialisation (the run's own seed), and raw pixels. What training added is the gap between
the first and the other two.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor

from hjepa.config import Config, from_dict
from hjepa.data.datasets import build_dataset
from hjepa.data.normalize import channel_stats
from hjepa.eval.collapse import collapse_report
from hjepa.eval.features import encoder_features, pixel_features
from hjepa.eval.knn import knn_accuracy
from hjepa.eval.linear import linear_probe
from hjepa.models.hjepa import build_encoder
from hjepa.train import checkpoint as ckpt
from hjepa.train.monitor import fixed_subset
from hjepa.train.trainer import pick_device


def load_run_config(run_dir: str | Path) -> Config:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a run directory of hjepa train?")
    return from_dict(yaml.safe_load(path.read_text()))


def probe(
    train: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor], num_classes: int, cfg: Config
) -> dict[str, float]:
    (xtr, ytr), (xte, yte) = train, test
    out = {
        "knn": knn_accuracy(
            xtr, ytr, xte, yte, num_classes, k=cfg.eval.knn_k, temperature=cfg.eval.knn_temperature
        )
    }
    if cfg.eval.linear:
        out["linear"] = linear_probe(xtr, ytr, xte, yte, num_classes, seed=cfg.train.seed)[
            "accuracy"
        ]
    return out


def evaluate_run(run_dir: str | Path, *, baselines: bool | None = None) -> dict[str, Any]:
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    state = ckpt.load_checkpoint(ckpt.checkpoint_dir(run_dir) / ckpt.LAST)
    device = pick_device(cfg.train.device)
    d = cfg.data
    kw = dict(
        image_size=d.image_size,
        channels=d.channels,
        synthetic_size=d.synthetic_size,
        seed=cfg.train.seed,
        class_subset=d.class_subset or None,
    )
    train_set = build_dataset(d.name, d.root or None, "train", **kw)
    train_set = fixed_subset(train_set, cfg.eval.train_limit, seed=3)
    test_set = build_dataset(d.name, d.root or None, "test", **kw)
    channels = int(getattr(train_set, "channels", d.channels))
    num_classes = int(getattr(train_set, "num_classes", 0))
    mean, std = channel_stats(d.name, channels)

    def features_of(encoder) -> tuple[dict[str, Tensor], Tensor, dict[str, Tensor], Tensor]:
        fkw = dict(
            levels=cfg.model.levels,
            mean=mean,
            std=std,
            image_size=d.image_size,
            batch_size=cfg.eval.batch_size,
            device=device,
            num_workers=cfg.train.num_workers,
        )
        tr, ytr = encoder_features(encoder, train_set, **fkw)
        te, yte = encoder_features(encoder, test_set, **fkw)
        return tr, ytr, te, yte

    torch.manual_seed(cfg.train.seed)  # the very initialisation the trained run started from
    encoder = build_encoder(cfg.model, d.image_size, channels).to(device)
    random_state = {k: v.clone() for k, v in encoder.state_dict().items()}
    encoder.load_state_dict(state["target_encoder"])

    results: dict[str, Any] = {"run_dir": str(run_dir), "step": int(state["step"])}
    start = time.perf_counter()
    tr, ytr, te, yte = features_of(encoder)
    results["trained"] = {
        name: probe((tr[name], ytr), (te[name], yte), num_classes, cfg) for name in tr
    }
    results["collapse"] = {name: collapse_report(te[name]) for name in te if name != "concat"}
    if cfg.eval.baselines if baselines is None else baselines:
        encoder.load_state_dict(random_state)
        tr, ytr, te, yte = features_of(encoder)
        results["random_init"] = {
            name: probe((tr[name], ytr), (te[name], yte), num_classes, cfg) for name in tr
        }
        pix_kw = dict(mean=mean, std=std, image_size=d.image_size)
        results["pixels"] = {
            "pixels": probe(
                pixel_features(train_set, **pix_kw),
                pixel_features(test_set, **pix_kw),
                num_classes,
                cfg,
            )
        }
    results["seconds"] = time.perf_counter() - start
    (run_dir / "eval.json").write_text(json.dumps(results, indent=2))
    return results


def format_table(results: dict[str, Any]) -> str:
    rows = []
    for group in ("trained", "random_init", "pixels"):
        for name, accs in results.get(group, {}).items():
            linear = f"{accs['linear']:.4f}" if "linear" in accs else "-"
            rows.append(f"| {group:<11} | {name:<7} | {accs['knn']:.4f} | {linear:>6} |")
    header = (
        "| encoder     | feature | kNN    | linear |\n|-------------|---------|--------|--------|"
    )
    collapsed = [n for n, r in results.get("collapse", {}).items() if r["collapsed"]]
    note = f"\nWARNING: collapsed features at {', '.join(collapsed)}" if collapsed else ""
    return header + "\n" + "\n".join(rows) + note
