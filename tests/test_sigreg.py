"""SIGReg / Epps–Pulley: hand-computed values, invariants, gradients and DDP equivalence."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
import torch.distributed as dist

import hjepa.losses.sigreg as sigreg_module
from hjepa.losses.sigreg import (
    SIGReg,
    epps_pulley,
    epps_pulley_reference,
    permuted_directions,
    random_directions,
    signed_permutation,
)
from tests import gloo
from tests.benchmark_scripts import load_benchmark


def epps_pulley_by_hand(x: np.ndarray, num_points: int = 17, t_max: float = 3.0) -> np.ndarray:
    """The statistic with plain loops over directions, nodes and samples."""
    n, k = x.shape
    dt = t_max / (num_points - 1)
    out = np.zeros(k)
    for col in range(k):
        total = 0.0
        for j in range(num_points):
            t = j * dt
            gauss = math.exp(-t * t / 2)
            weight = dt * gauss if j in (0, num_points - 1) else 2 * dt * gauss
            cos_mean = sum(math.cos(t * x[i, col]) for i in range(n)) / n
            sin_mean = sum(math.sin(t * x[i, col]) for i in range(n)) / n
            total += weight * ((cos_mean - gauss) ** 2 + sin_mean**2)
        out[col] = n * total
    return out


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("num_points,t_max", [(17, 3.0), (6, 2.0), (2, 1.5)])
def test_epps_pulley_matches_hand_loops(num_points, t_max):
    x = torch.randn(7, 4, generator=_gen(), dtype=torch.float64) * 1.5 + 0.3
    expected = epps_pulley_by_hand(x.numpy(), num_points, t_max)
    fast = epps_pulley(x, num_points, t_max).numpy()
    direct = epps_pulley_reference(x, num_points, t_max).numpy()
    np.testing.assert_allclose(fast, expected, rtol=1e-12)
    np.testing.assert_allclose(direct, expected, rtol=1e-12)


@pytest.mark.parametrize("evaluation", ["table", "powers"])
@pytest.mark.parametrize(
    "shape,num_points",
    [((64, 33), 17), ((300, 5), 17), ((9, 70), 26), ((16, 8), 3), ((5, 3), 10), ((40, 6), 13)],
)
def test_fast_equals_direct_formula(shape, num_points, evaluation):
    # num_points 13 and 26 split their frequencies unevenly (A < B), 3 and 2 are the smallest.
    x = torch.randn(*shape, generator=_gen(1), dtype=torch.float64) * 2.0
    reference = epps_pulley_reference(x, num_points)
    fast = epps_pulley(x, num_points, evaluation=evaluation)
    torch.testing.assert_close(fast, reference, rtol=1e-10, atol=0)
    # float32 against the float64 value: the fast path is as accurate as the direct one.
    fast32 = epps_pulley(x.float(), num_points, evaluation=evaluation).double()
    torch.testing.assert_close(fast32, reference, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("evaluation", ["table", "powers"])
def test_float32_fast_path_is_as_accurate_as_the_direct_formula(evaluation):
    # At a training-like size the fast float32 statistic and gradient must stay within three
    # times the rounding error of the direct float32 formula, both against float64 (measured:
    # 1.7x for the angle-addition table, 1.4x (value) and 2.3x (gradient) for the powers): a
    # faster evaluation must not trade accuracy (a running recurrence to cos(16 theta) from
    # theta alone would accumulate several times more).
    x = torch.randn(256, 64, generator=_gen(18), dtype=torch.float64) * 1.5 + 0.2
    weights = torch.rand(64, generator=_gen(19), dtype=torch.float64)

    def value_and_grad(fn, v):
        leaf = v.clone().requires_grad_()
        value = fn(leaf)
        (value * weights.to(v.dtype)).sum().backward()
        return value.detach().double(), leaf.grad.double()

    exact, exact_grad = value_and_grad(epps_pulley_reference, x)
    errors = {}
    fast = functools.partial(epps_pulley, evaluation=evaluation)
    for name, fn in (("fast", fast), ("direct", epps_pulley_reference)):
        value, grad = value_and_grad(fn, x.float())
        errors[name] = (
            ((value - exact).abs() / exact).max().item(),
            ((grad - exact_grad).abs().max() / exact_grad.abs().max()).item(),
        )
    for fast, direct in zip(errors["fast"], errors["direct"]):
        assert fast <= 3 * direct, errors
    assert max(errors["fast"]) < 1e-5, errors


@pytest.mark.parametrize("evaluation", ["table", "powers"])
@pytest.mark.parametrize("saved", [True, False])
def test_chunked_evaluation_matches_reference(monkeypatch, evaluation, saved):
    # Force chunks of 3 directions (the last one ragged) through the CPU working-set budget,
    # with the forward's table kept for backward or recomputed there.
    x = torch.randn(20, 10, generator=_gen(17), dtype=torch.float64)
    monkeypatch.setattr(sigreg_module, "_CPU_CHUNK_ELEMENTS", 16 * 20 * 3)
    monkeypatch.setattr(sigreg_module, "_CPU_POWERS_CHUNK_ELEMENTS", 16 * 20 * 3)
    if not saved:
        monkeypatch.setattr(sigreg_module, "_SAVED_BASIS_ELEMENTS", 0)
    grads = []
    fast = functools.partial(epps_pulley, evaluation=evaluation)
    for fn in (fast, epps_pulley_reference):
        leaf = x.clone().requires_grad_()
        value = fn(leaf)
        (value * torch.arange(1.0, 11.0, dtype=torch.float64)).sum().backward()
        grads.append((value.detach(), leaf.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-10, atol=0)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("evaluation", ["table", "powers"])
@pytest.mark.parametrize("shape", [(256, 64), (3000, 40), (33, 7)])
def test_keeping_the_table_for_backward_changes_no_bit(monkeypatch, shape, evaluation):
    # Backward reads the forward's table back when it fits _SAVED_BASIS_ELEMENTS, and evaluates
    # it again otherwise: the same numbers either way, value and gradient bit for bit.
    x = torch.randn(*shape, generator=_gen(28)) * 1.7 - 0.2
    weights = torch.rand(shape[1], generator=_gen(29))
    results = []
    for budget in (1 << 30, 0):
        monkeypatch.setattr(sigreg_module, "_SAVED_BASIS_ELEMENTS", budget)
        leaf = x.clone().requires_grad_()
        value = epps_pulley(leaf, evaluation=evaluation)
        (value * weights).sum().backward()
        results.append((value.detach(), leaf.grad))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])


def test_powers_differ_from_the_table_only_by_rounding():
    # The two evaluations are the same formula computed differently: float32 values agree to
    # rounding, and they are not secretly the same computation.
    x = torch.randn(256, 128, generator=_gen(30)) * 1.5
    table, powers = (epps_pulley(x, evaluation=e) for e in ("table", "powers"))
    torch.testing.assert_close(powers, table, rtol=2e-5, atol=1e-6)
    assert not torch.equal(powers, table)
    with pytest.raises(ValueError, match="evaluation must be one of"):
        epps_pulley(x, evaluation="fused")
    with pytest.raises(ValueError, match="evaluation must be one of"):
        SIGReg(evaluation="fused")


def test_standard_gaussian_gives_about_1_05_per_direction():
    # E[EP] = sum_j w_j (1 - exp(-t_j^2)) ~ sqrt(2 pi) - sqrt(2 pi / 3) = 1.06 for N(0, 1).
    # Per direction the statistic has std ~0.95, so average 1024 independent columns (std 0.03).
    x = torch.randn(2048, 1024, generator=_gen(2), dtype=torch.float64)
    stat = epps_pulley(x)
    assert stat.shape == (1024,)
    assert abs(stat.mean().item() - 1.05) < 0.15


def test_collapsed_embeddings_are_heavily_penalised():
    sigreg = SIGReg(num_slices=128)
    row = torch.randn(1, 32, generator=_gen(3), dtype=torch.float64)
    identical_rows = row.expand(256, 32)
    rank_one = torch.randn(256, 1, generator=_gen(4), dtype=torch.float64) * row
    healthy = torch.randn(256, 32, generator=_gen(5), dtype=torch.float64)
    healthy_value = sigreg(healthy, step=0).item()
    assert healthy_value < 2.0
    assert sigreg(identical_rows, step=0).item() > 10 * healthy_value
    assert sigreg(rank_one, step=0).item() > 10 * healthy_value


def test_statistic_is_invariant_to_sample_order():
    x = torch.randn(50, 6, generator=_gen(6), dtype=torch.float64)
    shuffled = x[torch.randperm(50, generator=_gen(7))]
    torch.testing.assert_close(epps_pulley(shuffled), epps_pulley(x), rtol=1e-12, atol=0)


@pytest.mark.parametrize("evaluation", ["table", "powers"])
def test_gradcheck_fast_statistic(evaluation):
    x = torch.randn(5, 3, generator=_gen(8), dtype=torch.float64, requires_grad=True)
    fast = functools.partial(epps_pulley, evaluation=evaluation)
    assert torch.autograd.gradcheck(lambda v: fast(v), (x,))
    assert torch.autograd.gradcheck(lambda v: fast(v, num_points=7, t_max=2.0), (x,))


def test_gradcheck_sigreg_through_projection():
    z = torch.randn(6, 4, generator=_gen(9), dtype=torch.float64, requires_grad=True)
    directions = random_directions(4, 5, step=3, dtype=torch.float64)
    sigreg = SIGReg(num_slices=5)
    assert torch.autograd.gradcheck(lambda v: sigreg(v, directions), (z,))


@pytest.mark.parametrize("evaluation", ["table", "powers"])
def test_fast_gradient_equals_direct_gradient(evaluation):
    x = torch.randn(40, 12, generator=_gen(10), dtype=torch.float64)
    weights = torch.rand(12, generator=_gen(11), dtype=torch.float64)
    grads = []
    for fn in (functools.partial(epps_pulley, evaluation=evaluation), epps_pulley_reference):
        leaf = x.clone().requires_grad_()
        (fn(leaf) * weights).sum().backward()
        grads.append(leaf.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-12)


def test_one_gradient_step_moves_away_from_collapse():
    sigreg = SIGReg(num_slices=64)
    z = (0.01 * torch.randn(128, 16, generator=_gen(12), dtype=torch.float64)).requires_grad_()
    loss = sigreg(z, step=0)
    loss.backward()
    assert torch.isfinite(z.grad).all()
    with torch.no_grad():
        stepped = z - 1e-3 * z.grad
    assert stepped.std().item() > z.std().item()
    assert sigreg(stepped, step=0).item() < loss.item()


def test_directions_are_seeded_by_step_and_unit_norm():
    a = random_directions(24, 40, step=5)
    assert a.shape == (24, 40)
    torch.testing.assert_close(a, random_directions(24, 40, step=5), rtol=0, atol=0)
    assert not torch.allclose(a, random_directions(24, 40, step=6))
    assert not torch.allclose(a, random_directions(24, 40, step=5, seed=1))
    torch.testing.assert_close(a.norm(dim=0), torch.ones(40), rtol=0, atol=1e-6)


def test_sigreg_uses_the_directions_of_its_step():
    z = torch.randn(32, 8, generator=_gen(13), dtype=torch.float64)
    sigreg = SIGReg(num_slices=16, seed=2)
    directions = random_directions(8, 16, step=11, seed=2, dtype=torch.float64)
    expected = epps_pulley_reference(z @ directions).mean()
    torch.testing.assert_close(sigreg(z, step=11), expected, rtol=1e-10, atol=0)
    torch.testing.assert_close(sigreg(z, directions), expected, rtol=1e-10, atol=0)
    assert sigreg(z, step=12).item() != sigreg(z, step=11).item()


def test_sets_of_one_step_share_one_draw(monkeypatch):
    calls = []

    def counting(*args, **kwargs):
        calls.append(args)
        return random_directions(*args, **kwargs)

    monkeypatch.setattr(sigreg_module, "random_directions", counting)
    sigreg = SIGReg(num_slices=16, seed=3)
    a, b = (torch.randn(40, 8, generator=_gen(s), dtype=torch.float64) for s in (20, 21))
    values = [sigreg(a, step=7), sigreg(b, step=7)]
    assert len(calls) == 1  # the second set of step 7 reused the first one's directions
    directions = random_directions(8, 16, step=7, seed=3, dtype=torch.float64)
    for z, value in zip((a, b), values):
        torch.testing.assert_close(value, epps_pulley_reference(z @ directions).mean())
    sigreg(a, step=8)
    sigreg(a[:, :6], step=8)
    sigreg(a.float(), step=8)
    assert len(calls) == 4  # a new step, width or dtype draws again
    assert sigreg(a, step=7).item() == values[0].item()  # a redraw of step 7: same directions


def test_a_draw_under_inference_mode_is_not_reused_for_training():
    sigreg = SIGReg(num_slices=8)
    z = torch.randn(30, 5, generator=_gen(22), dtype=torch.float64)
    with torch.inference_mode():
        expected = sigreg(z, step=2)
    leaf = z.clone().requires_grad_()
    value = sigreg(leaf, step=2)
    value.backward()
    torch.testing.assert_close(value.detach(), expected)
    assert torch.isfinite(leaf.grad).all() and leaf.grad.abs().sum() > 0


def test_permuted_draw_projects_on_signed_permutations_of_the_step0_directions():
    pool = random_directions(12, 20, step=0, seed=4, dtype=torch.float64)
    z = torch.randn(30, 12, generator=_gen(25), dtype=torch.float64)
    sigreg = SIGReg(num_slices=20, seed=4, draw="permuted")
    previous = None
    for step in (0, 3, 9):
        directions = permuted_directions(12, 20, step, seed=4, dtype=torch.float64)
        perm, signs = signed_permutation(12, step, seed=4, dtype=torch.float64)
        assert sorted(perm.tolist()) == list(range(12)) and set(signs.tolist()) == {-1.0, 1.0}
        torch.testing.assert_close(directions[perm], pool * signs.unsqueeze(1), rtol=0, atol=0)
        torch.testing.assert_close(directions.norm(dim=0), torch.ones(20, dtype=torch.float64))
        expected = epps_pulley_reference(z @ directions).mean()
        torch.testing.assert_close(sigreg(z, step=step), expected, rtol=1e-10, atol=0)
        assert previous is None or not torch.equal(directions, previous)  # fresh every step
        previous = directions
    assert torch.autograd.gradcheck(
        lambda v: SIGReg(num_slices=5, draw="permuted")(v, step=2),
        (torch.randn(6, 4, generator=_gen(26), dtype=torch.float64, requires_grad=True),),
    )
    with pytest.raises(ValueError, match="draw must be one of"):
        SIGReg(draw="hadamard")


@pytest.mark.parametrize("kind", ["uniform", "anisotropic", "rank_one"])
def test_permuted_draw_estimates_what_fresh_gaussian_directions_estimate(kind):
    # Averaged over 16 steps, SIGReg with the permuted draw has the value and the gradient of
    # fresh Gaussian directions on non-Gaussian embeddings: the gradients agree as well as
    # those of two independent runs of 16 Gaussian steps agree with each other.
    g = _gen(27)
    z = {
        "uniform": (torch.rand(256, 32, generator=g) - 0.5) * 12**0.5,
        "anisotropic": torch.randn(256, 32, generator=g) * torch.linspace(0.2, 2.0, 32),
        "rank_one": torch.randn(256, 1, generator=g) * torch.randn(1, 32, generator=g),
    }[kind].double()
    runs = {}
    for name, draw, steps in (
        ("gaussian", "gaussian", range(16)),
        ("gaussian_again", "gaussian", range(16, 32)),
        ("permuted", "permuted", range(16)),
    ):
        sigreg, leaf = SIGReg(num_slices=128, draw=draw), z.clone().requires_grad_()
        value = sum(sigreg(leaf, step=step) for step in steps) / len(steps)
        value.backward()
        runs[name] = (value.item(), leaf.grad.flatten())

    def cosine(a, b):
        return torch.nn.functional.cosine_similarity(runs[a][1], runs[b][1], dim=0).item()

    assert abs(runs["permuted"][0] / runs["gaussian"][0] - 1) < 0.05
    assert cosine("gaussian", "permuted") > cosine("gaussian", "gaussian_again") - 0.05


def test_half_precision_is_computed_in_float32():
    z = torch.randn(64, 16, generator=_gen(14))
    sigreg = SIGReg(num_slices=32)
    value = sigreg(z.bfloat16(), step=0)
    assert value.dtype == torch.float32
    torch.testing.assert_close(value, sigreg(z.bfloat16().float(), step=0))


def test_first_call_under_inference_mode_does_not_break_training():
    x = torch.randn(10, 3, generator=_gen(16), dtype=torch.float64)
    with torch.inference_mode():
        expected = epps_pulley(x, num_points=9, t_max=2.5)  # constants are cached here first
    leaf = x.clone().requires_grad_()
    value = epps_pulley(leaf, num_points=9, t_max=2.5)
    value.sum().backward()
    torch.testing.assert_close(value.detach(), expected)
    assert torch.isfinite(leaf.grad).all()


def test_bad_inputs_raise_clear_errors():
    sigreg = SIGReg(num_slices=4)
    with pytest.raises(ValueError, match="step"):
        sigreg(torch.randn(8, 3))
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        sigreg(torch.randn(2, 8, 3), step=0)
    with pytest.raises(ValueError, match="directions"):
        sigreg(torch.randn(8, 3), torch.randn(4, 4))
    with pytest.raises(ValueError, match="num_points"):
        epps_pulley(torch.randn(8, 3), num_points=1)
    with pytest.raises(ValueError, match=r"\[N, K\]"):
        epps_pulley(torch.randn(8))
    with pytest.raises(ValueError, match="num_slices"):
        SIGReg(num_slices=0)
    with pytest.raises(ValueError, match="step"):
        random_directions(3, 2, step=-1)


# --- DDP: two gloo processes, forked so that no process re-imports torch -----------------------

_SHARDS = (5, 7)  # unequal on purpose: N is the global batch size, not world_size * local size


def _ddp_loss(
    z: torch.Tensor, directions: torch.Tensor, draw: str | None, evaluation: str
) -> torch.Tensor:
    """SIGReg on explicit directions, or drawn by ``draw`` at step 4 (the same on every rank)."""
    slices = directions.shape[1]
    if draw is None:
        return SIGReg(num_slices=slices, evaluation=evaluation)(z, directions)
    return SIGReg(num_slices=slices, draw=draw, evaluation=evaluation)(z, step=4)


def _ddp_worker(
    rank: int, world: int, init_file: str, out_dir: str, draw: str | None, evaluation: str
) -> None:
    gloo.join(rank, world, init_file)
    try:
        x, projection, directions = _ddp_inputs()
        start = sum(_SHARDS[:rank])
        shard = x[start : start + _SHARDS[rank]].clone().requires_grad_()
        weight = projection.clone().requires_grad_()
        loss = _ddp_loss(shard @ weight, directions, draw, evaluation)
        loss.backward()
        torch.save(
            {"loss": loss.detach(), "shard_grad": shard.grad, "weight_grad": weight.grad},
            f"{out_dir}/rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def _ddp_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = _gen(15)
    x = torch.randn(sum(_SHARDS), 6, generator=g, dtype=torch.float64)
    projection = torch.randn(6, 5, generator=g, dtype=torch.float64)
    return x, projection, random_directions(5, 9, step=4, dtype=torch.float64)


@pytest.mark.parametrize(
    "draw,evaluation", [(None, "table"), ("permuted", "table"), (None, "powers")]
)
def test_ddp_sigreg_equals_single_process_on_the_whole_batch(tmp_path, run_ranks, draw, evaluation):
    world = len(_SHARDS)
    run_ranks(
        _ddp_worker,
        (world, str(tmp_path / "init"), str(tmp_path), draw, evaluation),
        world,
        start_method="fork",
    )
    x, projection, directions = _ddp_inputs()
    x = x.clone().requires_grad_()
    weight = projection.clone().requires_grad_()
    loss = _ddp_loss(x @ weight, directions, draw, evaluation)
    loss.backward()

    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    shard_grads = x.grad.split(_SHARDS)
    for r, res in enumerate(results):
        torch.testing.assert_close(res["loss"], loss.detach(), rtol=0, atol=1e-12)
        # Every rank back-propagates the same global loss and the all-reduce backward sums
        # over ranks, so a rank's shard gradient is world_size x its slice of the gradient;
        # DDP's gradient averaging divides it back.
        torch.testing.assert_close(res["shard_grad"] / world, shard_grads[r], rtol=0, atol=1e-6)
    # What DDP does with parameter gradients: average them. That must be the true gradient.
    averaged = sum(res["weight_grad"] for res in results) / world
    torch.testing.assert_close(averaged, weight.grad, rtol=0, atol=1e-6)


# --- benchmarks/bench_regularizers.py: every timed case does the work it is named for ---------


def _bench_module():
    return load_benchmark("bench_regularizers")


def test_benchmark_cases_compute_the_gradients_they_time():
    bench = _bench_module()
    z, z2 = (torch.randn(12, 8, generator=_gen(s)).requires_grad_() for s in (23, 24))
    cases = bench._cases(z, z2, num_slices=16)
    assert set(cases) == {
        *("floor", "draw", "stat", "stat_pow", "sigreg", "permuted", "powers", "perm+pow"),
        *("direct", "vicreg", "vicreg2"),
    }
    grads = {}
    with_gradient = ("floor", "sigreg", "permuted", "powers", "perm+pow", "direct", "vicreg")
    for name in (*with_gradient, "vicreg2"):
        cases[name]()
        grads[name] = z.grad.clone()
        assert grads[name].abs().sum() > 0, name
    assert z2.grad is not None and z2.grad.abs().sum() > 0  # the two-view call uses both views
    assert not torch.equal(grads["vicreg"], grads["vicreg2"])  # and is not the one-set call


def test_benchmark_prints_one_row_of_ratios_per_width(capsys):
    _bench_module().main(["--device", "cpu", "--dims", "8", "16", "--repeats", "1"] + [
        "--slices", "16", "--batch", "12"
    ])  # fmt: skip
    lines = capsys.readouterr().out.strip().splitlines()
    header, rows = lines[1].split(), [line.split() for line in lines[2:]]
    assert header[-6:] == ["sig/vic", "sig/vic2", "perm/vic", "pow/vic", "p+p/vic", "dir/vic"]
    assert [row[0] for row in rows] == ["8", "16"]
    for row in rows:
        assert len(row) == len(header) and all(float(cell) > 0 for cell in row[1:])


def test_loss_sigreg_draw_reaches_both_sigreg_terms_of_the_objective():
    from hjepa.config import ConfigError, LossConfig, load_config
    from hjepa.losses.combined import Objective

    cfg = load_config(None, ["loss.regularizer=sigreg", "loss.sigreg_draw=permuted"])
    assert cfg.loss.sigreg_draw == "permuted"
    assert load_config(None, []).loss.sigreg_draw == "gaussian"
    with pytest.raises(ConfigError, match="sigreg_draw"):
        load_config(None, ["loss.sigreg_draw=hadamard"])
    loss = LossConfig(regularizer="sigreg", sigreg_draw="permuted", view_sigreg=0.5)
    objective = Objective(loss, [1.0], multicrop_weight=1.0)
    assert objective.sigreg.draw == objective.view_sigreg.draw == "permuted"
    assert Objective(LossConfig(regularizer="sigreg"), [1.0]).sigreg.draw == "gaussian"


def test_loss_sigreg_eval_reaches_both_sigreg_terms_of_the_objective():
    from hjepa.config import ConfigError, LossConfig, load_config
    from hjepa.losses.combined import Objective

    cfg = load_config(None, ["loss.regularizer=sigreg", "loss.sigreg_eval=powers"])
    assert cfg.loss.sigreg_eval == "powers"
    assert load_config(None, []).loss.sigreg_eval == "table"
    with pytest.raises(ConfigError, match="sigreg_eval"):
        load_config(None, ["loss.sigreg_eval=fused"])
    loss = LossConfig(regularizer="sigreg", sigreg_eval="powers", view_sigreg=0.5)
    objective = Objective(loss, [1.0], multicrop_weight=1.0)
    assert objective.sigreg.evaluation == objective.view_sigreg.evaluation == "powers"
    assert Objective(LossConfig(regularizer="sigreg"), [1.0]).sigreg.evaluation == "table"
    # The objective's term is the statistic evaluated that way: equal to the direct formula.
    z = torch.randn(64, 12, generator=_gen(31), dtype=torch.float64)
    directions = random_directions(12, 1024, step=3, dtype=torch.float64)
    expected = epps_pulley_reference(z @ directions).mean()
    torch.testing.assert_close(objective.sigreg(z, step=3), expected, rtol=1e-10, atol=0)
