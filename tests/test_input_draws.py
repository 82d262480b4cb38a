"""The masks and first-view crops of a micro-batch are drawn ahead, by number, in DataLoader
workers (or in process): exactly the draws the step made itself, whatever the number of
workers, the dataset kind, or where a run resumes."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from hjepa.config import load_config
from hjepa.data.loader import draws_ahead
from hjepa.models.hjepa import MaskIndices
from hjepa.train.inputs import PreparedInputs, Stream, step_seed
from hjepa.train.parts import build_inputs, build_parts, mask_preparer
from hjepa.train.trainer import Trainer
from tests.conftest import TINY

FOLDER_TINY = [i for i in TINY if not i.startswith(("data.channels=", "data.synthetic_size="))]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Eight 24 x 40 RGB images of two classes in train/, two in val/."""
    root = tmp_path_factory.mktemp("draws")
    rng = np.random.default_rng(0)
    for split, numbers in (("train", range(8)), ("val", range(8, 10))):
        for n in numbers:
            (root / split / f"c{n % 2}").mkdir(parents=True, exist_ok=True)
            pixels = rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / split / f"c{n % 2}" / f"{n}.png")
    return root


def _config(tmp_path, kind: str, folder=None, *extra: str):
    if kind == "in_memory":
        return load_config(None, [*TINY, f"run.dir={tmp_path / 'run'}", *extra])
    return load_config(
        None,
        [
            *FOLDER_TINY,
            f"run.dir={tmp_path / 'run'}",
            "data.name=image_folder",
            f"data.root={folder}",
            "data.image_size=16",
            "train.batch_size=4",
            "train.knn_bank_size=0",
            "train.knn_query_size=0",
            "eval.knn_k=3",
            *extra,
        ],
    )


def _trainer(cfg, draw_workers: int) -> Trainer:
    parts = build_parts(cfg)
    inputs = build_inputs(cfg, parts.data, parts.env, parts.device, draw_workers=draw_workers)
    return Trainer(cfg, parts=dataclasses.replace(parts, inputs=inputs))


def _assert_same_masks(a: MaskIndices, b: MaskIndices) -> None:
    for field in dataclasses.fields(MaskIndices):
        x, y = getattr(a, field.name), getattr(b, field.name)
        if isinstance(x, list):
            assert len(x) == len(y) and all(torch.equal(s, t) for s, t in zip(x, y)), field.name
        else:
            assert (x is None and y is None) or torch.equal(x, y), field.name


def _kept(trainer: Trainer, count: int) -> list[tuple[int, torch.Tensor, PreparedInputs]]:
    """The first ``count`` micro-batches the trainer's producer yields, with the draws it hands
    to the pipeline for each."""
    kept: list[PreparedInputs] = []
    keep = trainer.inputs.keep
    trainer.inputs.keep = lambda prepared: (kept.append(prepared), keep(prepared))
    batches = trainer.batches()
    out = [(*next(batches), kept[-1]) for _ in range(count)]
    del trainer.inputs.keep
    return out


@pytest.mark.parametrize("kind", ["in_memory", "folder"])
@pytest.mark.parametrize("workers", [0, 1])
def test_the_drawn_masks_are_the_steps_own_draw(tmp_path, folder, kind, workers):
    cfg = _config(tmp_path, kind, folder)
    trainer = _trainer(cfg, workers)
    reference = mask_preparer(cfg, cfg.train.batch_size)  # the draw the audit and tests use
    # From micro-batch 3 on, across an epoch end of the folder (2 per epoch), as a resume does.
    trainer.load_state_dict({**trainer.state_dict(), "step": 3})
    for micro, images, prepared in _kept(trainer, 4):
        assert prepared.micro == micro and prepared.batch == images.shape[0]
        _assert_same_masks(prepared.masks, reference(micro))
        # In-memory images are cut by the pipeline: their crop is drawn ahead too, from the
        # crop stream, as the in-process augmentation draws it; a folder's workers cut theirs.
        assert (prepared.crop is not None) == (kind == "in_memory")
        if prepared.crop is not None:
            gen = torch.Generator().manual_seed(step_seed(cfg.train.seed, micro, Stream.CROP_FLIP))
            boxes, flip = trainer.inputs.augment.draw(len(images), *images.shape[2:], gen)
            assert torch.equal(prepared.crop[0], boxes) and torch.equal(prepared.crop[1], flip)
            assert prepared.image_hw == tuple(images.shape[2:])


@pytest.mark.parametrize("kind", ["in_memory", "folder"])
def test_inputs_from_worker_draws_equal_the_in_process_inputs(tmp_path, folder, kind):
    cfg = _config(tmp_path, kind, folder)
    drawn_ahead, drawing_itself = _trainer(cfg, 1), _trainer(cfg, 0)
    for micro, images, _ in _kept(drawn_ahead, 3):
        x, index, _ = drawn_ahead.inputs(images, micro)  # takes what the worker drew
        x_self, index_self, _ = drawing_itself.inputs(images, micro)  # nothing kept: draws
        assert torch.equal(x, x_self)
        _assert_same_masks(index, index_self)


def test_a_resumed_run_gets_the_same_draws_mid_epoch_and_across_epochs(tmp_path):
    cfg = _config(tmp_path, "in_memory", None, "data.synthetic_size=64")  # 4 micro-batches
    uninterrupted = _kept(_trainer(cfg, 0), 7)
    resumed_trainer = _trainer(cfg, 1)  # fresh workers, as a resumed run builds them
    resumed_trainer.load_state_dict({**resumed_trainer.state_dict(), "step": 2})  # mid-epoch
    resumed = _kept(resumed_trainer, 5)  # micro-batches 2..6: into the second epoch
    for (micro, images, prepared), again in zip(uninterrupted[2:], resumed, strict=True):
        assert again[0] == micro and again[2].micro == micro
        assert torch.equal(again[1], images)
        _assert_same_masks(again[2].masks, prepared.masks)
        assert all(torch.equal(a, b) for a, b in zip(again[2].crop, prepared.crop, strict=True))


def test_draws_ahead_serves_numbers_in_order_from_any_start():
    for workers in (0, 2):
        drawn = draws_ahead(lambda micro: micro * micro, 5, workers)
        assert [next(drawn) for _ in range(6)] == [25, 36, 49, 64, 81, 100]
    with pytest.raises(ValueError, match="workers must be >= 0"):
        draws_ahead(abs, 0, -1)
