"""Which files of an image folder make each split, under one class index for both.

Two layouts of ``data.root``:

* ``root/train/<class>/...`` beside ``root/val/<class>/...`` (or ``test/``): the folders are
  the split. The class index is the train folder's (sorted names, or ``data.class_subset``); a
  val class that training never saw is refused by name (a probe cannot learn it), and val may
  lack some classes.
* ``root/<class>/...``, or ``root/train/<class>/...`` with no val/ or test/: nothing is held
  out on disk, so ``data.val_fraction`` of each class becomes the test split. Within a class,
  files are ranked by the SHA-256 of their path relative to the class folders' parent, and the
  first ``round(fraction * n)`` (at least one in a class of two or more images, none in a class
  of one) are held out. The split depends on the file names alone: the same on every machine,
  seed and run, stratified by class, and no image is on both sides.

:meth:`FolderIndex.record` describes the layout (``dataset.json`` of a run dir, ``hjepa data``,
``eval.json``); :func:`record_difference` says what changed between two records.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from hjepa.config import SCHEMA

IMAGE_EXTENSIONS = (
    ".jpg",
    ".jpeg",
    ".png",
    ".bmp",
    ".gif",
    ".ppm",
    ".pgm",
    ".tif",
    ".tiff",
    ".webp",
)
SPLITS = ("train", "test")
FOLDERS, HELD_OUT = "folders", "held_out"
HELD_DIRS = ("val", "test")  # ImageNet names its held-out split "val"; we call it "test"
DEFAULT_VAL_FRACTION: float = SCHEMA["data.val_fraction"].default


def read_class_subset(class_subset: str) -> list[str]:
    """Class folder names from ``"imagenet100"`` (the CMC list we ship) or a file path.

    The file holds one name per line; blank lines and ``#`` comments are ignored.
    """
    if class_subset == "imagenet100":
        text = resources.files("hjepa.data").joinpath("imagenet100.txt").read_text()
        where = "imagenet100.txt (shipped)"
    else:
        path = Path(class_subset).expanduser()
        if not path.is_file():
            raise ValueError(
                f"class subset file {path} does not exist; give 'imagenet100' or a file with "
                f"one class folder name per line"
            )
        text, where = path.read_text(), str(path)
    names = [line.split("#", 1)[0].strip() for line in text.splitlines()]
    names = [n for n in names if n]
    if not names:
        raise ValueError(f"class subset {where} lists no classes")
    if len(set(names)) != len(names):
        raise ValueError(f"class subset {where} lists some classes twice")
    return names


def _subdirs(path: Path) -> list[str]:
    with os.scandir(path) as entries:
        return sorted(entry.name for entry in entries if entry.is_dir())


def _has_class_dirs(path: Path) -> bool:
    return path.is_dir() and bool(_subdirs(path))


def list_images(folder: Path) -> list[str]:
    """Image files under ``folder`` (recursively), in sorted order; other files are ignored."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames.sort()
        found.extend(
            os.path.join(dirpath, f)
            for f in sorted(filenames)
            if f.lower().endswith(IMAGE_EXTENSIONS)
        )
    return found


def _layout(root: Path) -> tuple[str, Path, Path | None]:
    """``(layout, folder of the training classes, folder of the held-out classes or None)``."""
    train = root / "train"
    if _has_class_dirs(train):
        for name in HELD_DIRS:
            if _has_class_dirs(root / name):
                return FOLDERS, train, root / name
        for name in HELD_DIRS:
            if (root / name).is_dir():
                raise FileNotFoundError(
                    f"{root / name} holds no class folders: put the held-out images in "
                    f"{root / name}/<class>/, or remove it to hold out data.val_fraction of {train}"
                )
        return HELD_OUT, train, None
    if not any((root / n).is_dir() for n in ("train", *HELD_DIRS)) and _has_class_dirs(root):
        return HELD_OUT, root, None
    raise FileNotFoundError(
        f"no class folders in {root}: expected {root}/train/<class>/<image> (and val/<class>/ "
        "for a held-out split of your own), or data.root pointing straight at the class folders"
    )


def _classes(train: Path, held: Path | None, class_subset: str | None) -> list[str]:
    """One class index for both splits: the training classes, checked against val/."""
    folders = [train] if held is None else [train, held]
    if class_subset:
        wanted = read_class_subset(class_subset)
        for folder in folders:
            missing = sorted(set(wanted) - set(_subdirs(folder)))
            if missing:
                raise ValueError(
                    f"{len(missing)} of {len(wanted)} classes of subset {class_subset!r} are not "
                    f"folders in {folder} (first: {missing[:5]}); check data.root or the subset"
                )
        return sorted(wanted)
    classes = _subdirs(train)
    unseen = sorted(set(_subdirs(held)) - set(classes)) if held is not None else []
    if unseen:
        raise ValueError(
            f"{held} has class folder(s) {', '.join(unseen[:5])} that {train} lacks: a probe "
            f"cannot learn a class training never saw; add them to {train} or remove them"
        )
    return classes


def _held_out(files: list[str], base: Path, fraction: float) -> set[str]:
    """The files of one class held out: the first ``round(fraction * n)`` by name hash."""
    count = 0 if len(files) < 2 else max(1, int(fraction * len(files) + 0.5))
    ranked = sorted(files, key=lambda f: hashlib.sha256(_relative(f, base).encode()).hexdigest())
    return set(ranked[:count])


def _relative(path: str, base: Path) -> str:
    return Path(path).relative_to(base).as_posix()


@dataclass(frozen=True)
class FolderIndex:
    """Both splits of an image folder: ``files[split] = (paths, labels)`` indexing ``classes``."""

    root: Path
    layout: str  # FOLDERS or HELD_OUT
    classes: list[str]
    base: Path  # the folder the training class folders live in
    val_fraction: float | None  # HELD_OUT only
    files: dict[str, tuple[list[str], list[int]]]

    def split(self, split: str) -> tuple[list[str], list[int]]:
        paths, labels = self.files[split]
        if not paths:
            where = self.base if self.layout == HELD_OUT else self.root / "val"
            why = (
                "no class has two images to hold one out"
                if self.layout == HELD_OUT and split == "test"
                else f"no images ({', '.join(IMAGE_EXTENSIONS)}) under its class folders"
            )
            raise FileNotFoundError(f"the {split} split of {where} is empty: {why}")
        return paths, labels

    def describe(self) -> str:
        """One line: where the test split comes from."""
        if self.layout == FOLDERS:
            return "test split: the val/ (or test/) folder"
        return (
            f"test split: {self.val_fraction:g} of each class held out by file-name hash "
            f"(data.val_fraction; {self.base} has no val/ folder)"
        )

    def record(self) -> dict[str, Any]:
        """What a run dir's ``dataset.json`` holds: classes, layout, counts, held-out files."""
        out: dict[str, Any] = {
            "name": "image_folder",
            "root": str(self.root.resolve()),
            "layout": self.layout,
            "split": self.describe(),
            "classes": list(self.classes),
            "images": {s: len(self.files[s][0]) for s in SPLITS},
        }
        if self.layout == HELD_OUT:
            out["val_fraction"] = self.val_fraction
            out["test_files"] = [_relative(p, self.base) for p in self.files["test"][0]]
        return out


def index_folder(
    root: str | os.PathLike,
    *,
    class_subset: str | None = None,
    val_fraction: float = DEFAULT_VAL_FRACTION,
) -> FolderIndex:
    """List both splits of ``root`` under one class index (module docstring)."""
    root = Path(root).expanduser()
    if not 0.0 < val_fraction <= 0.5:  # as the schema bounds data.val_fraction
        raise ValueError(f"val_fraction must be in (0, 0.5], got {val_fraction:g}")
    if not root.is_dir():
        raise FileNotFoundError(f"image folder root {root} does not exist (set data.root)")
    layout, train, held = _layout(root)
    if held is not None and val_fraction != DEFAULT_VAL_FRACTION:
        raise ValueError(
            f"data.val_fraction={val_fraction:g} has nothing to split: {held} is the held-out "
            "split of this folder; leave data.val_fraction unset"
        )
    classes = _classes(train, held, class_subset)
    files: dict[str, tuple[list[str], list[int]]] = {s: ([], []) for s in SPLITS}
    for label, name in enumerate(classes):
        found = {"train": list_images(train / name)}
        if held is not None:
            found["test"] = list_images(held / name) if (held / name).is_dir() else []
        else:
            out = _held_out(found["train"], train, val_fraction)
            found = {"train": [f for f in found["train"] if f not in out], "test": sorted(out)}
        for split, paths in found.items():
            files[split][0].extend(paths)
            files[split][1].extend([label] * len(paths))
    return FolderIndex(
        root, layout, classes, train, None if held is not None else val_fraction, files
    )


def record_difference(saved: dict[str, Any], now: dict[str, Any]) -> str | None:
    """What differs between two :meth:`FolderIndex.record` s of one folder, or None."""
    if saved.get("classes") != now["classes"]:
        old, new = set(saved.get("classes") or []), set(now["classes"])
        added, gone = sorted(new - old), sorted(old - new)
        parts = [
            f"{what} {', '.join(names[:5])}"
            for what, names in (("added", added), ("removed", gone))
            if names
        ]
        return f"its class folders changed ({'; '.join(parts)})"
    if (saved.get("layout"), saved.get("val_fraction")) != (now["layout"], now.get("val_fraction")):
        return f"its split changed ({saved.get('split')} -> {now['split']})"
    if saved.get("test_files") != now.get("test_files"):
        old, new = set(saved.get("test_files") or []), set(now.get("test_files") or [])
        moved = sorted(old ^ new)
        return (
            f"its held-out files changed ({len(moved)} file(s) differ, e.g. {moved[0]}): "
            "images were added or removed, so some held-out images may have been trained on"
        )
    return None
