"""kNN and linear-probe evaluation on synthetic features with known answers."""

from __future__ import annotations

import math
import statistics
import warnings

import pytest
import torch

from hjepa.eval.knn import knn_accuracy, knn_predict
from hjepa.eval.linear import (
    DEFAULT_MAX_ITER,
    ConvergenceWarning,
    _fit,
    _refit,
    class_balanced_subset,
    fit_linear_classifier,
    linear_probe,
    low_shot_linear_probe,
)

SMALL_GRID = (1e-4, 1e-2)


def gaussian_clusters(n: int, num_classes: int, dim: int, seed: int, spread: float = 8.0):
    """Unit-variance clusters around centres ``spread`` apart: linearly separable."""
    generator = torch.Generator().manual_seed(seed)
    centres = spread * torch.eye(num_classes, dim)
    labels = torch.randint(0, num_classes, (n,), generator=generator)
    feats = centres[labels] + torch.randn(n, dim, generator=generator)
    return feats, labels


def random_task(n: int, num_classes: int, dim: int, seed: int):
    """Features independent of labels: nothing to learn."""
    generator = torch.Generator().manual_seed(seed)
    feats = torch.randn(n, dim, generator=generator)
    labels = torch.randint(0, num_classes, (n,), generator=generator)
    return feats, labels


def brute_force_knn(train, train_labels, test, num_classes, k, temperature):
    """Reference weighted kNN written with plain Python loops."""

    def unit(row):
        norm = math.sqrt(sum(v * v for v in row))
        return [v / norm for v in row]

    train_rows = [unit(r) for r in train.tolist()]
    predictions = []
    for query in test.tolist():
        q = unit(query)
        sims = [(sum(a * b for a, b in zip(q, t)), j) for j, t in enumerate(train_rows)]
        sims.sort(key=lambda s: -s[0])
        votes = [0.0] * num_classes
        for sim, j in sims[:k]:
            votes[int(train_labels[j])] += math.exp(sim / temperature)
        predictions.append(max(range(num_classes), key=lambda c: (votes[c], -c)))
    return predictions


# ----------------------------------------------------------------------------- kNN


def test_knn_matches_brute_force_reference():
    train, train_labels = random_task(40, 3, 5, seed=1)
    test, _ = random_task(15, 3, 5, seed=2)
    for k, temperature in [(1, 0.07), (5, 0.07), (7, 0.5)]:
        got = knn_predict(train, train_labels, test, 3, k=k, temperature=temperature)
        want = brute_force_knn(train, train_labels, test, 3, k, temperature)
        assert got.tolist() == want


def test_knn_weighting_beats_majority_vote():
    # One class-0 neighbour almost identical to the query, two class-1 neighbours further.
    def at(angle):
        return [math.cos(angle), math.sin(angle)]

    train = torch.tensor([at(0.05), at(0.6), at(-0.6), at(3.0), at(-3.0)])
    train_labels = torch.tensor([0, 1, 1, 2, 2])
    query = torch.tensor([at(0.0)])
    k = 3
    nearest = train_labels[(train @ query.T).squeeze(1).topk(k).indices]
    assert torch.bincount(nearest, minlength=3).argmax().item() == 1  # the majority says 1

    sharp = knn_predict(train, train_labels, query, 3, k=k, temperature=0.07)
    assert sharp.tolist() == [0] == brute_force_knn(train, train_labels, query, 3, k, 0.07)
    # A very high temperature flattens the weights back to a majority vote.
    flat = knn_predict(train, train_labels, query, 3, k=k, temperature=100.0)
    assert flat.tolist() == [1]


def test_knn_chunking_does_not_change_predictions():
    train, train_labels = random_task(200, 4, 8, seed=3)
    test, _ = random_task(37, 4, 8, seed=4)
    full = knn_predict(train, train_labels, test, 4, k=10)
    for chunk in (1, 5, 36, 37, 1000):
        assert torch.equal(knn_predict(train, train_labels, test, 4, k=10, chunk=chunk), full)


def test_knn_separable_clusters_reach_high_accuracy():
    train, train_labels = gaussian_clusters(600, 5, 16, seed=5)
    test, test_labels = gaussian_clusters(300, 5, 16, seed=6)
    assert knn_accuracy(train, train_labels, test, test_labels, 5, k=20) >= 0.98


def test_knn_random_labels_stay_near_chance():
    train, train_labels = random_task(3000, 4, 16, seed=7)
    test, test_labels = random_task(3000, 4, 16, seed=8)
    acc = knn_accuracy(train, train_labels, test, test_labels, 4, k=20)
    assert abs(acc - 0.25) < 0.04


def test_knn_accuracy_is_fraction_of_correct_predictions():
    train, train_labels = random_task(50, 3, 4, seed=9)
    test, test_labels = random_task(20, 3, 4, seed=10)
    predictions = knn_predict(train, train_labels, test, 3, k=5)
    expected = sum(int(p == t) for p, t in zip(predictions.tolist(), test_labels.tolist())) / 20
    assert knn_accuracy(train, train_labels, test, test_labels, 3, k=5) == pytest.approx(expected)


def test_knn_rejects_bad_input():
    train, labels = random_task(10, 2, 3, seed=0)
    with pytest.raises(ValueError, match="k must be"):
        knn_predict(train, labels, train, 2, k=11)
    with pytest.raises(ValueError, match="labels must lie"):
        knn_predict(train, labels + 2, train, 2, k=3)
    with pytest.raises(ValueError, match="dim"):
        knn_predict(train, labels, train[:, :2], 2, k=3)
    with pytest.raises(ValueError, match="2-D"):
        knn_predict(train[None], labels, train, 2, k=3)
    with pytest.raises(ValueError, match="temperature"):
        knn_predict(train, labels, train, 2, k=3, temperature=0.0)


# ---------------------------------------------------------------------- linear probe


def test_linear_probe_separable_clusters_reach_high_accuracy():
    train, train_labels = gaussian_clusters(600, 5, 16, seed=11)
    test, test_labels = gaussian_clusters(300, 5, 16, seed=12)
    result = linear_probe(train, train_labels, test, test_labels, 5, weight_decays=SMALL_GRID)
    assert result["accuracy"] >= 0.98
    assert result["val_accuracy"] >= 0.95
    assert result["weight_decay"] in SMALL_GRID


def test_linear_probe_needs_more_than_nearest_centroid():
    # Classes differ only along one direction while a larger nuisance varies along another:
    # a linear classifier must learn to ignore the nuisance and scale the signal.
    generator = torch.Generator().manual_seed(13)

    def make(n):
        labels = torch.randint(0, 2, (n,), generator=generator)
        signal = (2.0 * labels - 1.0) * 1.0 + 0.2 * torch.randn(n, generator=generator)
        nuisance = 20.0 * torch.randn(n, generator=generator)
        return torch.stack([signal, nuisance], dim=1), labels

    train, train_labels = make(400)
    test, test_labels = make(400)
    result = linear_probe(train, train_labels, test, test_labels, 2, weight_decays=SMALL_GRID)
    assert result["accuracy"] >= 0.98


def test_linear_probe_random_labels_stay_near_chance():
    train, train_labels = random_task(3000, 4, 16, seed=14)
    test, test_labels = random_task(3000, 4, 16, seed=15)
    result = linear_probe(train, train_labels, test, test_labels, 4, weight_decays=SMALL_GRID)
    assert abs(result["accuracy"] - 0.25) < 0.04


def test_linear_probe_is_deterministic_for_a_seed():
    train, train_labels = random_task(300, 3, 8, seed=16)
    test, test_labels = random_task(100, 3, 8, seed=17)
    runs = [
        linear_probe(train, train_labels, test, test_labels, 3, seed=4, weight_decays=SMALL_GRID)
        for _ in range(2)
    ]
    assert runs[0] == runs[1]


def test_linear_probe_rejects_bad_input():
    train, labels = random_task(20, 2, 3, seed=0)
    with pytest.raises(ValueError, match="weight_decays"):
        linear_probe(train, labels, train, labels, 2, weight_decays=(-1.0,))
    with pytest.raises(ValueError, match="val_fraction"):
        linear_probe(train, labels, train, labels, 2, val_fraction=1.0)
    with pytest.raises(ValueError, match="labels must lie"):
        linear_probe(train, labels, train, labels + 5, 2)
    with pytest.raises(ValueError, match="dim"):
        linear_probe(train, labels, train[:, :2], labels, 2)
    with pytest.raises(ValueError, match="none to fit"):
        linear_probe(train[:1], labels[:1], train, labels, 2)


def correlated_task(n: int, seed: int):
    """Overlapping classes in strongly correlated features: 24 latent dimensions of widely
    different scales, mixed into 32 features (8 directions hold only faint noise), so the
    standardised features' covariance spans orders of magnitude, as real features' does."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (n,), generator=g)
    latent = torch.randn(n, 24, generator=g) + 0.7 * torch.randn(4, 24, generator=g)[labels]
    latent = latent * torch.logspace(0, -2, 24)
    feats = latent @ torch.randn(24, 32, generator=g) + 1e-3 * torch.randn(n, 32, generator=g)
    return feats, labels


def _penalised_gradient(feats, labels, classifier) -> float:
    """Largest gradient entry of the module doc's loss, at the fitted ``(W, b)``."""
    x = classifier.scaler(feats)
    weight = classifier.weight.clone().requires_grad_(True)
    bias = classifier.bias.clone().requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(x @ weight.T + bias, labels)
    loss = loss + 0.5 * classifier.weight_decay * weight.pow(2).sum()
    loss.backward()
    return max(float(weight.grad.abs().max()), float(bias.grad.abs().max()))


def test_linear_fit_converges_and_the_cap_does_not_decide():
    """The fit ends at the minimum, not at an iteration count: 100 plain L-BFGS iterations (the
    old protocol) stop far from it on this problem; doubling the safety cap changes no bit."""
    feats, labels = correlated_task(3000, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)  # no fit may stop at the cap
        fits = [
            fit_linear_classifier(feats, labels, 4, weight_decays=(1e-5,), max_iter=cap)
            for cap in (DEFAULT_MAX_ITER, 2 * DEFAULT_MAX_ITER)
        ]
    assert torch.equal(fits[0].weight, fits[1].weight) and torch.equal(fits[0].bias, fits[1].bias)
    assert fits[0].weight.dtype == torch.float64  # the reported fit: float64, to 1e-6
    assert _penalised_gradient(feats, labels, fits[0]) < 1e-5
    x = fits[0].scaler(feats)
    weight = torch.zeros(4, 32, dtype=x.dtype, requires_grad=True)
    bias = torch.zeros(4, dtype=x.dtype, requires_grad=True)
    capped = torch.optim.LBFGS([weight, bias], max_iter=100, line_search_fn="strong_wolfe")

    def closure():
        capped.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ weight.T + bias, labels)
        loss = loss + 0.5e-5 * weight.pow(2).sum()
        loss.backward()
        return loss

    capped.step(closure)
    assert (weight.detach() - fits[0].weight).abs().max() > 0.1  # the old fit: elsewhere


def test_linear_fit_reaches_the_same_minimum_from_any_start():
    feats, labels = correlated_task(2000, 1)
    x = fit_linear_classifier(feats, labels, 4, weight_decays=(1e-3,)).scaler(feats)
    g = torch.Generator().manual_seed(3)
    start = (torch.randn(4, 32, generator=g, dtype=x.dtype), torch.randn(4, dtype=x.dtype))
    cold = _fit(x, labels, 4, 1e-3, DEFAULT_MAX_ITER)
    warm = _fit(x, labels, 4, 1e-3, DEFAULT_MAX_ITER, init=start)
    logits = [x @ w.T + b - b.mean() for w, b in (cold, warm)]  # a common bias shift is void
    torch.testing.assert_close(logits[0], logits[1], atol=1e-3, rtol=0)
    assert torch.equal(logits[0].argmax(1), logits[1].argmax(1))


def test_refit_warm_started_in_float32_ends_at_the_float64_minimum():
    """The refit's float32 first stage only moves the start: it ends where a float64 fit from
    zero ends, in float64, with a gradient under the float64 tolerance."""
    feats, labels = correlated_task(3000, 4)
    classifier = fit_linear_classifier(feats, labels, 4, weight_decays=(1e-3,))
    x = classifier.scaler(feats)
    assert x.dtype == torch.float64
    direct = _fit(x, labels, 4, 1e-3, DEFAULT_MAX_ITER)
    two_stage = _refit(x, labels, 4, 1e-3, DEFAULT_MAX_ITER, None)
    assert two_stage[0].dtype == torch.float64 and two_stage[1].dtype == torch.float64
    logits = [x @ w.T + b - b.mean() for w, b in (direct, two_stage)]
    torch.testing.assert_close(logits[0], logits[1], atol=1e-3, rtol=0)
    assert torch.equal(logits[0].argmax(1), logits[1].argmax(1))
    assert _penalised_gradient(feats, labels, classifier) < 1e-5


def test_a_fit_stopped_by_its_cap_warns():
    feats, labels = correlated_task(500, 2)
    with pytest.warns(ConvergenceWarning, match="not converged") as caught:
        fit_linear_classifier(feats, labels, 4, weight_decays=(1e-5,), max_iter=3)
    message = str(caught[0].message)
    # the warning names the cap it hit and the fit's weight decay, and points at the caller
    assert "(cap 3)" in message and "weight decay 1e-05" in message, message
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)  # a converged fit stays silent
        fit_linear_classifier(feats, labels, 4, weight_decays=(1e-5,))


# -------------------------------------------------------------------------- low-shot


def test_class_balanced_subset_is_balanced_and_reproducible():
    # Unbalanced classes: 80, 50, 40, 30 samples, shuffled.
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate((80, 50, 40, 30))])
    labels = labels[torch.randperm(200, generator=torch.Generator().manual_seed(0))]
    subset = class_balanced_subset(labels, 4, fraction=0.1, seed=3)
    per_class = round(0.1 * 200 / 4)
    assert torch.bincount(labels[subset], minlength=4).tolist() == [per_class] * 4
    assert subset.unique().numel() == subset.numel()
    assert torch.equal(subset, class_balanced_subset(labels, 4, fraction=0.1, seed=3))
    assert not torch.equal(subset, class_balanced_subset(labels, 4, fraction=0.1, seed=4))
    # At least one sample per class even for tiny fractions.
    tiny = class_balanced_subset(labels, 4, fraction=0.001, seed=0)
    assert torch.bincount(labels[tiny], minlength=4).tolist() == [1, 1, 1, 1]


def test_class_balanced_subset_rejects_impossible_fraction():
    labels = torch.cat([torch.zeros(90, dtype=torch.long), torch.ones(10, dtype=torch.long)])
    with pytest.raises(ValueError, match="lower the fraction"):
        class_balanced_subset(labels, 2, fraction=0.5, seed=0)
    with pytest.raises(ValueError, match="fraction"):
        class_balanced_subset(labels, 2, fraction=0.0, seed=0)


def test_low_shot_probe_aggregates_per_seed_probes():
    train, train_labels = gaussian_clusters(400, 4, 8, seed=18, spread=3.0)
    test, test_labels = gaussian_clusters(200, 4, 8, seed=19, spread=3.0)
    seeds = (0, 1, 2)
    results = low_shot_linear_probe(
        train,
        train_labels,
        test,
        test_labels,
        4,
        fractions=(0.1, 0.5),
        seeds=seeds,
        weight_decays=SMALL_GRID,
    )
    assert set(results) == {0.1, 0.5}
    for fraction, summary in results.items():
        expected = []
        for seed in seeds:
            subset = class_balanced_subset(train_labels, 4, fraction, seed)
            probe = linear_probe(
                train[subset],
                train_labels[subset],
                test,
                test_labels,
                4,
                seed=seed,
                weight_decays=SMALL_GRID,
            )
            expected.append(probe["accuracy"])
        assert summary["per_seed"] == expected
        assert summary["mean"] == pytest.approx(statistics.mean(expected))
        assert summary["std"] == pytest.approx(statistics.stdev(expected))
    assert results[0.5]["mean"] >= 0.9
