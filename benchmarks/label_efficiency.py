"""Label efficiency: how much of what labels add over the random init self-supervision recovers.

    python benchmarks/label_efficiency.py --run RUN_DIR --supervised FILE.jsonl [--seed S]

Three encoders of the same network, read out the same way (the mean of the encoder's final
tokens, the input of ``supervised_ceiling.py``'s head), probed on all 60 000 / 10 000 images
with kNN (``eval.knn_k``) and ``hjepa eval``'s linear probe:

* the random initialisation (``build_encoder`` under ``train.seed``, as the harness starts);
* the self-supervised run's target encoder (``RUN_DIR``, read by :func:`hjepa.load_encoder`,
  with its own input normalisation);
* the same network trained with labels: the last line of ``--supervised`` (written by
  ``supervised_ceiling.py --out``) whose overrides are the run's seed alone.

Prints one JSON line: the three accuracies per probe and ``recovered = (ssl - init) / (labels -
init)``, the fraction of the labels' gain the self-supervised run reaches (issue 24's goal:
at least 0.8 on kNN and linear).
"""

from __future__ import annotations

import argparse
import json

import torch

import hjepa
from hjepa.config import load_config
from hjepa.data.augment import to_float
from hjepa.data.datasets import dataset_from_config
from hjepa.eval.knn import knn_accuracy
from hjepa.eval.linear import fit_linear_classifier
from hjepa.models.hjepa import build_encoder

BATCH = 512


@torch.no_grad()
def mean_tokens(tokens_of, images: torch.Tensor) -> torch.Tensor:
    """Mean of the final tokens, ``[N, D]``, for uint8 ``images`` in batches."""
    return torch.cat(
        [tokens_of(images[i : i + BATCH]).mean(dim=1) for i in range(0, len(images), BATCH)]
    )


def probes(train: torch.Tensor, test: torch.Tensor, ys, test_y, classes: int, cfg) -> dict:
    knn = knn_accuracy(
        train, ys, test, test_y, classes, k=cfg.eval.knn_k, temperature=cfg.eval.knn_temperature
    )
    linear = fit_linear_classifier(train, ys, classes, seed=cfg.train.seed).accuracy(test, test_y)
    return {"knn": round(knn, 4), "linear": round(linear, 4)}


def supervised_row(path: str, seed: int) -> dict:
    """The last ``supervised_ceiling.py`` line of the textbook-recipe ViT at ``seed``."""
    wanted = [] if seed == 0 else [f"train.seed={seed}"]
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    rows = [
        r
        for r in rows
        if r["network"] == "vit"
        and r.get("recipe") == "textbook"
        and [o for o in r["overrides"] if not o.startswith("train.threads")] == wanted
    ]
    if not rows:
        raise SystemExit(f"{path}: no textbook ViT line with overrides {wanted}")
    return {"knn": rows[-1]["knn_test"], "linear": rows[-1]["linear_test"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a self-supervised run directory")
    parser.add_argument("--supervised", required=True, help="supervised_ceiling.py --out file")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    cfg = load_config("quickstart", [f"train.seed={args.seed}"])
    train_set, test_set = dataset_from_config(cfg, "train"), dataset_from_config(cfg, "test")
    xs, ys, test_x, test_y = train_set.images, train_set.labels, test_set.images, test_set.labels
    classes = train_set.num_classes

    torch.manual_seed(args.seed)
    init = build_encoder(cfg.model, cfg.data.image_size, train_set.channels).eval()
    half = [0.5] * train_set.channels
    init_tokens = lambda x: init(to_float(x, half, half))
    ssl = hjepa.load_encoder(args.run)
    result = {"seed": args.seed, "run": args.run}
    for name, tokens_of in (("random_init", init_tokens), ("self_supervised", ssl.tokens)):
        feats = mean_tokens(tokens_of, xs), mean_tokens(tokens_of, test_x)
        result[name] = probes(*feats, ys, test_y, classes, cfg)
    result["labels"] = supervised_row(args.supervised, args.seed)
    base = result["random_init"]
    result["recovered"] = {
        p: round((result["self_supervised"][p] - base[p]) / (result["labels"][p] - base[p]), 3)
        for p in ("knn", "linear")
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
