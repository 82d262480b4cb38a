"""Training on an image folder reads I-JEPA's random resized crop of the *whole* image, drawn in
the loader's workers from seeds that depend only on the run seed, the micro-batch and the
image's place in the global batch; evaluation keeps the centre square.

The generated images are 48 x 24 (twice as wide as high): red = 5 x column, green = 10 x row,
blue = 20 x image number + 10, so a pixel says where it came from and a batch row says which
image it is (blue is constant over an image, and resizing keeps it)."""

import numpy as np
import pytest
import torch
from PIL import Image

from hjepa.config import load_config
from hjepa.data.augment import to_float
from hjepa.data.datasets import dataset_from_config
from hjepa.data.loader import EpochLoader
from hjepa.eval.features import iter_batches
from hjepa.train.trainer import Trainer
from tests.conftest import TINY

W, H, SIZE, IMAGES = 48, 24, 16, 8
#: The centre square is columns 12..35: red 60..175.
CENTRE_RED = (5 * (W - H) // 2, 5 * ((W + H) // 2 - 1))
FOLDER_TINY = [i for i in TINY if not i.startswith(("data.channels=", "data.synthetic_size="))]


def picture(number: int) -> np.ndarray:
    x = np.arange(W)[None, :].repeat(H, 0)
    y = np.arange(H)[:, None].repeat(W, 1)
    blue = np.full_like(x, 20 * number + 10)
    return np.stack([5 * x, 10 * y, blue], -1).astype(np.uint8)


def number_of(image: torch.Tensor) -> int:
    return (int(image[2, 0, 0]) - 10) // 20


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("wide")
    for split, numbers in (("train", range(IMAGES)), ("val", range(IMAGES, IMAGES + 2))):
        for n in numbers:
            folder = root / split / f"c{n % 2}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(picture(n)).save(folder / f"{n:02d}.png")
    return root


def config(tmp_path, root, *extra):
    return load_config(
        None,
        [
            *FOLDER_TINY,
            f"run.dir={tmp_path / 'run'}",
            "data.name=image_folder",
            f"data.root={root}",
            f"data.image_size={SIZE}",
            "train.batch_size=4",
            "train.knn_bank_size=0",
            "train.knn_query_size=0",
            "eval.knn_k=3",
            *extra,
        ],
    )


def first_batches(trainer: Trainer, count: int) -> list[tuple[int, torch.Tensor]]:
    batches = trainer.batches()
    return [next(batches) for _ in range(count)]


def whole_image(number: int) -> torch.Tensor:
    resized = Image.fromarray(picture(number)).resize((SIZE, SIZE), Image.Resampling.BILINEAR)
    return torch.from_numpy(np.asarray(resized).copy()).permute(2, 0, 1)


def centre_view(number: int) -> torch.Tensor:
    centre = Image.fromarray(picture(number)[:, (W - H) // 2 : (W + H) // 2])
    resized = centre.resize((SIZE, SIZE), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(resized).copy()).permute(2, 0, 1)


def test_a_full_scale_crop_at_the_images_aspect_is_the_whole_image_resized(tmp_path, root):
    whole = ["data.crop_scale=[1.0, 1.0]", "data.crop_ratio=[2.0, 2.0]", "data.hflip=0"]
    trainer = Trainer(config(tmp_path, root, *whole))
    assert trainer.loader.serves_train_crops and trainer.inputs.cropped_in_loader
    for micro, images in first_batches(trainer, 2):
        assert images.shape == (4, 3, SIZE, SIZE)
        expected = torch.stack([whole_image(number_of(image)) for image in images])
        assert torch.equal(images, expected)
        # The batch is not cropped again: the view both encoders see is the batch, normalised.
        view, _, _ = trainer.inputs(images, micro)
        mean, std = trainer.mean.flatten().tolist(), trainer.std.flatten().tolist()
        assert torch.equal(view, to_float(images, mean, std))


def test_training_crops_reach_outside_the_centre_square(tmp_path, root):
    trainer = Trainer(config(tmp_path, root, "train.max_steps=4"))
    red = torch.cat([images[:, 0] for _, images in first_batches(trainer, 4)])
    outside = (red < CENTRE_RED[0] - 5) | (red > CENTRE_RED[1] + 5)
    assert outside.any(), "every training view stayed inside the centre square"


def test_the_crops_are_the_same_with_any_number_of_workers_and_across_a_resume(tmp_path, root):
    run = [config(tmp_path / str(w), root, f"train.num_workers={w}") for w in (0, 2)]
    uninterrupted = first_batches(Trainer(run[0]), 6)  # 3 epochs of 2 micro-batches
    numbers = [[number_of(image) for image in images] for _, images in uninterrupted[:1]][0]
    centre = torch.stack([centre_view(n) for n in numbers])
    assert not torch.equal(uninterrupted[0][1], centre), "the batch is the evaluation view"
    with_workers = first_batches(Trainer(run[1]), 6)
    resumed_trainer = Trainer(run[1])  # a fresh loader and workers, as a resumed run builds
    resumed_trainer.load_state_dict({**resumed_trainer.state_dict(), "step": 3})  # a checkpoint
    resumed = first_batches(resumed_trainer, 3)
    for (micro, images), other in zip(uninterrupted, with_workers, strict=True):
        assert other[0] == micro and torch.equal(other[1], images)
    for (micro, images), other in zip(uninterrupted[3:], resumed, strict=True):
        assert other[0] == micro and torch.equal(other[1], images)


def test_each_rank_gets_the_crops_its_rows_get_in_one_process(tmp_path, root):
    train = dataset_from_config(config(tmp_path, root), "train")
    single = EpochLoader(train, 4, seed=7, pin_memory=False)
    ranks = [EpochLoader(train, 2, seed=7, rank=r, world_size=2, pin_memory=False) for r in (0, 1)]
    for epoch in (0, 1):
        one = list(single.iter_epoch(epoch))
        per_rank = [list(loader.iter_epoch(epoch)) for loader in ranks]
        for b, (images, _) in enumerate(one):  # rank r holds rows r, r + 2 of the global batch
            for r in (0, 1):
                assert torch.equal(per_rank[r][b][0], images[r::2])
    numbers = [number_of(image) for image in one[0][0]]
    assert not torch.equal(one[0][0], torch.stack([centre_view(n) for n in numbers]))


def test_evaluation_reads_the_centre_square_of_both_splits(tmp_path, root):
    cfg = config(tmp_path, root)
    train, test = dataset_from_config(cfg, "train"), dataset_from_config(cfg, "test")
    assert train.serves_train_crops and not test.serves_train_crops
    for dataset in (train, test):
        for images, _ in iter_batches(dataset, 4):
            expected = torch.stack([centre_view(number_of(image)) for image in images])
            assert torch.equal(images, expected)


def test_multicrop_second_view_and_deit3_train_on_the_workers_crops(tmp_path, root):
    extra = ["data.multicrop.num_local=2", "data.multicrop.local_size=8", "loss.contrastive=true"]
    extra += [
        "data.augment.three_augment=0.5",
        "data.augment.color_jitter=0.3",
        "train.max_steps=1",
    ]
    trainer = Trainer(config(tmp_path, root, *extra))
    assert trainer.inputs.cropped_in_loader
    ((micro, images),) = first_batches(trainer, 1)
    _, _, local_views = trainer.inputs(images, micro)
    second = trainer.inputs.second_view(images, micro)
    assert local_views.shape == (2 * 4, 3, 8, 8) and second.shape == (4, 3, SIZE, SIZE)
    # The second view is cropped again on the batch: not the training view merely normalised.
    mean, std = trainer.mean.flatten().tolist(), trainer.std.flatten().tolist()
    assert not torch.equal(second, to_float(images, mean, std))
    assert torch.isfinite(torch.tensor(trainer.fit()["loss"]))
