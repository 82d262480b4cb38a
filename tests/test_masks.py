"""Tests for hjepa.data.masks: I-JEPA multi-block masks with hierarchy levels."""

import math

import pytest
import torch

from hjepa.data.masks import (
    MaskBatch,
    MultiBlockMaskSampler,
    footprint_to_level,
    mask_to_index,
)
from hjepa.grid import level_grid


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def bbox(mask: torch.Tensor, g: int) -> tuple[int, int, int, int]:
    """(top, left, height, width) of the True entries of one flat [g*g] mask."""
    rows, cols = mask.view(g, g).nonzero().unbind(1)
    top, left = int(rows.min()), int(cols.min())
    return top, left, int(rows.max()) - top + 1, int(cols.max()) - left + 1


def reference_cells(footprint: torch.Tensor, g: int, level: int) -> torch.Tensor:
    """Brute-force level cells of one flat [g*g] footprint, written with plain loops: ceil
    pooling, so the edge cells of a grid 2**level does not divide hold fewer tokens."""
    s = 2**level
    gl = (g + s - 1) // s
    fp = footprint.view(g, g).tolist()
    span = [range(i * s, min(i * s + s, g)) for i in range(gl)]
    counts = [
        [sum(fp[r][c] for r in span[i] for c in span[j]) for j in range(gl)] for i in range(gl)
    ]
    out = [2 * counts[i][j] >= len(span[i]) * len(span[j]) for i in range(gl) for j in range(gl)]
    if not any(out):
        tokens = [(r + 0.5, c + 0.5) for r in range(g) for c in range(g) if fp[r][c]]
        cy = sum(t[0] for t in tokens) / max(len(tokens), 1)
        cx = sum(t[1] for t in tokens) / max(len(tokens), 1)
        centre = [(span[i][0] + span[i][-1] + 1) / 2 for i in range(gl)]
        best, best_key = None, None
        for i in range(gl):
            for j in range(gl):
                d2 = (centre[i] - cy) ** 2 + (centre[j] - cx) ** 2
                key = (-counts[i][j], d2)
                if best_key is None or key < best_key:  # strict: ties keep the lowest index
                    best, best_key = i * gl + j, key
        out[best] = True
    return torch.tensor(out)


MODES = ("constant", "gentle", "geometric")


@pytest.mark.parametrize("grid", [7, 14])
@pytest.mark.parametrize("levels", [1, 2, 3])
def test_shapes_dtypes_and_equal_counts(grid: int, levels: int) -> None:
    b, m = 5, 4
    masks = MultiBlockMaskSampler(grid, levels=levels, num_targets=m).sample(b, gen())
    n = grid * grid
    assert masks.context.shape == (b, n) and masks.context.dtype == torch.bool
    assert masks.targets.shape == (b, m, n) and masks.targets.dtype == torch.bool
    assert len(masks.level_blocks) == len(masks.level_targets) == levels
    assert torch.equal(masks.level_targets[0], masks.targets)
    for level, lt in enumerate(masks.level_targets):
        gl = {7: [7, 4, 2], 14: [14, 7, 4]}[grid][level]  # ceil pooling
        assert level_grid(grid, level) == gl
        assert lt.shape == (b, m, gl * gl) and lt.dtype == torch.bool
        counts = lt.sum(-1)
        assert counts.min() >= 1 and bool((counts == counts[0, 0]).all())
        idx = mask_to_index(masks.level_targets[level])
        assert idx.dtype == torch.long and idx.shape == (b, m, int(counts[0, 0]))
    ctx_counts = masks.context.sum(-1)
    assert bool((ctx_counts == ctx_counts[0]).all()) and ctx_counts[0] >= 4
    assert mask_to_index(masks.context).shape == (b, int(ctx_counts[0]))
    assert mask_to_index(masks.targets).shape == (b, m, int(masks.targets[0, 0].sum()))


@pytest.mark.parametrize("mode", ("constant", "gentle"))
def test_context_never_overlaps_any_level_footprint(mode: str) -> None:
    sampler = MultiBlockMaskSampler(16, levels=3, target_scale=(0.04, 0.06), scale_mode=mode)
    g = gen(1)
    for _ in range(10):
        masks = sampler.sample(8, g)
        for blocks in masks.level_blocks:
            assert not (masks.context[:, None, :] & blocks).any()
        assert not (masks.context & ~masks.context_block).any()


@pytest.mark.parametrize("grid", [7, 8, 14])
def test_geometric_context_hides_only_level0_targets(grid: int) -> None:
    # The reviewed bug: coarse targets (x2, x4 the area) overlap the context. Hiding them too
    # would leave no context at all on small grids, so only level-0 targets are removed.
    sampler = MultiBlockMaskSampler(grid, levels=3, scale_mode="geometric")
    g, overlap = gen(15), 0
    for _ in range(20):
        masks = sampler.sample(16, g)  # must never raise for lack of context
        assert not (masks.context[:, None, :] & masks.targets).any()
        assert not (masks.context & ~masks.context_block).any()
        assert masks.context.sum(-1).min() >= 4
        overlap += int((masks.context[:, None, :] & masks.level_blocks[2]).sum())
    assert overlap > 0  # level-2 targets are (partly) visible to the context encoder


def test_target_blocks_are_rectangles_within_scale_bounds() -> None:
    # G=14, N=196, s in [0.15, 0.2] -> sN in [29.4, 39.2]; a in [0.75, 1.5]:
    # h = round(sqrt(sNa)) in [round(4.70), round(7.67)] = [5, 8]
    # w = round(sqrt(sN/a)) in [round(4.43), round(7.23)] = [4, 7]
    sampler = MultiBlockMaskSampler(14)
    g, areas = gen(2), []
    for _ in range(40):
        masks = sampler.sample(2, g)
        first = masks.targets[0, 0]
        _, _, h, w = bbox(first, 14)
        assert 5 <= h <= 8 and 4 <= w <= 7
        assert int(first.sum()) == h * w  # solid rectangle
        assert bool((masks.targets.sum(-1) == h * w).all())  # one size for the whole batch
        areas.append(h * w / 196)
    # Mean scale ~ 0.175; rounding moves the area by ~ +-sqrt(sN) tokens at most.
    assert 0.15 < sum(areas) / len(areas) < 0.2


@pytest.mark.parametrize(
    ("scale", "aspect", "hw"),
    [((0.25, 0.25), (1.0, 1.0), (7, 7)), ((0.25, 0.25), (2.0, 2.0), (10, 5))],
)
def test_fixed_scale_and_aspect_give_hand_computed_block(scale, aspect, hw) -> None:
    # 0.25 * 196 = 49: aspect 1 -> 7x7; aspect 2 -> sqrt(98)=9.9 -> 10, sqrt(24.5)=4.95 -> 5.
    masks = MultiBlockMaskSampler(14, levels=1, target_scale=scale, target_aspect=aspect).sample(
        3, gen()
    )
    for b in range(3):
        for m in range(4):
            assert bbox(masks.targets[b, m], 14)[2:] == hw


def test_context_block_is_square_within_its_scale_range() -> None:
    # 0.85 * 196 = 166.6 -> side round(12.9) = 13; 1.0 -> 14.  0.85 * 49 = 41.65 -> 6; 7.
    for grid, sides in [(14, {13, 14}), (7, {6, 7})]:
        sampler, g, seen = MultiBlockMaskSampler(grid, levels=1), gen(3), set()
        for _ in range(150):  # side 6 on 7x7 needs s < 0.862: ~8 % of draws
            block = sampler.sample(3, g).context_block
            for b in range(3):
                _, _, h, w = bbox(block[b], grid)
                assert h == w and int(block[b].sum()) == h * w
                seen.add(h)
        assert seen == sides


def test_first_and_last_rows_and_columns_are_reached() -> None:
    g = 14
    sampler = MultiBlockMaskSampler(g, levels=1, context_scale=(0.25, 0.3))
    gen_, t_hit, c_hit = (
        gen(4),
        torch.zeros(g, g, dtype=torch.bool),
        torch.zeros(g, g, dtype=torch.bool),
    )
    for _ in range(30):
        masks = sampler.sample(8, gen_)
        t_hit |= masks.targets.any(1).any(0).view(g, g)
        c_hit |= masks.context.any(0).view(g, g)
    for hit in (t_hit, c_hit):
        assert hit[0].any() and hit[-1].any() and hit[:, 0].any() and hit[:, -1].any()


def test_block_positions_are_uniform_over_all_valid_offsets() -> None:
    # 7x7 blocks on a 14x14 grid: top-left rows 0..7 (8 values), each with probability 1/8.
    sampler = MultiBlockMaskSampler(14, levels=1, target_scale=(0.25, 0.25), target_aspect=(1, 1))
    masks = sampler.sample(400, gen(5))
    tops = masks.targets.view(400, 4, 14, 14).any(-1).float().argmax(-1).flatten()
    freq = torch.bincount(tops, minlength=14).float() / tops.numel()
    assert bool((freq[:8] > 0.125 - 0.04).all()) and bool((freq[:8] < 0.125 + 0.04).all())
    assert freq[8:].sum() == 0
    # Blocks of one sample are placed independently: all four share a row only w.p. 1/8**3.
    same_row = (tops.view(400, 4) == tops.view(400, 4)[:, :1]).all(1).float().mean()
    assert same_row < 0.05


def test_same_seed_reproduces_and_different_seed_differs() -> None:
    sampler = MultiBlockMaskSampler(14, levels=3, scale_mode="gentle")
    a, b, c = (sampler.sample(6, gen(s)) for s in (7, 7, 8))
    for x, y in [(a.context, b.context), (a.targets, b.targets)]:
        assert torch.equal(x, y)
    for la, lb in zip(a.level_targets, b.level_targets):
        assert torch.equal(la, lb)
    assert not torch.equal(a.context, c.context) or not torch.equal(a.targets, c.targets)


@pytest.mark.parametrize("grid", [7, 8, 14])
def test_level_rule_matches_brute_force_reference(grid: int) -> None:
    g = gen(9)
    rects = MultiBlockMaskSampler(grid, levels=1, target_scale=(0.02, 0.3)).sample(6, g).targets
    noise = torch.rand(6, 4, grid * grid, generator=g) < 0.2
    single = torch.zeros(grid * grid, grid * grid, dtype=torch.bool)
    single[torch.arange(grid * grid), torch.arange(grid * grid)] = True  # one token each
    footprints = torch.cat([rects.flatten(0, 1), noise.flatten(0, 1), single])
    for level in range(1, (grid - 1).bit_length() + 1):  # every level down to the 1x1 grid
        got = footprint_to_level(footprints, grid, level)
        want = torch.stack([reference_cells(fp, grid, level) for fp in footprints])
        assert torch.equal(got, want)


def test_level_rule_hand_examples() -> None:
    fp = torch.zeros(8, 8, dtype=torch.bool)
    fp[0:3, 0] = True  # cell (0,0) has 2/4 tokens (qualifies), cell (1,0) has 1/4 (does not)
    assert footprint_to_level(fp.flatten(), 8, 1).nonzero().flatten().tolist() == [0]
    corner = torch.zeros(7, 7, dtype=torch.bool)
    corner[6, 6] = True  # the 1-token edge cell (3,3) of the ceil-pooled 4x4 grid, all covered
    assert footprint_to_level(corner.flatten(), 7, 1).nonzero().flatten().tolist() == [15]
    edge = torch.zeros(7, 7, dtype=torch.bool)
    edge[4:6, 4:7] = True  # 6 of the 12 tokens of level-2 cell (1,1) (rows 4-6, cols 4-6)
    assert footprint_to_level(edge.flatten(), 7, 2).nonzero().flatten().tolist() == [3]
    edge[5, 6] = False  # 5 of 12, less than half: the fallback still picks that cell alone
    assert footprint_to_level(edge.flatten(), 7, 2).nonzero().flatten().tolist() == [3]
    quarter = torch.zeros(8, 8, dtype=torch.bool)
    quarter[2, 5] = True  # 1/4 of cell (1,2): most covered although below half -> index 6
    assert footprint_to_level(quarter.flatten(), 8, 1).nonzero().flatten().tolist() == [6]


@pytest.mark.parametrize("mode", MODES)
def test_sampled_level_targets_follow_the_rule_and_are_never_empty(mode: str) -> None:
    sampler = MultiBlockMaskSampler(14, levels=3, target_scale=(0.05, 0.1), scale_mode=mode)
    masks = sampler.sample(6, gen(10))
    for level, (blocks, lt) in enumerate(zip(masks.level_blocks, masks.level_targets)):
        ref = torch.stack([reference_cells(fp, 14, level) for fp in blocks.flatten(0, 1)])
        ref = ref.view(6, 4, -1)
        assert not (lt & ~ref).any()  # truncation only drops cells
        assert bool((lt.sum(-1) == ref.sum(-1).min()).all())  # down to the global minimum
        assert lt.sum(-1).min() >= 1


def mean_area(sampler: MultiBlockMaskSampler, level: int, batches: int = 30) -> float:
    g = gen(11)
    return (
        sum(sampler.sample(2, g).level_blocks[level][0, 0].sum().item() for _ in range(batches))
        / batches
    )


def test_scale_modes_footprint_growth() -> None:
    constant = MultiBlockMaskSampler(16, levels=3).sample(4, gen())
    assert all(torch.equal(b, constant.targets) for b in constant.level_blocks)

    geometric = MultiBlockMaskSampler(
        16, levels=3, target_scale=(0.05, 0.06), num_targets=1, scale_mode="geometric"
    )
    areas = [mean_area(geometric, lv) for lv in range(3)]
    for lo, hi in zip(areas, areas[1:]):
        assert 1.7 < hi / lo < 2.3  # x2 per level

    gentle = MultiBlockMaskSampler(16, levels=4, num_targets=1, scale_mode="gentle")
    assert gentle.footprint_scale(2) == pytest.approx((0.20, 0.25))
    assert gentle.footprint_scale(3) == pytest.approx((0.22, 0.27))
    areas = [mean_area(gentle, lv) / 256 for lv in range(4)]
    # Expected mean scales 0.175, 0.205, 0.225, 0.245: growing, but far less than x2.
    for got, want in zip(areas, (0.175, 0.205, 0.225, 0.245)):
        assert got == pytest.approx(want, abs=0.02)
    assert areas[3] / areas[0] < 1.6


@pytest.mark.parametrize(
    ("kwargs", "text"),
    [
        ({"grid_size": 7, "levels": 0}, "at least 1 level"),
        ({"grid_size": 7, "levels": 5}, "use at most 4 levels"),  # 7, 4, 2, 1
        ({"grid_size": 3, "levels": 4}, "use at most 3 levels"),  # 3, 2, 1
        ({"grid_size": 14, "scale_mode": "linear"}, "geometric"),
        ({"grid_size": 14, "target_scale": (0.0, 0.2)}, "0 < min <= max"),
        ({"grid_size": 14, "target_scale": (0.3, 0.2)}, "0 < min <= max"),
        ({"grid_size": 14, "context_scale": (0.9, 1.1)}, "context_scale"),
        ({"grid_size": 14, "target_aspect": (2.0, 1.0)}, "target_aspect"),
        ({"grid_size": 14, "num_targets": 0}, "at least 1 target"),
        ({"grid_size": 14, "min_context": 0}, "min_context"),
    ],
)
def test_invalid_settings_raise_helpful_errors(kwargs, text) -> None:
    with pytest.raises(ValueError, match=text):
        MultiBlockMaskSampler(**kwargs)


def test_impossible_settings_raise_at_sampling() -> None:
    # Every 7x7 target block covers the whole grid, so no draw can leave a context.
    sampler = MultiBlockMaskSampler(7, levels=1, target_scale=(1.0, 1.0), target_aspect=(1, 1))
    with pytest.raises(ValueError, match="lower num_targets or target_scale"):
        sampler.sample(4, gen())


def test_min_context_is_enforced_by_resampling() -> None:
    # 5x5 context (25 tokens) minus four ~2x3 targets: about 1 draw in 3 keeps < 8 tokens.
    kwargs = {"levels": 1, "context_scale": (0.5, 0.5), "min_context": 8}
    sampler = MultiBlockMaskSampler(7, **kwargs)
    g = gen(12)
    for _ in range(20):
        masks = sampler.sample(8, g)
        assert masks.context.sum(-1).min() >= 8
        assert not (masks.context[:, None] & masks.targets).any()  # redrawn rows stay consistent
        assert not (masks.context & ~masks.context_block).any()
    # The same settings without the floor do drop below 8, so the retries were exercised.
    loose = MultiBlockMaskSampler(7, **{**kwargs, "min_context": 1})
    assert min(int(loose.sample(8, g).context.sum(-1).min()) for _ in range(20)) < 8


def test_mask_to_index_round_trip_and_errors() -> None:
    scores = torch.rand(3, 5, 20, generator=gen(13))
    mask = torch.zeros(3, 5, 20, dtype=torch.bool).scatter_(-1, scores.topk(6).indices, True)
    idx = mask_to_index(mask)
    assert idx.shape == (3, 5, 6) and idx.dtype == torch.long
    assert bool((idx[..., 1:] > idx[..., :-1]).all())
    rebuilt = torch.zeros_like(mask).scatter_(-1, idx, True)
    assert torch.equal(rebuilt, mask)
    mask[0, 0, mask[0, 0].nonzero()[0]] = False
    with pytest.raises(ValueError, match="same number"):
        mask_to_index(mask)
    with pytest.raises(ValueError, match="bool"):
        mask_to_index(mask.long())


def dropped_in_first_half(candidates: torch.Tensor, kept: torch.Tensor) -> tuple[int, int]:
    """Among rows' candidate tokens (index order), count dropped ones in the first half."""
    first, total = 0, 0
    for cand, keep in zip(candidates.flatten(0, -2), kept.flatten(0, -2)):
        idx = cand.nonzero().flatten()
        dropped = ~keep[idx]
        first += int(dropped[: len(idx) // 2].sum())
        total += int(dropped.sum())
    return first, total


def test_truncation_keeps_a_random_subset_not_the_first_k() -> None:
    sampler = MultiBlockMaskSampler(14, levels=2)
    g, ctx, lvl = gen(14), [0, 0], [0, 0]
    for _ in range(10):
        masks = sampler.sample(16, g)
        covered = masks.targets.any(1)
        a = dropped_in_first_half(masks.context_block & ~covered, masks.context)
        b = dropped_in_first_half(footprint_to_level(masks.targets, 14, 1), masks.level_targets[1])
        ctx, lvl = [ctx[0] + a[0], ctx[1] + a[1]], [lvl[0] + b[0], lvl[1] + b[1]]
    # First-k would drop only from the second half (fraction 0); random drops are ~ half-half.
    for first, total in (ctx, lvl):
        assert total > 100 and 0.35 < first / total < 0.65


def test_mask_batch_to_moves_every_tensor() -> None:
    masks = MultiBlockMaskSampler(7, levels=2).sample(2, gen())
    moved = masks.to("cpu")
    assert isinstance(moved, MaskBatch)
    assert torch.equal(moved.context, masks.context) and len(moved.level_targets) == 2
    assert math.isclose(float(moved.context_block.sum()), float(masks.context_block.sum()))
