"""Layout probe: kNN of each level's cell grid kept in place, against the grid averaged.

    python benchmarks/layout_probe.py RUN_DIR

``hjepa eval`` probes each level as the mean of its cells, which keeps *what* the image holds
and drops *where*. On centred images (Fashion-MNIST) the layout carries much of the class, which
is why raw pixels (784 values in place) are a strong kNN baseline. This probe measures, for the
run's trained target encoder and for the random initialisation it started from, the kNN
accuracy (``eval.knn_k``, all train / test images) of every level both ways: ``level{l}_mean``
(what ``hjepa eval`` reads) and ``level{l}_grid`` (the level's layer-normalised cells
concatenated in grid order: 49, 16 and 4 cells of ``D`` values for a 7x7 grid). Prints one JSON
line.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

import hjepa
from hjepa.config import load_config
from hjepa.data.datasets import dataset_from_config
from hjepa.eval.knn import knn_accuracy
from hjepa.models.hierarchy import pool_tokens
from hjepa.models.hjepa import build_encoder


@torch.no_grad()
def _tokens(encoder: hjepa.Encoder, images: torch.Tensor, batch: int = 1000) -> torch.Tensor:
    return torch.cat([encoder.tokens(images[i : i + batch]) for i in range(0, len(images), batch)])


def layout_features(tokens: torch.Tensor, grid_size: int, levels: int) -> dict[str, torch.Tensor]:
    """Per level: the mean of its layer-normalised cells, and the cells concatenated."""
    out = {}
    for level in range(levels):
        cells = F.layer_norm(pool_tokens(tokens, grid_size, level), tokens.shape[-1:])
        out[f"level{level}_mean"] = cells.mean(dim=1)
        out[f"level{level}_grid"] = cells.flatten(1)
    return out


def layout_probe(run_dir: str | Path) -> dict[str, dict[str, float]]:
    trained = hjepa.load_encoder(run_dir)
    cfg = load_config(str(Path(run_dir) / "config.yaml"))
    initial = hjepa.load_encoder(run_dir)
    torch.manual_seed(cfg.train.seed)  # the initialisation the run started from, as eval builds it
    initial.backbone.load_state_dict(
        build_encoder(cfg.model, cfg.data.image_size, trained.channels).state_dict()
    )
    train_set, test_set = dataset_from_config(cfg, "train"), dataset_from_config(cfg, "test")
    grid = trained.backbone.grid_size
    results = {}
    for name, encoder in (("trained", trained), ("random_init", initial)):
        encoder.eval()
        train = layout_features(_tokens(encoder, train_set.images), grid, cfg.model.levels)
        test = layout_features(_tokens(encoder, test_set.images), grid, cfg.model.levels)
        results[name] = {
            key: round(
                knn_accuracy(
                    train[key],
                    train_set.labels,
                    test[key],
                    test_set.labels,
                    train_set.num_classes,
                    k=cfg.eval.knn_k,
                    temperature=cfg.eval.knn_temperature,
                ),
                4,
            )
            for key in train
        }
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    args = parser.parse_args(argv)
    print(json.dumps({"run_dir": args.run_dir, **layout_probe(args.run_dir)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
