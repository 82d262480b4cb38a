"""Supervised ceiling: the preset's encoder trained *with labels* for the preset's steps.

    python benchmarks/supervised_ceiling.py --config quickstart [--network cnn]
        [--recipe textbook|run] [--out FILE.jsonl] [key=value ...]

Same encoder (``model.*``), batch and number of steps as the self-supervised run, but the loss
is cross-entropy of a linear head on the mean of the encoder's tokens. Prints one JSON line:
the head's test accuracy, and the kNN (``eval.knn_k``) and linear probe (``hjepa eval``'s own
L-BFGS probe) of the mean-pooled features, all 60 000 / 10 000 images.

``--recipe textbook`` (the default) trains the way a supervised network is trained: AdamW at
lr 1e-3 warmed up from 0 over 30 steps then cosine, constant weight decay 0.05, no crop, no
flip (:data:`TEXTBOOK`); the ``key=value`` overrides come after it, so a sweep changes one of
them. Under it the textbook CNN reaches head 0.871 / kNN 0.884 in 468 steps of batch 128, the
number a correct harness must reproduce before it is read as a ceiling. ``--recipe run`` keeps
the preset's own self-supervised optimisation and crops instead (weight decay ramped 0.04 ->
0.4, crops of 30-100 %), which costs that CNN 7.5 points (docs/recipe.md).
``--network cnn`` trains a textbook two-convolution
network instead (:class:`ReferenceCNN`) under the same data, schedule and steps; ``--network
cnn_mean`` the same convolutions with a per-cell hidden layer, read out as the mean of its cells
(as ``hjepa eval`` reads an encoder). Pixels are scaled to [-1, 1] (mean = std = 0.5).
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
import torch.nn.functional as F

from hjepa.config import Config, load_config
from hjepa.data.augment import BatchAugment, to_float
from hjepa.data.datasets import dataset_from_config
from hjepa.eval.knn import knn_accuracy
from hjepa.eval.linear import fit_linear_classifier
from hjepa.models.hjepa import build_encoder
from hjepa.train.optim import build_optimizer, set_schedule
from hjepa.train.schedules import cosine, warmup_cosine
from hjepa.train.sizes import total_steps, warmup_steps

NETWORKS = ("vit", "cnn", "cnn_mean")
RECIPES = ("textbook", "run")
# The supervised textbook recipe, as config overrides (see the module docstring).
TEXTBOOK = [
    "optim.lr=1e-3",
    "optim.start_lr=0",
    "optim.warmup_steps=30",
    "optim.weight_decay=0.05",
    "optim.final_weight_decay=0.05",
    "data.crop_scale=[1.0,1.0]",
    "data.crop_ratio=[1.0,1.0]",
    "data.hflip=0",
]
READOUTS = ("flatten", "mean")  # of ReferenceCNN: in place, or the mean of its cells


@torch.no_grad()
def pooled(encoder: torch.nn.Module, images: torch.Tensor, mean, std, batch: int = 512):
    """Mean of the encoder's tokens for uint8 ``images``, in eval mode, in batches."""
    encoder.eval()
    out = [
        encoder(to_float(images[i : i + batch], mean, std)).mean(dim=1)
        for i in range(0, len(images), batch)
    ]
    encoder.train()
    return torch.cat(out)


def _in_memory(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images ``[N, C, H, W]`` and labels ``[N]`` of any dataset (image folders are read)."""
    if hasattr(dataset, "images"):
        return dataset.images, dataset.labels
    items = [dataset[i] for i in range(len(dataset))]
    return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])


class ReferenceCNN(torch.nn.Module):
    """The textbook two-convolution network (3x3 conv 32 + pool, 3x3 conv 64 + pool, a
    128-wide hidden layer): how fast a network with a convolution's priors learns the same
    labels. ``readout="flatten"``: the hidden layer reads the whole 64-channel map in place and
    is returned as one "token" ``[B, 1, 128]``. ``readout="mean"``: the hidden layer is a 1x1
    convolution, applied at every cell, and the cells are returned as tokens ``[B, N, 128]``,
    which the harness averages like the ViT's: the same network read out the way ``hjepa eval``
    reads an encoder (mean of its tokens, no layout)."""

    width = 128

    def __init__(self, in_channels: int, image_size: int, readout: str = "flatten"):
        super().__init__()
        if readout not in READOUTS:
            raise ValueError(f"readout must be one of {READOUTS}, got {readout!r}")
        side = image_size // 4
        layers = [
            torch.nn.Conv2d(in_channels, 32, 3, padding=1),
            torch.nn.GELU(),
            torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(32, 64, 3, padding=1),
            torch.nn.GELU(),
            torch.nn.MaxPool2d(2),
        ]
        if readout == "flatten":
            layers += [torch.nn.Flatten(), torch.nn.Linear(64 * side * side, self.width)]
        else:
            layers += [torch.nn.Conv2d(64, self.width, 1)]
        self.net = torch.nn.Sequential(*layers, torch.nn.GELU())
        self.readout = readout

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.net(images)
        return out.unsqueeze(1) if self.readout == "flatten" else out.flatten(2).transpose(1, 2)


def supervised_ceiling(cfg: Config, network: str = "vit") -> dict:
    """Train ``cfg``'s encoder (``network="vit"``) or :class:`ReferenceCNN` (``"cnn"``) with
    labels for ``cfg``'s steps; its test accuracies."""
    if network not in NETWORKS:
        raise ValueError(f"network must be one of {NETWORKS}, got {network!r}")
    t, o, d = cfg.train, cfg.optim, cfg.data
    torch.manual_seed(t.seed)
    if t.threads:
        torch.set_num_threads(t.threads)
    train_set, test_set = dataset_from_config(cfg, "train"), dataset_from_config(cfg, "test")
    (xs, ys), (test_x, test_y) = _in_memory(train_set), _in_memory(test_set)
    mean, std = [0.5] * train_set.channels, [0.5] * train_set.channels
    if network in ("cnn", "cnn_mean"):
        readout = "mean" if network == "cnn_mean" else "flatten"
        encoder = ReferenceCNN(train_set.channels, d.image_size, readout)
        width = ReferenceCNN.width
    else:
        encoder = build_encoder(cfg.model, d.image_size, train_set.channels)
        width = cfg.model.embed_dim
    head = torch.nn.Linear(width, train_set.num_classes)
    optimizer = build_optimizer([encoder, head], o)
    augment = BatchAugment(d.image_size, d.crop_scale, d.crop_ratio, d.hflip, mean, std)
    steps_per_epoch = len(xs) // t.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"train.batch_size={t.batch_size} exceeds the {len(xs)} training images")
    total = total_steps(cfg, steps_per_epoch)  # the trainer's own step counts
    warmup = warmup_steps(cfg, total)
    gen = torch.Generator().manual_seed(t.seed)
    started = time.perf_counter()
    step = 0
    while step < total:
        order = torch.randperm(len(xs), generator=gen)
        for i in range(min(steps_per_epoch, total - step)):
            lr = warmup_cosine(step, total, warmup, o.start_lr, o.lr, o.final_lr)
            set_schedule(optimizer, lr, cosine(step, total, o.weight_decay, o.final_weight_decay))
            rows = order[i * t.batch_size : (i + 1) * t.batch_size]
            logits = head(encoder(augment(xs[rows], gen)).mean(dim=1))
            loss = F.cross_entropy(logits, ys[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(encoder.parameters(), t.grad_clip or math.inf)
            optimizer.step()
            step += 1
    train_s = time.perf_counter() - started
    f_train = pooled(encoder, xs, mean, std)
    f_test = pooled(encoder, test_x, mean, std)
    with torch.no_grad():
        head_acc = (head(f_test).argmax(1) == test_y).float().mean().item()
    knn = knn_accuracy(
        f_train,
        ys,
        f_test,
        test_y,
        train_set.num_classes,
        k=cfg.eval.knn_k,
        temperature=cfg.eval.knn_temperature,
    )
    linear = fit_linear_classifier(f_train, ys, train_set.num_classes, seed=t.seed)
    return {
        "network": network,
        "steps": total,
        "train_s": round(train_s, 1),
        "head_test_acc": round(head_acc, 4),
        "knn_test": round(knn, 4),
        "linear_test": round(linear.accuracy(f_test, test_y), 4),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="quickstart", help="preset name or YAML path")
    parser.add_argument(
        "--network",
        choices=NETWORKS,
        default="vit",
        help="the preset's ViT or ReferenceCNN (flatten or mean readout)",
    )
    parser.add_argument(
        "--recipe",
        choices=RECIPES,
        default="textbook",
        help="textbook: supervised AdamW, constant weight decay, no crops (TEXTBOOK); "
        "run: the preset's own optimisation and crops",
    )
    parser.add_argument("--out", help="also append the JSON line to this file")
    parser.add_argument("overrides", nargs="*", help="key=value overrides (after the recipe)")
    args = parser.parse_args(argv)
    overrides = (TEXTBOOK if args.recipe == "textbook" else []) + args.overrides
    result = supervised_ceiling(load_config(args.config, overrides), args.network)
    line = json.dumps(
        {**result, "config": args.config, "recipe": args.recipe, "overrides": args.overrides}
    )
    print(line)
    if args.out:
        with open(args.out, "a") as f:
            f.write(line + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
