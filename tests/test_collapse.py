"""Collapse diagnostics against hand computations and embeddings of known rank."""

from __future__ import annotations

import math

import pytest
import torch

from hjepa.eval.collapse import (
    COLLAPSE_NORMALIZED_STD_FACTOR,
    COLLAPSE_RANK_FRACTION,
    collapse_report,
    effective_rank,
    embedding_std,
    normalized_embedding_std,
)


def hand_mean_std(rows: list[list[float]]) -> float:
    """Mean over columns of the unbiased column standard deviation, in plain Python."""
    n = len(rows)
    stds = []
    for column in zip(*rows):
        mean = sum(column) / n
        stds.append(math.sqrt(sum((v - mean) ** 2 for v in column) / (n - 1)))
    return sum(stds) / len(stds)


def test_embedding_std_matches_hand_computation():
    rows = [[1.0, 2.0], [3.0, 6.0], [5.0, 10.0]]
    # Columns (1, 3, 5) and (2, 6, 10): unbiased stds 2 and 4.
    assert embedding_std(torch.tensor(rows)) == pytest.approx(3.0)
    rows = [[3.0, 4.0], [0.0, 5.0], [-5.0, 0.0], [1.0, -1.0]]
    assert embedding_std(torch.tensor(rows)) == pytest.approx(hand_mean_std(rows))


def test_normalized_embedding_std_matches_hand_computation():
    rows = [[3.0, 4.0], [0.0, 5.0], [-5.0, 0.0], [1.0, -1.0]]
    unit_rows = [[v / math.hypot(*r) for v in r] for r in rows]
    got = normalized_embedding_std(torch.tensor(rows))
    assert got == pytest.approx(hand_mean_std(unit_rows))
    # Rows pointing the same way (any lengths) have zero normalised spread.
    assert normalized_embedding_std(torch.tensor([[1.0, 2.0], [3.0, 6.0]])) == pytest.approx(0)


def test_normalized_std_of_isotropic_gaussian_is_one_over_sqrt_dim():
    dim = 64
    z = torch.randn(4000, dim, generator=torch.Generator().manual_seed(0))
    assert normalized_embedding_std(z) == pytest.approx(1 / math.sqrt(dim), rel=0.05)


def test_effective_rank_matches_hand_computation():
    # Singular values 3 and 1: p = (3/4, 1/4).
    z = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    entropy = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert effective_rank(z) == pytest.approx(math.exp(entropy), abs=1e-5)


def test_effective_rank_of_isotropic_gaussian_is_near_dim():
    dim = 32
    z = torch.randn(3000, dim, generator=torch.Generator().manual_seed(1))
    rank = effective_rank(z)
    assert 0.9 * dim < rank <= dim


@pytest.mark.parametrize("true_rank", [1, 3, 8])
def test_effective_rank_of_low_rank_data_is_its_rank(true_rank):
    generator = torch.Generator().manual_seed(true_rank)
    dim = 48
    # Orthonormal rows so every used direction carries (nearly) the same energy.
    basis = torch.linalg.qr(torch.randn(dim, true_rank, generator=generator)).Q.T
    z = torch.randn(3000, true_rank, generator=generator) @ basis
    assert effective_rank(z) == pytest.approx(true_rank, abs=0.1 * true_rank)


def test_collapsed_embeddings_have_rank_one_and_zero_std():
    z = torch.randn(1, 32).repeat(500, 1)
    assert effective_rank(z) == pytest.approx(1.0, abs=1e-3)
    assert embedding_std(z) == pytest.approx(0.0, abs=1e-12)
    assert normalized_embedding_std(z) == pytest.approx(0.0, abs=1e-12)


def test_collapse_report_verdicts():
    generator = torch.Generator().manual_seed(2)
    dim = 256
    healthy = collapse_report(torch.randn(2000, dim, generator=generator))
    assert healthy["collapsed"] is False
    assert healthy["dim"] == dim
    assert healthy["effective_rank_fraction"] == pytest.approx(healthy["effective_rank"] / dim)
    assert healthy["normalized_embedding_std_healthy"] == pytest.approx(1 / math.sqrt(dim))

    # Dimensional collapse: every row on one line, lengths varying (raw std is not zero).
    line = torch.rand(2000, 1, generator=generator) * torch.randn(1, dim, generator=generator)
    report = collapse_report(line)
    assert report["embedding_std"] > 0.01
    assert report["effective_rank"] < COLLAPSE_RANK_FRACTION * dim
    assert report["collapsed"] is True

    # Near-identical rows in a small dim: the rank threshold (0.32) cannot fire, std does.
    small = torch.randn(1, 32, generator=generator) + 1e-6 * torch.randn(500, 32)
    report = collapse_report(small)
    assert report["normalized_embedding_std"] < COLLAPSE_NORMALIZED_STD_FACTOR / math.sqrt(32)
    assert report["collapsed"] is True


def test_collapse_metrics_reject_bad_input():
    with pytest.raises(ValueError, match="2-D"):
        embedding_std(torch.randn(10))
    with pytest.raises(ValueError, match="at least 2 samples"):
        effective_rank(torch.randn(1, 8))
    with pytest.raises(ValueError, match="NaN"):
        collapse_report(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))
