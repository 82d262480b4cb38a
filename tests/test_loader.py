"""EpochLoader: permutations, determinism, resume, sharding, worker path with skipped samples."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hjepa.data.image_folder import ImageFolder
from hjepa.data.loader import EpochLoader
from hjepa.data.tensors import ImageTensors


def indexed(n: int) -> ImageTensors:
    """Image i is filled with i % 256 and labelled i: a batch reveals which samples it holds."""
    images = (torch.arange(n) % 256).to(torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).clone()
    return ImageTensors(images, torch.arange(n), num_classes=n)


def epoch_labels(loader: EpochLoader, epoch: int, start_batch: int = 0) -> list[list[int]]:
    return [labels.tolist() for _, labels in loader.iter_epoch(epoch, start_batch)]


def test_epoch_is_a_permutation_and_images_match_labels() -> None:
    data = indexed(23)
    loader = EpochLoader(data, 5, seed=0)
    assert len(loader) == 4  # 23 // 5, the last 3 samples of the order dropped
    batches = list(loader.iter_epoch(0))
    seen = torch.cat([labels for _, labels in batches])
    assert len(seen) == 20 and len(set(seen.tolist())) == 20
    assert all(
        images.shape == (5, 1, 2, 2) and images.dtype == torch.uint8 for images, _ in batches
    )
    for images, labels in batches:
        assert torch.equal(images[:, 0, 0, 0].long(), labels % 256)
    # Without drop_last every sample comes exactly once, in a final short batch.
    full = EpochLoader(data, 5, seed=0, drop_last=False)
    labels = sum(epoch_labels(full, 3), [])
    assert len(full) == 5 and sorted(labels) == list(range(23))


def test_same_seed_same_order_different_epochs_and_seeds_differ() -> None:
    data = indexed(64)
    a = EpochLoader(data, 8, seed=1)
    b = EpochLoader(data, 8, seed=1)
    assert epoch_labels(a, 2) == epoch_labels(b, 2)
    # Order of epoch 2 does not depend on having iterated epochs 0 and 1 first.
    list(a.iter_epoch(0))
    list(a.iter_epoch(1))
    assert epoch_labels(a, 2) == epoch_labels(b, 2)
    assert epoch_labels(a, 2) != epoch_labels(a, 3)
    assert epoch_labels(a, 2) != epoch_labels(EpochLoader(data, 8, seed=2), 2)


def test_start_batch_resumes_the_tail_exactly() -> None:
    loader = EpochLoader(indexed(50), 7, seed=3)
    full = epoch_labels(loader, 4)
    assert epoch_labels(loader, 4, start_batch=3) == full[3:]
    assert epoch_labels(loader, 4, start_batch=len(loader)) == []
    with pytest.raises(ValueError, match="start_batch"):
        list(loader.iter_epoch(4, start_batch=len(loader) + 1))


def test_ranks_are_disjoint_and_cover_the_single_rank_epoch() -> None:
    data = indexed(41)
    single = EpochLoader(data, 4, seed=5)
    ranks = [EpochLoader(data, 4, seed=5, rank=r, world_size=2) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 5  # 41 // 2 = 20 samples each
    per_rank = [set(sum(epoch_labels(r, 1), [])) for r in ranks]
    assert not per_rank[0] & per_rank[1]
    # Both ranks slice the same permutation as a single process: the union is the first
    # 40 of its 41 positions.
    order = single.indices(1).tolist()
    assert per_rank[0] | per_rank[1] == set(order[:40])
    assert set(ranks[0].indices(1).tolist()) == set(order[0:40:2])


def test_batch_larger_than_dataset_per_rank() -> None:
    with pytest.raises(ValueError, match="batch_size 11 is larger"):
        EpochLoader(indexed(10), 11, seed=0)
    with pytest.raises(ValueError, match="larger"):
        EpochLoader(indexed(10), 6, seed=0, world_size=2)
    with pytest.raises(ValueError, match="rank"):
        EpochLoader(indexed(10), 2, seed=0, rank=2, world_size=2)


def test_global_rng_untouched() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    list(EpochLoader(indexed(20), 4, seed=0).iter_epoch(0))
    assert torch.equal(torch.rand(3), expected)


def make_image_folder(root: Path, n_good: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(n_good):
        folder = root / "train" / f"c{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((6, 6, 3), i, dtype=np.uint8)).save(folder / f"{i:02d}.png")
    (root / "train" / "c0" / "zz_bad.png").write_bytes(rng.bytes(64))
    (root / "val" / "c0").mkdir(parents=True)  # a held-out folder: train/ is read whole


@pytest.mark.parametrize("num_workers", [0, 1])
def test_worker_path_drops_and_counts_unreadable(tmp_path: Path, num_workers: int) -> None:
    make_image_folder(tmp_path, n_good=11)
    data = ImageFolder(tmp_path, "train", image_size=4)
    assert len(data) == 12
    loader = EpochLoader(data, 4, seed=0, num_workers=num_workers, pin_memory=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the corrupt file's warning (tested elsewhere)
        for epoch in range(2):
            batches = list(loader.iter_epoch(epoch))
            images = torch.cat([b[0] for b in batches])
            labels = torch.cat([b[1] for b in batches])
            assert images.shape == (11, 3, 4, 4) and torch.all(labels >= 0)
            # Each image is uniform with value = its index i, class i % 2.
            assert sorted(images[:, 0, 0, 0].tolist()) == list(range(11))
            assert torch.equal(labels, images[:, 0, 0, 0].long() % 2)
            assert loader.skipped == epoch + 1
    # Same order as an in-memory dataset of the same size would get.
    order = loader.indices(0)
    bad = next(i for i in range(len(data)) if data.path(i).endswith("zz_bad.png"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = [data.path(int(i)) for i in order if int(i) != bad]
        first = torch.cat([b[0] for b in loader.iter_epoch(0)])[:, 0, 0, 0].tolist()
    assert [int(Path(p).stem) for p in got] == first
