"""Linear probe: multinomial logistic regression on frozen features.

Features are standardised with the statistics of the data the classifier is fit on,
:math:`\\tilde x = (x - \\mu) / \\sigma`, and a linear map :math:`W \\in \\mathbb{R}^{C
\\times D}, b \\in \\mathbb{R}^C` minimises

.. math::
    \\mathcal{L}(W, b) = \\frac{1}{N} \\sum_i -\\log \\operatorname{softmax}(W \\tilde x_i
    + b)_{y_i} + \\frac{\\lambda}{2} \\lVert W \\rVert_F^2,

full-batch with L-BFGS (strong Wolfe line search, preconditioned in the eigenbasis of the
features' covariance, in float64) until it converges (:func:`_fit`): the minimum is unique,
so the accuracy is a property of the features, not of where an iteration cap stopped the
solver or of the machine's rounding. The
weight decay :math:`\\lambda` is chosen on a held-out split of the training set (random,
fixed by ``seed``); the classifier is then refit on all training data with that
:math:`\\lambda` and scored on the test set.

The grid is walked from the largest :math:`\\lambda` down, each fit starting from the
previous solution (a regularisation path), and the final refit starts from the selected
one: weakly regularised problems converge in fewer iterations than from zero.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor

#: Weight-decay grid searched by default (standardised features, mean cross-entropy).
DEFAULT_WEIGHT_DECAYS: tuple[float, ...] = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
#: A fit has converged when no gradient entry (preconditioned variables) exceeds this.
DEFAULT_TOLERANCE = 1e-6
#: The weight-decay path only ranks the decays on the held-out split: it runs in float32 to
#: this looser tolerance (a third of the path's cost at 1e-5; the same decays chosen, measured
#: on the pixels and the quickstart's features); the classifier reported is the float64 refit.
PATH_TOLERANCE = 1e-4
#: The refit first runs in float32 to this tolerance, silently accepting float32's stalls near
#: it, then in float64 to DEFAULT_TOLERANCE: float32 iterations cost about half as much and
#: take the refit most of the way (the pixel probe's refit: 82 s of CPU instead of 124 s).
REFIT_WARMUP_TOLERANCE = 1e-5
#: Safety cap on the L-BFGS iterations of one fit (each about 1.2 loss evaluations); a fit
#: that reaches it has not converged and warns (:class:`ConvergenceWarning`). The quickstart's
#: fits take at most about 1400 (a 1 % low-shot pixel draw at weight decay 1e-4, from zero).
DEFAULT_MAX_ITER = 5000


class ConvergenceWarning(RuntimeWarning):
    """A linear-probe fit stopped at its iteration cap before converging."""


T = TypeVar("T")


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """One intra-op thread for the duration (the probe's numbers are those of one thread)."""
    before = torch.get_num_threads()
    if before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_side_by_side(tasks: Sequence[Callable[[], T]], workers: int | None = None) -> list[T]:
    """``[task() for task in tasks]``, as many at a time as there are intra-op threads (or
    ``workers``), each on one thread; results in ``tasks`` order.

    Each task's numbers are what it gives alone on one thread: fits share no state, and each
    worker (and the caller, while it waits) is set to one intra-op thread before any runs.
    """
    before = torch.get_num_threads()
    workers = min(len(tasks), workers or before)
    if workers <= 1:
        with single_threaded():
            return [task() for task in tasks]
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
            return list(pool.map(lambda task: task(), tasks))
    finally:
        torch.set_num_threads(before)


def _check_split(feats: Tensor, labels: Tensor, num_classes: int, name: str) -> None:
    if feats.ndim != 2:
        raise ValueError(
            f"linear probe: {name}_feats must be 2-D [num_samples, dim]; "
            f"got {tuple(feats.shape)}. Pool token features first."
        )
    if labels.shape != (feats.shape[0],):
        raise ValueError(
            f"linear probe: {name}_labels must have shape [{feats.shape[0]}]; "
            f"got {tuple(labels.shape)}."
        )
    if feats.shape[0] == 0:
        raise ValueError(f"linear probe: {name} split is empty.")
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise ValueError(
            f"linear probe: {name} labels must lie in [0, {num_classes - 1}]; got range "
            f"[{int(labels.min())}, {int(labels.max())}]. Check num_classes."
        )


class _Standardizer:
    """Per-dimension standardisation with the statistics of the data it was built on."""

    def __init__(self, feats: Tensor, dtype: torch.dtype | None = None) -> None:
        x = feats.to(dtype or fit_dtype(feats.device))
        self.mean = x.mean(dim=0)
        # Constant dims would divide by zero; they carry no signal, so any scale works.
        self.std = x.std(dim=0, correction=0).clamp_min(1e-6)

    @classmethod
    def from_stats(cls, mean: Tensor, std: Tensor) -> _Standardizer:
        scaler = cls.__new__(cls)
        scaler.mean, scaler.std = mean, std
        return scaler

    def __call__(self, feats: Tensor) -> Tensor:
        return (feats.to(self.mean.dtype) - self.mean) / self.std


def _fit(
    x: Tensor,
    labels: Tensor,
    num_classes: int,
    weight_decay: float,
    max_iter: int,
    init: tuple[Tensor, Tensor] | None = None,
    basis: tuple[Tensor, Tensor] | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    warn: bool = True,
) -> tuple[Tensor, Tensor]:
    """Minimise the loss of the module doc on standardised ``x`` to convergence; ``(W, b)``.

    L-BFGS runs on preconditioned variables :math:`W'`, :math:`W = P((W' \\odot s)
    V^\\top)` with :math:`P` the centring of the rows over classes, :math:`V, \\Lambda` the
    eigenvectors and eigenvalues of the features' covariance (``basis``, :func:`_eigenbasis`)
    and :math:`s_k = (\\Lambda_k + \\lambda)^{-1/2}`: the loss is the same function of
    :math:`W`, but its curvature along the :math:`W'` axes is within the softmax's factor of 1
    instead of spanning :math:`\\lambda` to :math:`\\Lambda_{max}`. It stops when no gradient
    entry exceeds ``tolerance``; ``max_iter`` is a safety cap, and a fit that ends above the
    tolerance warns (:class:`ConvergenceWarning`). Starts from ``init`` (a previous
    ``(W, b)``) when given, else from zeros; either way it ends at the one minimum.
    """
    y = labels.to(device=x.device, dtype=torch.long)
    eigenvalues, eigenvectors = basis if basis is not None else _eigenbasis(x)
    scale = _preconditioner(eigenvalues, weight_decay)
    weight0 = x.new_zeros(num_classes, x.shape[1]) if init is None else init[0].to(x.dtype)
    bias = x.new_zeros(num_classes) if init is None else init[1].detach().to(x.dtype, copy=True)
    variables = ((weight0 @ eigenvectors) / scale).detach().requires_grad_(True)
    bias.requires_grad_(True)
    optimizer = _lbfgs([variables, bias], max_iter, tolerance)

    def weights() -> Tensor:
        # Rows centred: the softmax ignores a vector added to every class and only the penalty,
        # with curvature lambda / Lambda_k in W', would remove one: the gradient test could
        # pass with it still there. Centred, every start ends at the same W.
        weight = (variables * scale) @ eigenvectors.T
        return weight - weight.mean(dim=0)

    def closure() -> Tensor:
        optimizer.zero_grad()
        weight = weights()
        loss = F.cross_entropy(x @ weight.T + bias, y)
        loss = loss + 0.5 * weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
        closure()  # the gradient at the final point (the line search's last one may differ)
    largest = max(float(variables.grad.abs().max()), float(bias.grad.abs().max()))
    if warn and largest > tolerance:
        iterations = optimizer.state[variables]["n_iter"]
        _warn_unconverged(iterations, max_iter, largest, tolerance, weight_decay)
    return weights().detach(), bias.detach()


def _lbfgs(params: list[Tensor], max_iter: int, tolerance: float) -> torch.optim.LBFGS:
    return torch.optim.LBFGS(
        params,
        lr=1.0,
        max_iter=max_iter,
        history_size=20,
        tolerance_grad=tolerance,
        tolerance_change=0.0,  # only the gradient test ends a fit (or the cap)
        line_search_fn="strong_wolfe",
    )


def _preconditioner(eigenvalues: Tensor, weight_decay: float) -> Tensor:
    """:math:`s_k = (\\Lambda_k + \\lambda)^{-1/2}` of :func:`_fit`, floored at 1e-6 of the
    largest curvature so that it stays finite at :math:`\\lambda = 0`."""
    curvature = eigenvalues.clamp_min(0.0) + weight_decay
    floor = 1e-6 * float(curvature.max().clamp_min(1e-12))
    return curvature.clamp_min(floor).rsqrt()


def _warn_unconverged(
    iterations: int, max_iter: int, largest: float, tolerance: float, weight_decay: float
) -> None:
    warnings.warn(
        f"linear probe: L-BFGS stopped after {iterations} iterations (cap {max_iter}) with "
        f"largest gradient entry {largest:.1e} > {tolerance:g} (weight decay {weight_decay:g}): "
        "not converged, so its accuracy may differ on another machine",
        ConvergenceWarning,
        stacklevel=3,
    )


def _eigenbasis(x: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues ``[D]`` and eigenvectors ``[D, D]`` (columns) of ``x^T x / N`` (``x``
    centred: standardised features), the preconditioner of :func:`_fit`; decomposed in float64
    on the CPU (any device, any feature dtype), returned in ``x``'s dtype and device."""
    covariance = (x.T @ x).to("cpu", torch.float64) / x.shape[0]
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
    return eigenvalues.to(x), eigenvectors.to(x)


def fit_dtype(device: torch.device) -> torch.dtype:
    """float64, where the device has it (not MPS): in float32 the rounding of the loss stalls
    L-BFGS at gradient entries of 1e-6 to 1e-4 (measured on the quickstart's features), short
    of the tolerance, at points that differ with the arithmetic's rounding."""
    return torch.float32 if device.type == "mps" else torch.float64


def _accuracy(x: Tensor, labels: Tensor, weight: Tensor, bias: Tensor) -> float:
    predictions = (x @ weight.T + bias).argmax(dim=1)
    return (predictions == labels.to(predictions.device)).double().mean().item()


def linear_probe(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    test_labels: Tensor,
    num_classes: int,
    *,
    seed: int = 0,
    weight_decays: Sequence[float] = DEFAULT_WEIGHT_DECAYS,
    max_iter: int = DEFAULT_MAX_ITER,
    val_fraction: float = 0.1,
    on_fit: Callable[[], None] | None = None,
) -> dict[str, float]:
    """Linear-probe accuracy of frozen features.

    Args:
        train_feats, train_labels: ``[N, D]`` features and ``[N]`` labels to fit on.
        test_feats, test_labels: ``[M, D]`` and ``[M]`` to report accuracy on.
        num_classes: number of classes ``C``.
        seed: fixes the train/validation split used to pick the weight decay.
        weight_decays: grid of :math:`\\lambda`; the best validation accuracy wins,
            ties going to the larger :math:`\\lambda` (the smoother classifier).
        max_iter: L-BFGS iterations per fit.
        val_fraction: share of the training set held out for the weight-decay choice.
        on_fit: called after each L-BFGS fit (a progress hook).

    Returns:
        ``{"accuracy": test accuracy of the refit classifier, "weight_decay": chosen
        lambda, "val_accuracy": its validation accuracy}``, accuracies in [0, 1].
    """
    _check_split(train_feats, train_labels, num_classes, "train")
    _check_split(test_feats, test_labels, num_classes, "test")
    if train_feats.shape[1] != test_feats.shape[1]:
        raise ValueError(
            f"linear probe: train dim {train_feats.shape[1]} != test dim "
            f"{test_feats.shape[1]}; extract both with the same encoder."
        )
    _check_fit_settings(weight_decays, val_fraction, max_iter)
    classifier = fit_linear_classifier(
        train_feats,
        train_labels,
        num_classes,
        seed=seed,
        weight_decays=weight_decays,
        max_iter=max_iter,
        val_fraction=val_fraction,
        on_fit=on_fit,
    )
    return {
        "accuracy": classifier.accuracy(test_feats, test_labels),
        "weight_decay": classifier.weight_decay,
        "val_accuracy": classifier.val_accuracy,
    }


def _check_fit_settings(weight_decays: Sequence[float], val_fraction: float, max_iter: int) -> None:
    if not weight_decays or any(wd < 0 or not math.isfinite(wd) for wd in weight_decays):
        raise ValueError(
            f"linear probe: weight_decays must be a non-empty sequence of finite values >= 0; "
            f"got {tuple(weight_decays)}."
        )
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"linear probe: val_fraction must be in (0, 1), got {val_fraction}.")
    if max_iter < 1:
        raise ValueError(f"linear probe: max_iter must be >= 1, got {max_iter}.")


@dataclass
class LinearClassifier:
    """``argmax_c (W (x - mu) / sigma + b)_c`` with the statistics of the training features.

    Robustness scores one fit on many corrupted copies of the test set, so the fit is kept.
    """

    scaler: _Standardizer
    weight: Tensor  # [C, D]
    bias: Tensor  # [C]
    weight_decay: float
    val_accuracy: float

    def state(self) -> dict[str, Tensor]:
        """Tensors that :meth:`from_state` rebuilds the classifier from (a cache entry)."""
        return {
            "mean": self.scaler.mean,
            "std": self.scaler.std,
            "weight": self.weight,
            "bias": self.bias,
            "weight_decay": torch.tensor(self.weight_decay, dtype=torch.float64),
            "val_accuracy": torch.tensor(self.val_accuracy, dtype=torch.float64),
        }

    @classmethod
    def from_state(cls, state: dict[str, Tensor], device: torch.device | str) -> LinearClassifier:
        def on(name: str) -> Tensor:
            return state[name].to(device)

        scaler = _Standardizer.from_stats(on("mean"), on("std"))
        return cls(
            scaler,
            on("weight"),
            on("bias"),
            float(state["weight_decay"]),
            float(state["val_accuracy"]),
        )

    def predict(self, feats: Tensor) -> Tensor:
        feats = feats.to(self.weight.device)  # fit on a GPU, scored anywhere
        with single_threaded():  # like the fit: the same predictions whatever the core count
            return (self.scaler(feats) @ self.weight.T + self.bias).argmax(dim=1)

    def accuracy(self, feats: Tensor, labels: Tensor) -> float:
        if feats.ndim != 2 or feats.shape[1] != self.weight.shape[1]:
            raise ValueError(
                f"linear classifier: features must be [N, {self.weight.shape[1]}], got "
                f"{tuple(feats.shape)}; extract them with the encoder it was fit on"
            )
        predictions = self.predict(feats)
        return (predictions == labels.to(predictions.device)).double().mean().item()


def fit_linear_classifier(
    train_feats: Tensor,
    train_labels: Tensor,
    num_classes: int,
    *,
    seed: int = 0,
    weight_decays: Sequence[float] = DEFAULT_WEIGHT_DECAYS,
    max_iter: int = DEFAULT_MAX_ITER,
    val_fraction: float = 0.1,
    on_fit: Callable[[], None] | None = None,
) -> LinearClassifier:
    """The linear probe's fit: weight decay chosen on a seeded held-out split along a
    regularisation path (largest first, each fit warm-started from the previous), then a refit
    on all training data with the chosen one. ``on_fit`` is called after each of the
    ``len(weight_decays) + 1`` fits."""
    on_fit = on_fit or (lambda: None)
    _check_split(train_feats, train_labels, num_classes, "train")
    n = train_feats.shape[0]
    n_val = max(1, round(val_fraction * n))
    if n - n_val < 1:
        raise ValueError(
            f"linear probe: {n} training samples leave none to fit after holding out "
            f"{n_val} for validation; provide more data or lower val_fraction."
        )
    with single_threaded():
        return _fit_path(
            train_feats, train_labels, num_classes, seed, weight_decays, max_iter, n_val, on_fit
        )


def _fit_path(
    train_feats: Tensor,
    train_labels: Tensor,
    num_classes: int,
    seed: int,
    weight_decays: Sequence[float],
    max_iter: int,
    n_val: int,
    on_fit: Callable[[], None],
) -> LinearClassifier:
    n = train_feats.shape[0]
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=generator).to(train_feats.device)
    val_idx, fit_idx = order[:n_val], order[n_val:]
    fit_scaler = _Standardizer(train_feats[fit_idx], dtype=torch.float32)
    fit_x, val_x = fit_scaler(train_feats[fit_idx]), fit_scaler(train_feats[val_idx])
    best_wd, best_val, best_params, params = 0.0, -1.0, None, None
    basis = _eigenbasis(fit_x)  # one preconditioner for the whole path
    path = dict(basis=basis, tolerance=PATH_TOLERANCE, warn=False)
    for wd in sorted(weight_decays, reverse=True):
        params = _fit(fit_x, train_labels[fit_idx], num_classes, wd, max_iter, params, **path)
        val_acc = _accuracy(val_x, train_labels[val_idx], *params)
        on_fit()
        if val_acc > best_val:  # descending grid: ">" keeps the larger lambda on ties
            best_wd, best_val, best_params = float(wd), val_acc, params
    scaler = _Standardizer(train_feats)
    weight, bias = _refit(
        scaler(train_feats), train_labels, num_classes, best_wd, max_iter, best_params
    )
    on_fit()
    return LinearClassifier(scaler, weight, bias, best_wd, best_val)


def _refit(
    x: Tensor,
    labels: Tensor,
    num_classes: int,
    weight_decay: float,
    max_iter: int,
    init: tuple[Tensor, Tensor] | None,
) -> tuple[Tensor, Tensor]:
    """The converged fit on standardised ``x`` (its dtype, :func:`fit_dtype`), warm-started by a
    float32 fit to :data:`REFIT_WARMUP_TOLERANCE` when ``x`` is float64. It ends at the same
    minimum as a float64 fit from ``init`` (the loss is strictly convex in the centred W)."""
    basis = _eigenbasis(x)
    if x.dtype == torch.float64:
        basis32 = tuple(t.float() for t in basis)
        warm = dict(basis=basis32, tolerance=REFIT_WARMUP_TOLERANCE, warn=False)
        init = _fit(x.float(), labels, num_classes, weight_decay, max_iter, init, **warm)
    return _fit(x, labels, num_classes, weight_decay, max_iter, init, basis=basis)


def class_balanced_subset(labels: Tensor, num_classes: int, fraction: float, seed: int) -> Tensor:
    """Indices of a class-balanced random subset holding about ``fraction`` of ``labels``.

    Every class contributes ``max(1, round(fraction * N / num_classes))`` samples, drawn
    without replacement by a generator seeded with ``seed`` (reproducible). Returned
    indices are sorted.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"low-shot: fraction must be in (0, 1], got {fraction}.")
    if labels.ndim != 1 or labels.numel() == 0:
        raise ValueError(f"low-shot: labels must be a non-empty 1-D tensor; got {labels.shape}.")
    labels = labels.cpu()
    per_class = max(1, round(fraction * labels.numel() / num_classes))
    counts = torch.bincount(labels, minlength=num_classes)
    if counts.numel() > num_classes:
        raise ValueError(f"low-shot: labels exceed num_classes={num_classes}.")
    if int(counts.min()) < per_class:
        short = int(counts.argmin())
        raise ValueError(
            f"low-shot: a balanced {fraction:g} subset needs {per_class} samples per class, "
            f"but class {short} has {int(counts[short])}; lower the fraction."
        )
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for c in range(num_classes):
        members = (labels == c).nonzero().squeeze(1)
        chosen.append(members[torch.randperm(members.numel(), generator=generator)[:per_class]])
    return torch.cat(chosen).sort().values


def low_shot_linear_probe(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    test_labels: Tensor,
    num_classes: int,
    *,
    fractions: Sequence[float] = (0.01, 0.1),
    seeds: Sequence[int] = (0, 1, 2),
    weight_decays: Sequence[float] = DEFAULT_WEIGHT_DECAYS,
    max_iter: int = DEFAULT_MAX_ITER,
    val_fraction: float = 0.1,
    on_fit: Callable[[], None] | None = None,
) -> dict[float, dict[str, float | list[float]]]:
    """Linear probe on class-balanced fractions of the training labels.

    For every fraction and seed, :func:`class_balanced_subset` picks the labelled subset
    and :func:`linear_probe` (same ``seed``) fits and scores it on the full test set; the
    draws run side by side (:func:`run_side_by_side`), so ``on_fit`` may be called from
    several threads.

    Returns:
        ``{fraction: {"mean": mean test accuracy, "std": sample std over seeds (0 for a
        single seed), "per_seed": [accuracy per seed, in ``seeds`` order]}}``.
    """
    if not seeds:
        raise ValueError("low-shot: seeds must not be empty.")
    draws = [(fraction, seed) for fraction in fractions for seed in seeds]

    def draw(fraction: float, seed: int) -> float:
        subset = class_balanced_subset(train_labels, num_classes, fraction, seed)
        subset = subset.to(train_feats.device)
        probe = linear_probe(
            train_feats[subset],
            train_labels[subset],
            test_feats,
            test_labels,
            num_classes,
            seed=seed,
            weight_decays=weight_decays,
            max_iter=max_iter,
            val_fraction=val_fraction,
            on_fit=on_fit,
        )
        return probe["accuracy"]

    # The draws are independent fits: side by side, each on one thread (the same numbers).
    accuracy = dict(zip(draws, run_side_by_side([lambda d=d: draw(*d) for d in draws])))
    results: dict[float, dict[str, float | list[float]]] = {}
    for fraction in fractions:
        per_seed = [accuracy[fraction, seed] for seed in seeds]
        accs = torch.tensor(per_seed, dtype=torch.float64)
        std = accs.std(correction=1).item() if len(per_seed) > 1 else 0.0
        results[float(fraction)] = {"mean": accs.mean().item(), "std": std, "per_seed": per_seed}
    return results
