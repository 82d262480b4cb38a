"""A researcher's own image folder: a held-out split that never overlaps training, channels that
follow the files, one class index for both splits recorded in the run dir, rows that trace back
to files, and counts of readable images only."""

from __future__ import annotations

import json
import shutil
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hjepa.cli import main
from hjepa.config import ConfigError, load_config
from hjepa.data import image_folder
from hjepa.data.datasets import build_dataset
from hjepa.data.image_folder import ImageFolder
from hjepa.train.recipe import config_diff
from hjepa.train.trainer import Trainer
from tests.conftest import TINY

PER_CLASS = 28  # two classes: 56 images, round(0.1 * 28) = 3 of each held out


def write_images(folder: Path, count: int, *, gray: bool = False, seed: int = 0, start: int = 0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(start, start + count):
        shape = (16, 16) if gray else (16, 16, 3)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(folder / f"{i:02d}.png")


def flat_folder(root: Path, *, gray: bool = False, classes=("cat", "dog")) -> Path:
    for seed, name in enumerate(classes):
        write_images(root / name, PER_CLASS, gray=gray, seed=seed)
    return root


def paths(dataset: ImageFolder) -> list[str]:
    return [dataset.path(i) for i in range(len(dataset))]


def relative(dataset: ImageFolder, root: Path) -> set[str]:
    return {Path(p).relative_to(root).as_posix() for p in paths(dataset)}


# -- 1. a folder without val/ is split, never evaluated on its own training images ------------


def test_a_folder_without_val_holds_out_a_stratified_split_that_depends_on_names_only(tmp_path):
    root = flat_folder(tmp_path / "flat")
    train = ImageFolder(root, "train", image_size=8)
    test = ImageFolder(root, "test", image_size=8)
    assert not set(paths(train)) & set(paths(test))
    assert len(set(paths(train)) | set(paths(test))) == 2 * PER_CLASS
    assert Counter(test.labels.tolist()) == {0: 3, 1: 3}  # stratified: 0.1 of each class
    assert test.index.layout == "held_out" and "0.1 of each class" in test.index.describe()
    # No seed, no machine: the same names give the same split wherever the folder lives.
    copy = Path(shutil.copytree(root, tmp_path / "elsewhere"))
    assert relative(ImageFolder(copy, "test", image_size=8), copy) == relative(test, root)
    # A larger share holds out more of each class, the smaller share's files among them.
    wider = ImageFolder(root, "test", image_size=8, val_fraction=0.25)
    assert Counter(wider.labels.tolist()) == {0: 7, 1: 7}
    assert set(paths(test)) < set(paths(wider))
    # train/ alone (no val/) is split the same way.
    write_images(tmp_path / "only" / "train" / "cat", 10)
    write_images(tmp_path / "only" / "train" / "dog", 10, seed=1)
    held = ImageFolder(tmp_path / "only", "test", image_size=8)
    assert len(held) == 2 and not set(paths(held)) & set(
        paths(ImageFolder(tmp_path / "only", "train", image_size=8))
    )


def test_val_fraction_is_refused_where_it_cannot_act(tmp_path):
    write_images(tmp_path / "split" / "train" / "cat", 4)
    write_images(tmp_path / "split" / "val" / "cat", 2)
    with pytest.raises(ValueError, match="val_fraction=0.2 has nothing to split"):
        ImageFolder(tmp_path / "split", "train", image_size=8, val_fraction=0.2)
    with pytest.raises(ConfigError, match="data.val_fraction"):
        load_config(None, [*TINY, "data.val_fraction=0.2"])  # synthetic data has a test split
    with pytest.raises(ValueError, match=r"val_fraction must be in \(0, 0.5\], got 0.7"):
        ImageFolder(tmp_path / "split" / "train", "train", image_size=8, val_fraction=0.7)


def test_hjepa_data_says_how_the_folder_is_split_and_counts_readable_images(tmp_path, capsys):
    root = flat_folder(tmp_path / "flat")
    (root / "cat" / "broken.png").write_bytes(b"not a png")
    (root / "dog" / "empty.jpg").write_bytes(b"")
    assert main(["data", "image_folder", "--root", str(root)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert "0.1 of each class held out" in report["split"]
    train, test = report["train"], report["test"]
    assert train["images"] + test["images"] == 2 * PER_CLASS  # the two broken files: not images
    assert train["unreadable"] + test["unreadable"] == 2
    named = train["unreadable_files"] + test["unreadable_files"]
    assert sorted(Path(p).name for p in named) == ["broken.png", "empty.jpg"]
    assert train["channels"] == 3 and "grayscale" in train["colour"]
    # A folder with val/ says so.
    write_images(tmp_path / "split" / "train" / "cat", 3)
    write_images(tmp_path / "split" / "val" / "cat", 2)
    assert main(["data", "image_folder", "--root", str(tmp_path / "split")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert "val/" in report["split"] and report["test"]["images"] == 2


# -- 2. channels follow the images ------------------------------------------------------------


#: TINY without its synthetic-data keys; data.channels stays at its default.
FOLDER_TINY = [i for i in TINY if not i.startswith(("data.channels=", "data.synthetic_size="))]


def folder_config(tmp_path: Path, root: Path, *extra: str):
    """A tiny run on ``root``."""
    return load_config(
        None,
        [
            *FOLDER_TINY,
            f"run.dir={tmp_path / 'run'}",
            "data.name=image_folder",
            f"data.root={root}",
            "data.image_size=16",
            "train.max_steps=1",
            "train.knn_bank_size=0",
            "train.knn_query_size=0",
            "eval.knn_k=3",
            *extra,
        ],
    )


def test_an_rgb_folder_trains_in_colour_and_the_run_records_three_channels(tmp_path):
    cfg = folder_config(tmp_path, flat_folder(tmp_path / "flat"))
    trainer = Trainer(cfg)
    assert trainer.channels == 3 and trainer.model.context_encoder.state_dict()
    trainer.fit()
    stored = (tmp_path / "run" / "config.yaml").read_text()
    assert "channels: 3" in stored and "channels: 0" not in stored


def test_a_grayscale_folder_stays_one_channel_and_a_mixed_one_is_rgb_with_a_warning(tmp_path):
    gray = flat_folder(tmp_path / "gray", gray=True)
    assert ImageFolder(gray, "train", image_size=8).channels == 1
    assert build_dataset("image_folder", str(gray), "train", image_size=8).channels == 1
    mixed = tmp_path / "mixed"
    write_images(mixed / "train" / "cat", 4)
    write_images(mixed / "train" / "cat", 2, gray=True, start=4)
    write_images(mixed / "val" / "cat", 2)
    with pytest.warns(UserWarning, match=r"2 grayscale and 4 colour images: it is read as RGB"):
        data = ImageFolder(mixed, "train", image_size=8)
    assert data.channels == 3
    image, _ = data[4]
    assert image.shape == (3, 8, 8) and (image[0] == image[1]).all()  # grey repeated


def test_a_colour_image_the_header_sample_missed_is_named_when_read(tmp_path, monkeypatch):
    monkeypatch.setattr(image_folder, "MODE_SAMPLE", 2)  # large folders: a spread of headers
    write_images(tmp_path / "data" / "train" / "cat", 4, gray=True)
    write_images(tmp_path / "data" / "train" / "cat", 1, start=4)  # 04.png, colour, not read
    write_images(tmp_path / "data" / "val" / "cat", 1, gray=True)
    data = ImageFolder(tmp_path / "data", "train", image_size=8)
    assert data.channels == 1 and "(headers of 2 of 5 images)" in data.file_channels.describe()
    with pytest.warns(UserWarning, match=r"04.png is a colour image .*: set data.channels=3"):
        data[4]


@pytest.mark.parametrize(("gray", "channels"), [(False, 1), (True, 3)])
def test_a_data_channels_the_files_contradict_is_refused(tmp_path, capsys, gray, channels):
    root = flat_folder(tmp_path / "data", gray=gray)
    with pytest.raises(ConfigError, match=f"data.channels={channels} contradicts the images"):
        Trainer(folder_config(tmp_path, root, f"data.channels={channels}"))
    # The CLI: one line, nothing written.
    args = ["train", *FOLDER_TINY, f"run.dir={tmp_path / 'cli'}", "data.name=image_folder"]
    args += [f"data.root={root}", "data.image_size=16", f"data.channels={channels}"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "leave data.channels=0 to follow the files" in err
    assert not (tmp_path / "cli").exists()


def test_datasets_with_their_own_channels_refuse_another_count_but_resume_old_runs():
    with pytest.raises(ConfigError, match="data.channels=3 contradicts fashion_mnist"):
        load_config("quickstart", ["data.channels=3"])
    # Runs from before data.channels=0 stored 1 for CIFAR too: resuming them is no change.
    old = load_config("cifar10", ["data.channels=0"]).to_dict()
    old["data"]["channels"] = 1
    assert config_diff(old, load_config("cifar10", ["data.channels=3"])) == []


# -- 3. one class index for both splits ------------------------------------------------------


def test_both_splits_share_the_training_class_index(tmp_path):
    for name in ("cat", "dog"):
        write_images(tmp_path / "data" / "train" / name, 3)
    write_images(tmp_path / "data" / "val" / "dog", 2)  # val lacks a class: allowed
    test = ImageFolder(tmp_path / "data", "test", image_size=8)
    assert test.classes == ["cat", "dog"] and test.labels.tolist() == [1, 1]
    write_images(tmp_path / "data" / "val" / "bird", 2)
    with pytest.raises(ValueError, match=r"class folder\(s\) bird that .*train lacks"):
        ImageFolder(tmp_path / "data", "train", image_size=8)


# -- a run on a flat folder: recorded, evaluated on held-out images, traceable ---------------


@pytest.fixture(scope="module")
def flat_run(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("flat_run")
    root = flat_folder(base / "flat")
    # data.channels=3 as the files are: the run is the same before and after channels=0.
    cfg = folder_config(base, root, "data.channels=3", "train.max_steps=2", "train.stop_after=1")
    Trainer(cfg).fit()
    return base / "run", root


def test_the_run_dir_records_the_class_index_and_the_held_out_files(flat_run):
    run, root = flat_run
    record = json.loads((run / "dataset.json").read_text())
    assert record["classes"] == ["cat", "dog"] and record["layout"] == "held_out"
    assert record["val_fraction"] == 0.1 and record["images"] == {"train": 50, "test": 6}
    assert set(record["test_files"]) == relative(ImageFolder(root, "test", image_size=8), root)
    assert record["channels"] == 3


def test_eval_scores_held_out_images_only_and_records_the_split_and_the_k_used(flat_run, capsys):
    run, _ = flat_run
    cheap = ["--no-baselines", "--no-low-shot", "--no-robustness", "eval.knn_k=60"]
    assert main(["eval", str(run), *cheap]) == 0
    results = json.loads((run / "eval.json").read_text())
    assert results["data"]["layout"] == "held_out" and results["data"]["val_fraction"] == 0.1
    assert results["data"]["images"] == {"train": 50, "test": 6}
    assert "test_files" not in results["data"]  # in dataset.json, not repeated here
    # 60 neighbours of 50 training images: the k used is recorded, and said.
    assert results["eval"]["knn_k"] == 50 and results["eval"]["knn_k_requested"] == 60
    assert "eval.knn_k=60 exceeds the 50 training images" in capsys.readouterr().err


def test_resume_and_eval_refuse_a_folder_whose_split_changed(flat_run, tmp_path):
    run, root = flat_run
    moved = tmp_path / "run"
    shutil.copytree(run, moved)
    write_images(root / "cat", 12, seed=9, start=PER_CLASS)  # 40 cats: 4 held out, not 3
    try:
        with pytest.raises(ValueError, match="held-out files changed"):
            Trainer(folder_config(tmp_path, root, "data.channels=3", "train.max_steps=2")).fit()
        assert main(["eval", str(moved), "--no-baselines"]) == 2
    finally:
        for i in range(PER_CLASS, PER_CLASS + 12):
            (root / "cat" / f"{i:02d}.png").unlink()
    write_images(root / "bird", 3)
    try:
        with pytest.raises(ValueError, match=r"class folders changed \(added bird\)"):
            Trainer(folder_config(tmp_path, root, "data.channels=3", "train.max_steps=2")).fit()
    finally:
        shutil.rmtree(root / "bird")


def test_extract_names_the_file_of_every_row_and_the_files_it_skipped(flat_run, tmp_path, capsys):
    run, root = flat_run
    other = Path(shutil.copytree(root, tmp_path / "other"))
    (other / "cat" / "broken.png").write_bytes(b"not a png")
    held = paths(ImageFolder(other, "test", image_size=16))
    split = "test" if str(other / "cat" / "broken.png") in held else "train"  # by its name hash
    out = tmp_path / "rows.npz"
    args = ["extract", str(run), "--split", split, "--out", str(out), "--no-progress"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the unreadable file's own warning
        assert main([*args, f"data.root={other}"]) == 0
    said = capsys.readouterr().out
    assert "skipped 1 unreadable image(s)" in said and "broken.png" in said
    saved = np.load(out)
    listed = paths(ImageFolder(other, split, image_size=16))
    readable = [p for p in listed if not p.endswith("broken.png")]
    assert saved["paths"].tolist() == readable
    assert saved["index"].tolist() == [listed.index(p) for p in readable]
    assert saved["features"].shape[0] == len(readable) == saved["labels"].shape[0]
    assert saved["skipped_paths"].tolist() == [str(other / "cat" / "broken.png")]
