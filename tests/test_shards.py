"""``hjepa data prepare``: an image folder as WebDataset shards, read back by ImageFolder as the
same images, labels, class index and split as the folder it came from."""

import json
import sys
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from hjepa.cli import main
from hjepa.data.datasets import build_dataset, dataset_record
from hjepa.data.decode import RandomResizedCrop
from hjepa.data.image_folder import CropKey, ImageFolder
from hjepa.data.shards import prepare


def _image(rng, gray: bool = False) -> Image.Image:
    w, h = int(rng.integers(20, 50)), int(rng.integers(20, 50))
    array = rng.integers(0, 256, (h, w) if gray else (h, w, 3), dtype=np.uint8)
    return Image.fromarray(array)


def _folder(root, splits=("train", "val"), per_class=3):
    """Classes b and a (listed out of order), JPEGs and PNGs of several sizes."""
    rng = np.random.default_rng(0)
    for split in splits:
        for name in ("b", "a"):
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                ext = "png" if i == 1 else "jpg"
                _image(rng).save(root / split / name / f"{split}{i}.{ext}")
    return root


def _same(folder: ImageFolder, shards: ImageFolder) -> None:
    assert shards.classes == folder.classes and len(shards) == len(folder)
    assert torch.equal(shards.labels, folder.labels)
    assert shards.channels == folder.channels and shards.file_channels == folder.file_channels
    for i in range(len(folder)):
        assert torch.equal(shards[i][0], folder[i][0])  # the evaluation view
        key = CropKey(i, 100 + i)  # the training view
        assert torch.equal(shards[key][0], folder[key][0])


@pytest.mark.parametrize("layout", ["folders", "held_out"])
def test_a_prepared_shard_set_serves_what_its_folder_serves(tmp_path, layout):
    splits = ("train", "val") if layout == "folders" else ("train",)
    src = _folder(tmp_path / "src", splits, per_class=4)
    fraction = {"val_fraction": 0.25} if layout == "held_out" else {}
    manifest = prepare(src, tmp_path / "dst", shard_bytes=5_000, **fraction)
    assert manifest["classes"] == ["a", "b"] and manifest["source"]["layout"] == layout
    assert len(list((tmp_path / "dst").glob("train-*.tar"))) > 1  # several shards
    options = {"image_size": 12, "train_crop": RandomResizedCrop(flip_prob=0.5)}
    for split in ("train", "test"):
        folder = ImageFolder(src, split, **options, **fraction)
        shards = ImageFolder(tmp_path / "dst", split, **options, **fraction)
        _same(folder, shards)
        saved, now = dataset_record(folder), dataset_record(shards)
        assert saved.pop("root") != now.pop("root") and now.pop("shards") == "webdataset"
        assert saved == now  # classes, layout, counts, held-out files


def test_the_shards_are_webdataset_samples_holding_the_files_unchanged(tmp_path):
    src = _folder(tmp_path / "src")
    prepare(src, tmp_path / "dst")
    folder = ImageFolder(src, "train", image_size=8)
    with tarfile.open(tmp_path / "dst" / "train-000000.tar") as tar:
        names = tar.getnames()
        assert names[:2] == ["00000000.cls", "00000000.jpg"] and len(names) == 2 * len(folder)
        for i in range(len(folder)):
            path = folder.path(i)
            ext = path.rsplit(".", 1)[1]
            with open(path, "rb") as original:
                assert tar.extractfile(f"{i:08d}.{ext}").read() == original.read()
            assert int(tar.extractfile(f"{i:08d}.cls").read()) == int(folder.labels[i])


def test_a_class_subset_is_applied_when_preparing_and_checked_when_reading(tmp_path):
    src = _folder(tmp_path / "src")
    (tmp_path / "only_b.txt").write_text("b\n")
    subset = str(tmp_path / "only_b.txt")
    prepare(src, tmp_path / "dst", class_subset=subset)
    ds = build_dataset(
        "image_folder", str(tmp_path / "dst"), "train", image_size=8, class_subset=subset
    )
    assert ds.classes == ["b"] and len(ds) == 3
    with pytest.raises(ValueError, match="was prepared with class subset"):
        ImageFolder(tmp_path / "dst", "train", image_size=8)


def test_prepare_refuses_a_folder_that_is_not_empty(tmp_path):
    src = _folder(tmp_path / "src")
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="is not empty"):
        prepare(src, tmp_path / "dst")


def test_hjepa_data_prepare_writes_shards_and_says_how_to_train_on_them(tmp_path, capsys):
    src = _folder(tmp_path / "src")
    assert main(["data", "prepare", str(src), str(tmp_path / "dst")]) == 0
    out = capsys.readouterr().out
    assert f"data.root={tmp_path / 'dst'}" in out
    assert json.loads((tmp_path / "dst" / "shards.json").read_text())["images"] == {
        "train": 6,
        "test": 6,
    }
    assert main(["data", "prepare", str(src)]) == 2  # DST missing: a one-line error
    assert "usage: hjepa data prepare SRC DST" in capsys.readouterr().err


def test_a_missing_webdataset_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "webdataset", None)
    src = _folder(tmp_path / "src")
    assert main(["data", "prepare", str(src), str(tmp_path / "dst")]) == 2
    assert "pip install 'hjepa[shards]'" in capsys.readouterr().err
