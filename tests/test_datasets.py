"""Datasets: IDX and CIFAR readers against files written here, image folders, synthetic data."""

from __future__ import annotations

import gzip
import io
import pickle
import struct
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hjepa.data.cifar import load_cifar
from hjepa.data.datasets import build_dataset
from hjepa.data.fashion_mnist import load_fashion_mnist, read_idx
from hjepa.data.folder_index import read_class_subset
from hjepa.data.image_folder import ImageFolder
from hjepa.data.synthetic import make_synthetic
from hjepa.data.tensors import ImageTensors

# ---------------------------------------------------------------- Fashion-MNIST (IDX)


def idx_bytes(array: np.ndarray) -> bytes:
    """IDX encoding written independently of the reader: magic 0x0000_08_<ndim>, BE sizes."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes(order="C")


def write_fmnist(root: Path, split: str, images: np.ndarray, labels: np.ndarray, gz: bool) -> None:
    prefix = "train" if split == "train" else "t10k"
    for name, array in (
        (f"{prefix}-images-idx3-ubyte", images),
        (f"{prefix}-labels-idx1-ubyte", labels),
    ):
        data = idx_bytes(array)
        if gz:
            (root / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (root / name).write_bytes(data)


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_round_trip(tmp_path: Path, gz: bool) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(7, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=7, dtype=np.uint8)
    write_fmnist(tmp_path, "test", images, labels, gz)
    ds = load_fashion_mnist(str(tmp_path), "test")
    assert isinstance(ds, ImageTensors)
    assert ds.images.shape == (7, 1, 28, 28) and ds.images.dtype == torch.uint8
    assert ds.labels.dtype == torch.int64 and ds.num_classes == 10
    np.testing.assert_array_equal(ds.images[:, 0].numpy(), images)
    np.testing.assert_array_equal(ds.labels.numpy(), labels.astype(np.int64))
    image, label = ds[3]
    assert torch.equal(image[0], torch.from_numpy(images[3])) and label == int(labels[3])
    # Through the public entry point too.
    assert torch.equal(
        build_dataset("fashion_mnist", str(tmp_path), "test", image_size=28).images, ds.images
    )


def test_idx_truncated_file_names_file(tmp_path: Path) -> None:
    images = np.zeros((5, 28, 28), dtype=np.uint8)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(idx_bytes(images)[:-10])
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.*truncated"):
        read_idx(path, ndim=3)
    # A gzip stream cut short is also reported against the file.
    gz_path = tmp_path / "t.gz"
    gz_path.write_bytes(gzip.compress(idx_bytes(images))[:40])
    with pytest.raises(ValueError, match="t.gz"):
        read_idx(gz_path, ndim=3)


def test_idx_bad_magic_names_file(tmp_path: Path) -> None:
    data = bytearray(idx_bytes(np.zeros(4, dtype=np.uint8)))
    data[2] = 0x0D  # float type code instead of unsigned byte
    path = tmp_path / "train-labels-idx1-ubyte"
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="train-labels-idx1-ubyte.*magic"):
        read_idx(path, ndim=1)
    # Right type but wrong number of dimensions (labels file where images are expected).
    path.write_bytes(idx_bytes(np.zeros(4, dtype=np.uint8)))
    with pytest.raises(ValueError, match="magic"):
        read_idx(path, ndim=3)


def test_fashion_mnist_missing_dir_says_apt_get(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(str(tmp_path / "nowhere"), "train")


def test_fashion_mnist_count_mismatch(tmp_path: Path) -> None:
    write_fmnist(tmp_path, "train", np.zeros((3, 28, 28), np.uint8), np.zeros(4, np.uint8), gz=True)
    with pytest.raises(ValueError, match="3 images but .* 4 labels"):
        load_fashion_mnist(str(tmp_path), "train")


# ---------------------------------------------------------------- CIFAR


def cifar_pickle(images_chw: np.ndarray, labels: list[int], label_key: str) -> bytes:
    """A batch in the published layout: bytes keys, data rows = R plane, G plane, B plane."""
    n = images_chw.shape[0]
    batch = {
        b"batch_label": b"testing batch 1 of 1",
        label_key.encode(): labels,
        b"data": images_chw.reshape(n, 3 * 32 * 32),
        b"filenames": [f"img{i}.png".encode() for i in range(n)],
    }
    return pickle.dumps(batch, protocol=2)


def random_chw(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)


def test_cifar10_folder_exact_pixels(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    train = [random_chw(rng, 2 + i) for i in range(5)]
    train_labels = [list(rng.integers(0, 10, size=len(b))) for b in train]
    for i, (imgs, labs) in enumerate(zip(train, train_labels), start=1):
        (folder / f"data_batch_{i}").write_bytes(
            cifar_pickle(imgs, [int(v) for v in labs], "labels")
        )
    test = random_chw(rng, 3)
    (folder / "test_batch").write_bytes(cifar_pickle(test, [9, 0, 4], "labels"))

    ds = load_cifar(str(tmp_path), "train", num_classes=10)
    np.testing.assert_array_equal(ds.images.numpy(), np.concatenate(train))
    np.testing.assert_array_equal(ds.labels.numpy(), np.concatenate(train_labels).astype(np.int64))
    # CHW: pixel (row 5, col 7) of channel c is byte c*1024 + 5*32 + 7 of the row.
    row = train[0].reshape(train[0].shape[0], -1)[1]
    assert [int(ds.images[1, c, 5, 7]) for c in range(3)] == [
        int(row[c * 1024 + 5 * 32 + 7]) for c in range(3)
    ]
    test_ds = build_dataset("cifar10", str(tmp_path), "test", image_size=32)
    np.testing.assert_array_equal(test_ds.images.numpy(), test)
    assert test_ds.labels.tolist() == [9, 0, 4] and test_ds.num_classes == 10


def test_cifar100_from_tar_gz(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    train, test = random_chw(rng, 4), random_chw(rng, 2)
    archive = tmp_path / "cifar-100-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name, imgs, labels in (("train", train, [0, 99, 50, 7]), ("test", test, [3, 98])):
            data = cifar_pickle(imgs, labels, "fine_labels")
            info = tarfile.TarInfo(f"cifar-100-python/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    ds = build_dataset("cifar100", str(tmp_path), "train", image_size=32)
    np.testing.assert_array_equal(ds.images.numpy(), train)
    assert ds.labels.tolist() == [0, 99, 50, 7] and ds.num_classes == 100
    # The archive path itself works as root, and nothing was extracted next to it.
    ds_test = load_cifar(str(archive), "test", num_classes=100)
    np.testing.assert_array_equal(ds_test.images.numpy(), test)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cifar-100-python.tar.gz"]


def test_cifar_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="cifar-10-python.tar.gz"):
        load_cifar(str(tmp_path), "train")
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()

    class Evil:
        def __reduce__(self):  # would run code if unpickled blindly
            return (print, ("pwned",))

    (folder / "test_batch").write_bytes(pickle.dumps({"data": Evil(), "labels": [0]}))
    with pytest.raises(ValueError, match="refusing to load builtins.print"):
        load_cifar(str(tmp_path), "test")
    (folder / "test_batch").write_bytes(
        cifar_pickle(np.zeros((2, 3, 32, 32), np.uint8), [0, 10], "labels")
    )
    with pytest.raises(ValueError, match="labels outside"):
        load_cifar(str(tmp_path), "test")


# ---------------------------------------------------------------- image folder


def save(path: Path, array: np.ndarray, fmt: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format=fmt)


def make_folder(root: Path) -> dict[str, np.ndarray]:
    """root/{train,val}/<class>/ with PNG/JPEG, one grayscale and one corrupt file."""
    rng = np.random.default_rng(3)
    arrays = {
        "train/n001/a.png": rng.integers(0, 256, (12, 16, 3), dtype=np.uint8),
        "train/n001/b.PNG": rng.integers(0, 256, (10, 10, 3), dtype=np.uint8),
        "train/n002/c.jpg": np.full((20, 30, 3), 128, dtype=np.uint8),
        "train/n002/gray.png": rng.integers(0, 256, (8, 8), dtype=np.uint8),
        "train/n003/d.png": rng.integers(0, 256, (8, 8, 3), dtype=np.uint8),
        "val/n001/e.png": rng.integers(0, 256, (8, 8, 3), dtype=np.uint8),
        "val/n002/f.png": rng.integers(0, 256, (8, 8, 3), dtype=np.uint8),
        "val/n003/g.png": rng.integers(0, 256, (8, 8, 3), dtype=np.uint8),
    }
    for rel, array in arrays.items():
        save(root / rel, array, "JPEG" if rel.endswith(".jpg") else "PNG")
    (root / "train/n003/corrupt.jpg").write_bytes(
        rng.integers(0, 256, 300, dtype=np.uint8).tobytes()
    )
    (root / "train/n003/notes.txt").write_text("not an image")
    return arrays


def test_image_folder_layout_labels_and_pixels(tmp_path: Path) -> None:
    arrays = make_folder(tmp_path)
    ds = ImageFolder(tmp_path, "train", image_size=8)
    assert ds.classes == ["n001", "n002", "n003"]
    # 6 image files (the .txt is ignored), sorted by class then name.
    names = [Path(ds.path(i)).name for i in range(len(ds))]
    assert names == ["a.png", "b.PNG", "c.jpg", "gray.png", "corrupt.jpg", "d.png"]
    assert ds.labels.tolist() == [0, 0, 1, 1, 2, 2]
    # An 8x8 image at image_size 8 is returned unchanged (CHW).
    image, label = ds[5]
    assert label == 2 and image.dtype == torch.uint8
    assert torch.equal(image, torch.from_numpy(arrays["train/n003/d.png"]).permute(2, 0, 1))
    # A 36x12 (w x h) image keeps its centred 12x12 square (columns 12..23), resized to 8:
    # output columns 2..5 only see that square (filter support 3 px), so they stay 200.
    wide = np.zeros((12, 36, 3), np.uint8)
    wide[:, 12:24] = 200
    save(tmp_path / "train/n001/a.png", wide, "PNG")
    cropped, _ = ds[0]
    assert cropped.shape == (3, 8, 8) and torch.all(cropped[:, :, 2:6] == 200)
    # Had the whole image been squeezed to 8 wide instead, those columns would be dark.
    assert cropped.float().mean() > 150
    # Grayscale is expanded to three equal channels.
    gray, _ = ds[3]
    assert (
        gray.shape == (3, 8, 8) and torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    )
    assert torch.equal(gray[0], torch.from_numpy(arrays["train/n002/gray.png"]))
    # Test split reads val/.
    assert len(build_dataset("image_folder", str(tmp_path), "test", image_size=8)) == 3


def test_image_folder_corrupt_file_is_skipped_once(tmp_path: Path) -> None:
    make_folder(tmp_path)
    ds = ImageFolder(tmp_path, "train", image_size=6, channels=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        image, label = ds[4]
        ds[4]
    assert label == -1 and image.shape == (1, 6, 6)
    assert ds.skipped == 2
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "corrupt.jpg" in messages[0]
    good, label = ds[0]
    assert good.shape == (1, 6, 6) and label == 0


def test_image_folder_class_subset_and_flat_root(tmp_path: Path) -> None:
    make_folder(tmp_path)
    subset = tmp_path / "subset.txt"
    subset.write_text("# my classes\nn003\n\nn001\n")
    ds = ImageFolder(tmp_path, "train", image_size=8, class_subset=str(subset))
    assert ds.classes == ["n001", "n003"] and ds.num_classes == 2
    assert ds.labels.tolist() == [0, 0, 1, 1]
    # root pointing straight at class folders: a held-out share of each class is the test
    # split, and a class of one image has none to give.
    flat = ImageFolder(tmp_path / "train", "train", image_size=8)
    assert flat.classes == ["n001", "n002", "n003"] and len(flat) == 3
    held = ImageFolder(tmp_path / "train", "test", image_size=8)
    assert len(held) == 3 and not {held.path(i) for i in range(3)} & {
        flat.path(i) for i in range(3)
    }
    with pytest.raises(FileNotFoundError, match="no class has two images"):
        ImageFolder(tmp_path / "val", "test", image_size=8)
    subset.write_text("n001\nn999\n")
    with pytest.raises(ValueError, match="n999"):
        ImageFolder(tmp_path, "train", image_size=8, class_subset=str(subset))
    with pytest.raises(FileNotFoundError, match="val"):
        ImageFolder(tmp_path / "train" / "n001", "test", image_size=8)


def test_shipped_imagenet100_list() -> None:
    names = read_class_subset("imagenet100")
    assert len(names) == 100 and len(set(names)) == 100
    assert all(len(n) == 9 and n[0] == "n" and n[1:].isdigit() for n in names)
    assert names[0] == "n02869837"  # first entry of the CMC list


# ---------------------------------------------------------------- synthetic and build_dataset


def test_synthetic_deterministic_and_balanced() -> None:
    a = make_synthetic(60, 16, 3, num_classes=6, seed=5)
    b = make_synthetic(60, 16, 3, num_classes=6, seed=5)
    c = make_synthetic(60, 16, 3, num_classes=6, seed=6)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, c.images)
    assert a.images.shape == (60, 3, 16, 16) and a.images.dtype == torch.uint8
    assert a.labels.bincount().tolist() == [10] * 6


def test_synthetic_class_structure_above_chance_not_perfect() -> None:
    train = make_synthetic(600, 16, 1, seed=0)
    test = make_synthetic(400, 16, 1, seed=1)
    x = train.images.flatten(1).float()
    y = test.images.flatten(1).float()
    centroids = torch.stack([x[train.labels == k].mean(0) for k in range(10)])
    centroid_acc = (torch.cdist(y, centroids).argmin(1) == test.labels).float().mean().item()
    nn_acc = (train.labels[torch.cdist(y, x).argmin(1)] == test.labels).float().mean().item()
    # Chance is 0.1; 400 test images put its 3-sigma band below 0.145.
    assert centroid_acc > 0.15
    assert 0.3 < nn_acc < 0.95


def test_build_dataset_names_and_splits() -> None:
    with pytest.raises(
        ValueError, match="fashion_mnist, cifar10, cifar100, image_folder, synthetic"
    ):
        build_dataset("mnist", None, "train", image_size=8)
    with pytest.raises(ValueError, match="split"):
        build_dataset("synthetic", None, "val", image_size=8)
    train = build_dataset("synthetic", None, "train", image_size=8, channels=1, synthetic_size=40)
    test = build_dataset("synthetic", None, "test", image_size=8, channels=1, synthetic_size=40)
    assert len(train) == 40 and len(test) == 10 and train.images.shape[1:] == (1, 8, 8)
    # The test images are not copies of training images.
    assert torch.cdist(test.images.flatten(1).float(), train.images.flatten(1).float()).min() > 0
    with pytest.raises(ValueError, match="class_subset"):
        build_dataset("synthetic", None, "train", image_size=8, class_subset="imagenet100")


def test_image_tensors_validation() -> None:
    with pytest.raises(ValueError, match="uint8"):
        ImageTensors(torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="one entry per image"):
        ImageTensors(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        ImageTensors(
            torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.tensor([0, 2]), num_classes=2
        )


def test_image_folder_16bit_grayscale_keeps_top_byte(tmp_path: Path) -> None:
    folder = tmp_path / "train" / "n001"
    folder.mkdir(parents=True)
    Image.fromarray(np.full((5, 5), 0x9A3C, dtype=np.uint16)).save(folder / "deep.png")
    image, label = ImageFolder(tmp_path, "train", image_size=5, channels=1)[0]
    # Plain convert("L") would clip this to 255; the top byte 0x9A is the intended shade.
    assert label == 0 and torch.all(image == 0x9A)
