"""VICReg terms, NT-Xent and the projection head against hand-computed references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from hjepa.losses.collectives import all_gather_cat, all_reduce_sum, is_distributed
from hjepa.losses.contrastive import nt_xent
from hjepa.losses.vicreg import VICReg, covariance_loss, invariance_loss, variance_loss
from hjepa.models.heads import ProjectionHead
from tests import gloo

SIGNS = torch.tensor([-1.0, 1.0, -1.0, 1.0], dtype=torch.float64)
ALT = torch.tensor([1.0, 1.0, -1.0, -1.0], dtype=torch.float64)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_variance_loss_hand_values():
    # Column 0: unbiased variance 4/3 (std 1.15 > 1, no penalty); column 1: 0.3^2 * 4/3 = 0.12.
    z = torch.stack((SIGNS, 0.3 * SIGNS), dim=1)
    expected = (0.0 + (1.0 - math.sqrt(0.12 + 1e-4))) / 2
    assert variance_loss(z).item() == pytest.approx(expected, rel=1e-12)
    # gamma scales the hinge: with gamma = 2 both columns are penalised.
    expected_gamma2 = ((2 - math.sqrt(4 / 3 + 1e-4)) + (2 - math.sqrt(0.12 + 1e-4))) / 2
    assert variance_loss(z, gamma=2.0).item() == pytest.approx(expected_gamma2, rel=1e-12)


def test_covariance_loss_hand_values():
    # Columns a, b (orthogonal) and a copy of a: only cov(a, a') = 4/3 is off-diagonal.
    z = torch.stack((SIGNS, ALT, SIGNS), dim=1)
    assert covariance_loss(z).item() == pytest.approx(2 * (4 / 3) ** 2 / 3, rel=1e-12)
    # Shifting a column changes no covariance.
    assert covariance_loss(z + torch.tensor([5.0, -2.0, 1.0], dtype=torch.float64)).item() == (
        pytest.approx(2 * (4 / 3) ** 2 / 3, rel=1e-12)
    )


def test_covariance_loss_matches_sample_covariance_with_loops():
    z = torch.randn(9, 4, generator=_gen(1), dtype=torch.float64)
    rows = z.tolist()
    means = [sum(r[d] for r in rows) / 9 for d in range(4)]
    total = 0.0
    for a in range(4):
        for b in range(4):
            if a != b:
                cov = sum((r[a] - means[a]) * (r[b] - means[b]) for r in rows) / 8
                total += cov**2
    assert covariance_loss(z).item() == pytest.approx(total / 4, rel=1e-12)


def test_invariance_loss_hand_value():
    z1 = torch.zeros(3, 2)
    z2 = torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 2.0]])
    assert invariance_loss(z1, z2).item() == pytest.approx(4 * 4 / 6)


def test_vicreg_module_combines_terms_with_paper_weights():
    z1 = torch.randn(16, 8, generator=_gen(2), dtype=torch.float64)
    z2 = z1 + 0.1 * torch.randn(16, 8, generator=_gen(3), dtype=torch.float64)
    out = VICReg()(z1, z2)
    var = (variance_loss(z1) + variance_loss(z2)) / 2
    cov = (covariance_loss(z1) + covariance_loss(z2)) / 2
    inv = invariance_loss(z1, z2)
    exact = {"rtol": 1e-12, "atol": 0.0}
    torch.testing.assert_close(out["variance"], var, **exact)
    torch.testing.assert_close(out["covariance"], cov, **exact)
    torch.testing.assert_close(out["invariance"], inv, **exact)
    torch.testing.assert_close(out["total"], 25 * inv + 25 * var + cov, **exact)

    single = VICReg(var_weight=2.0, cov_weight=3.0)(z1)
    assert "invariance" not in single
    expected = 2 * variance_loss(z1) + 3 * covariance_loss(z1)
    torch.testing.assert_close(single["total"], expected, **exact)


def test_vicreg_computes_half_precision_in_float32():
    z = torch.randn(16, 8, generator=_gen(11)).bfloat16()
    out = VICReg()(z)
    assert out["total"].dtype == torch.float32
    torch.testing.assert_close(out["total"], VICReg()(z.float())["total"])


def test_vicreg_penalises_collapse_and_its_gradient_spreads_embeddings():
    collapsed = torch.ones(32, 4) + 1e-3 * torch.randn(32, 4, generator=_gen(4))
    assert variance_loss(collapsed).item() > 0.95
    z = collapsed.clone().requires_grad_()
    loss = VICReg()(z)["total"]
    loss.backward()
    with torch.no_grad():
        stepped = z - 0.1 * z.grad
    assert stepped.std(0).mean() > z.std(0).mean()
    assert VICReg()(stepped)["total"] < loss


def test_vicreg_errors():
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        variance_loss(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="at least 2"):
        covariance_loss(torch.randn(1, 3))
    with pytest.raises(ValueError, match="same shape"):
        invariance_loss(torch.randn(4, 3), torch.randn(5, 3))
    with pytest.raises(ValueError, match="weights"):
        VICReg(sim_weight=-1.0)


def nt_xent_by_hand(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> float:
    """NT-Xent with explicit loops over anchors and candidates."""
    vectors = [v.tolist() for v in torch.cat((z1, z2))]
    batch = z1.shape[0]

    def cosine(u, v):
        dot = sum(a * b for a, b in zip(u, v))
        return dot / math.sqrt(sum(a * a for a in u) * sum(b * b for b in v))

    total = 0.0
    for i in range(2 * batch):
        positive = (i + batch) % (2 * batch)
        denominator = sum(
            math.exp(cosine(vectors[i], vectors[k]) / temperature)
            for k in range(2 * batch)
            if k != i
        )
        numerator = math.exp(cosine(vectors[i], vectors[positive]) / temperature)
        total += -math.log(numerator / denominator)
    return total / (2 * batch)


@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_nt_xent_matches_loops(temperature):
    z1 = torch.randn(5, 3, generator=_gen(5), dtype=torch.float64)
    z2 = torch.randn(5, 3, generator=_gen(6), dtype=torch.float64)
    expected = nt_xent_by_hand(z1, z2, temperature)
    assert nt_xent(z1, z2, temperature).item() == pytest.approx(expected, rel=1e-12)


def test_nt_xent_properties():
    z = torch.randn(8, 16, generator=_gen(7))
    other = torch.randn(8, 16, generator=_gen(8))
    # Cosine similarity: the scale of the embeddings does not matter.
    torch.testing.assert_close(nt_xent(3 * z, 0.5 * other), nt_xent(z, other))
    # Matching views score better than unrelated ones.
    assert nt_xent(z, z + 0.01 * other) < nt_xent(z, other)
    with pytest.raises(ValueError, match="same shape"):
        nt_xent(z, other[:4])
    with pytest.raises(ValueError, match="temperature"):
        nt_xent(z, other, temperature=0.0)


@pytest.mark.parametrize("norm", ["batch", "layer"])
def test_projection_head_shapes_and_gradients(norm):
    head = ProjectionHead(12, hidden_dim=24, out_dim=6, norm=norm)
    x = torch.randn(4, 12, generator=_gen(9))
    out = head(x)
    assert out.shape == (4, 6)
    out.square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in head.parameters())
    with pytest.raises(ValueError, match="norm"):
        ProjectionHead(12, norm="group")


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over ranks with gradient, from the package's differentiable sum."""
    return all_reduce_sum(x) / dist.get_world_size() if is_distributed() else x


def test_collectives_are_identity_without_distributed():
    x = torch.randn(3, 2)
    assert all_reduce_sum(x) is x and all_reduce_mean(x) is x and all_gather_cat(x) is x


# --- DDP: two gloo processes (forked) ---------------------------------------------------------


def _ddp_inputs() -> torch.Tensor:
    return torch.randn(8, 5, generator=_gen(10), dtype=torch.float64)


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    gloo.join(rank, world, init_file)
    try:
        shard = _ddp_inputs().chunk(world)[rank].clone().requires_grad_()
        terms = VICReg()(shard)
        terms["total"].backward()
        value = torch.tensor([float(rank)], dtype=torch.float64, requires_grad=True)
        mean = all_reduce_mean(value)
        (mean * (rank + 1)).sum().backward()  # rank-dependent losses 1 * mean and 2 * mean
        torch.save(
            {
                "total": terms["total"].detach(),
                "grad": shard.grad,
                "mean": mean.detach(),
                "mean_grad": value.grad,
            },
            f"{out_dir}/rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def test_ddp_vicreg_uses_the_global_batch(tmp_path, run_ranks):
    world = 2
    run_ranks(
        _ddp_worker, (world, str(tmp_path / "init"), str(tmp_path)), world, start_method="fork"
    )
    z = _ddp_inputs().requires_grad_()
    total = VICReg()(z)["total"]
    total.backward()
    for rank, part in enumerate(z.grad.chunk(world)):
        res = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(res["total"], total.detach(), rtol=0, atol=1e-12)
        # all_gather's backward sums over ranks: world_size x the slice (DDP averages it back).
        torch.testing.assert_close(res["grad"] / world, part, rtol=0, atol=1e-6)
        assert res["mean"].item() == pytest.approx(0.5)
        # d(sum over ranks of (r + 1) * mean)/d value_r = (1 + 2) / 2 on every rank.
        assert res["mean_grad"].item() == pytest.approx(1.5)
