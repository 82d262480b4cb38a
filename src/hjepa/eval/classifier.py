"""A fitted linear probe that can score many test sets (clean, corrupted, ...) from one fit.

:func:`hjepa.eval.linear.linear_probe` fits and scores in one call; robustness needs the same
classifier on 40 corrupted copies of the test set, and refitting it 40 times would cost 40 times
as much. :func:`fit_linear_classifier` runs exactly the protocol of ``linear_probe`` (weight decay
chosen on a seeded held-out split along a regularisation path, then a refit on all training
data) and returns the classifier, so ``fit_linear_classifier(...).accuracy(test)`` equals
``linear_probe(...)["accuracy"]`` (a test checks it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from hjepa.eval.linear import (
    DEFAULT_MAX_ITER,
    DEFAULT_WEIGHT_DECAYS,
    _accuracy,
    _check_split,
    _fit,
    _Standardizer,
)


@dataclass
class LinearClassifier:
    """``argmax_c (W (x - mu) / sigma + b)_c`` with the statistics of the training features."""

    scaler: _Standardizer
    weight: Tensor  # [C, D]
    bias: Tensor  # [C]
    weight_decay: float
    val_accuracy: float

    def predict(self, feats: Tensor) -> Tensor:
        return (self.scaler(feats) @ self.weight.T + self.bias).argmax(dim=1)

    def accuracy(self, feats: Tensor, labels: Tensor) -> float:
        if feats.ndim != 2 or feats.shape[1] != self.weight.shape[1]:
            raise ValueError(
                f"linear classifier: features must be [N, {self.weight.shape[1]}], got "
                f"{tuple(feats.shape)}; extract them with the encoder it was fit on"
            )
        return _accuracy(self.scaler(feats), labels, self.weight, self.bias)


def fit_linear_classifier(
    train_feats: Tensor,
    train_labels: Tensor,
    num_classes: int,
    *,
    seed: int = 0,
    weight_decays: Sequence[float] = DEFAULT_WEIGHT_DECAYS,
    max_iter: int = DEFAULT_MAX_ITER,
    val_fraction: float = 0.1,
) -> LinearClassifier:
    """Fit the linear probe of :mod:`hjepa.eval.linear` on ``[N, D]`` features; return it."""
    _check_split(train_feats, train_labels, num_classes, "train")
    n = train_feats.shape[0]
    n_val = max(1, round(val_fraction * n))
    if n - n_val < 1:
        raise ValueError(
            f"linear classifier: {n} training samples leave none to fit after holding out "
            f"{n_val} for validation; provide more data"
        )
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=generator).to(train_feats.device)
    val_idx, fit_idx = order[:n_val], order[n_val:]
    fit_scaler = _Standardizer(train_feats[fit_idx])
    fit_x, val_x = fit_scaler(train_feats[fit_idx]), fit_scaler(train_feats[val_idx])
    best_wd, best_val, best_params, params = 0.0, -1.0, None, None
    for wd in sorted(weight_decays, reverse=True):
        params = _fit(fit_x, train_labels[fit_idx], num_classes, wd, max_iter, init=params)
        val_acc = _accuracy(val_x, train_labels[val_idx], *params)
        if val_acc > best_val:  # descending grid: ties keep the larger lambda
            best_wd, best_val, best_params = float(wd), val_acc, params
    scaler = _Standardizer(train_feats)
    weight, bias = _fit(
        scaler(train_feats), train_labels, num_classes, best_wd, max_iter, init=best_params
    )
    return LinearClassifier(scaler, weight, bias, best_wd, best_val)
