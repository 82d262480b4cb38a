"""ImageNet-C-style robustness of a frozen encoder's linear probe, relative to raw pixels.

A fixed subset of the test set (``eval.robustness_limit`` images, chosen by a fixed seed) is
corrupted by every corruption of :mod:`hjepa.eval.corruptions` at severities 1..5, at its native
resolution and re-quantised to uint8 (as ImageNet-C stores its images). Each feature set's
linear classifier is fit once on *clean* training features and scored on each corrupted copy,
giving the accuracy table :math:`acc_{s,c}`; the same is done for raw pixels. Reported are the
mean corruption accuracy, the corruption errors
:math:`CE_c = \\sum_s (1 - acc^{enc}_{s,c}) / \\sum_s (1 - acc^{pix}_{s,c})` and their mean,
mCE (below 1: the encoder's probe degrades less than the pixel probe).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.utils.data import Dataset

from hjepa.data.tensors import ImageTensors
from hjepa.eval.corruptions import (
    CORRUPTIONS,
    SEVERITIES,
    corrupt,
    corruption_error,
    mean_corruption_accuracy,
)
from hjepa.eval.features import iter_batches
from hjepa.eval.linear import LinearClassifier

#: Images corrupted per call (bounds memory for large images; part of the seed schedule).
CHUNK = 256
SUBSET_SEED = 4


def materialize(dataset: Dataset, limit: int, seed: int = SUBSET_SEED) -> ImageTensors:
    """A fixed random subset of ``limit`` images (0: all) as in-memory uint8 tensors."""
    n = len(dataset)
    if 0 < limit < n:
        index = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:limit]
        index = index.sort().values
    else:
        index = torch.arange(n)
    if isinstance(dataset, ImageTensors):
        return ImageTensors(dataset.images[index], dataset.labels[index], dataset.num_classes)
    subset = torch.utils.data.Subset(dataset, index.tolist())
    images, labels = zip(*iter_batches(subset, CHUNK), strict=True)
    return ImageTensors(
        torch.cat(images), torch.cat(labels), int(getattr(dataset, "num_classes", 0)) or None
    )


def corruption_seed(name: str, severity: int, chunk: int) -> int:
    """Distinct seed per (corruption, severity, chunk): every table entry has its own noise."""
    return (CORRUPTIONS.index(name) * 10 + severity) * 100_003 + chunk


def corrupt_dataset(clean: ImageTensors, name: str, severity: int) -> ImageTensors:
    """``clean`` corrupted by ``name`` at ``severity``, re-quantised to uint8 (deterministic)."""
    out = torch.empty_like(clean.images)
    for i, start in enumerate(range(0, len(clean), CHUNK)):
        x = clean.images[start : start + CHUNK].float() / 255.0
        y = corrupt(x, name, severity, seed=corruption_seed(name, severity, i))
        out[start : start + CHUNK] = (y * 255.0).round().clamp(0, 255).to(torch.uint8)
    return ImageTensors(out, clean.labels, clean.num_classes)


def accuracy_table(
    featurizers: dict[str, Callable[[Dataset], Tensor]],
    classifiers: dict[str, LinearClassifier],
    clean: ImageTensors,
    corruptions: tuple[str, ...] = CORRUPTIONS,
) -> tuple[dict[str, float], dict[str, dict[str, dict[int, float]]]]:
    """Clean accuracy and ``{model: {corruption: {severity: accuracy}}}`` per model.

    Each corrupted copy is made once and scored by every model, so all models see the very
    same images.
    """
    clean_acc = {
        m: classifiers[m].accuracy(featurizers[m](clean), clean.labels) for m in featurizers
    }
    table: dict[str, dict[str, dict[int, float]]] = {m: {} for m in featurizers}
    for name in corruptions:
        for severity in SEVERITIES:
            corrupted = corrupt_dataset(clean, name, severity)
            for m, featurize in featurizers.items():
                acc = classifiers[m].accuracy(featurize(corrupted), corrupted.labels)
                table[m].setdefault(name, {})[severity] = acc
    return clean_acc, table


def summarize(
    clean_acc: dict[str, float],
    table: dict[str, dict[str, dict[int, float]]],
    model: str,
    baseline: str,
) -> dict:
    """JSON-ready summary: tables (severity keys as strings), mean accuracies, CE and mCE."""
    out: dict = {
        "clean": clean_acc,
        "accuracy": {
            m: {c: {str(s): a for s, a in by_s.items()} for c, by_s in t.items()}
            for m, t in table.items()
        },
        "mean_corruption_accuracy": {m: mean_corruption_accuracy(t) for m, t in table.items()},
    }
    try:
        errors = corruption_error(table[model], table[baseline])
        out["ce"], out["mce"] = errors["ce"], errors["mce"]
    except ValueError as e:  # the baseline never errs on some corruption: CE is undefined
        out["ce"], out["mce"], out["mce_undefined"] = {}, None, str(e)
    return out
