"""An image folder as WebDataset shards: written by ``hjepa data prepare``, read by ImageFolder.

Millions of small files are slow to list and open on network file systems and object stores;
a few hundred tar shards of ~1 GB stream to any number of nodes. ``hjepa data prepare SRC DST``
indexes ``SRC`` exactly as training would (:mod:`hjepa.data.folder_index`: class index, split,
``--class-subset``, ``--val-fraction``) and writes, per split, WebDataset shards
``DST/{split}-000000.tar, ...`` with webdataset's ``ShardWriter`` (the ``hjepa[shards]`` extra):
sample ``i`` of the split is the member pair ``{i:08d}.<ext>`` (the file's bytes unchanged, so
it decodes to the same pixels) and ``{i:08d}.cls`` (its label). Any WebDataset reader streams
them. Beside them, ``DST/shards.json`` holds the class names and the source's split record,
and ``DST/{split}.npy`` where each member starts (shard, byte offset, size, label), so a
training split reads sample ``i`` with one ``pread`` (random access: the loader's seeded,
resumable epoch order stays as for a folder). ``data.root=DST`` then trains on the shards.
"""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path
from typing import Any

import numpy as np

from hjepa.data.folder_index import DEFAULT_VAL_FRACTION, SPLITS, FolderIndex, index_folder

MANIFEST = "shards.json"
FORMAT = "webdataset"
#: Columns of ``{split}.npy``: shard number, byte offset of the image, its size, its label.
SHARD, OFFSET, SIZE, LABEL = range(4)


def require_webdataset():
    """The webdataset module, or an ImportError that says how to install it."""
    try:
        import webdataset
    except ImportError as exc:
        raise ImportError(
            "hjepa data prepare writes WebDataset shards with webdataset: "
            "pip install 'hjepa[shards]' (or pip install webdataset)"
        ) from exc
    return webdataset


def is_shard_set(root: str | os.PathLike) -> bool:
    return (Path(root).expanduser() / MANIFEST).is_file()


def prepare(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    class_subset: str | None = None,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    shard_bytes: int = 1 << 30,
) -> dict[str, Any]:
    """Write the shard set of ``src`` to ``dst`` (module docstring); returns its manifest."""
    webdataset = require_webdataset()
    dst = Path(dst).expanduser()
    if dst.exists() and any(dst.iterdir()):
        raise FileExistsError(f"{dst} is not empty: give a new or empty folder for the shards")
    index = index_folder(src, class_subset=class_subset, val_fraction=val_fraction)
    dst.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split in SPLITS:
        paths, labels = index.files[split]
        pattern = str(dst / f"{split}-%06d.tar")
        with webdataset.ShardWriter(pattern, maxsize=shard_bytes, verbose=0, mtime=0.0) as out:
            for i, (path, label) in enumerate(zip(paths, labels)):
                ext = Path(path).suffix.lower().lstrip(".")
                out.write({"__key__": f"{i:08d}", ext: Path(path).read_bytes(), "cls": label})
        np.save(dst / f"{split}.npy", _member_table(dst, split, labels))
        counts[split] = len(paths)
    manifest = {
        "format": FORMAT,
        "classes": list(index.classes),
        "class_subset": class_subset or "",
        "images": counts,
        "source": index.record(),
    }
    (dst / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def _member_table(dst: Path, split: str, labels: list[int]) -> np.ndarray:
    """Where each image member of ``split``'s shards starts, in sample order."""
    rows = []
    for number, shard in enumerate(sorted(dst.glob(f"{split}-*.tar"))):
        with tarfile.open(shard) as tar:
            for member in tar:
                if not member.name.endswith(".cls"):
                    rows.append((number, member.offset_data, member.size))
    table = np.zeros((len(labels), 4), dtype=np.int64)
    if rows:
        table[:, :3] = np.asarray(rows, dtype=np.int64)
        table[:, LABEL] = labels
    return table


class ShardSet:
    """A prepared shard set, read like a :class:`~hjepa.data.folder_index.FolderIndex`:
    ``classes``, ``split(split) -> (names, labels)``, ``record()``, ``describe()``, and
    :meth:`read` for an image's bytes."""

    def __init__(self, root: str | os.PathLike, class_subset: str | None, val_fraction: float):
        self.root = self.base = Path(root).expanduser()
        manifest = json.loads((self.root / MANIFEST).read_text())
        if manifest.get("format") != FORMAT:
            raise ValueError(f"{self.root / MANIFEST} is not a {FORMAT} shard set of hjepa")
        prepared = manifest["source"]
        if (class_subset or "") != manifest["class_subset"]:
            raise ValueError(
                f"{self.root} was prepared with class subset {manifest['class_subset']!r}, not "
                f"{class_subset or ''!r}: set data.class_subset to it, or prepare again"
            )
        fraction = prepared.get("val_fraction")
        if fraction is not None and val_fraction not in (DEFAULT_VAL_FRACTION, fraction):
            raise ValueError(
                f"{self.root} was prepared with val_fraction {fraction:g}: leave "
                "data.val_fraction unset, or prepare again with --val-fraction"
            )
        self.classes: list[str] = manifest["classes"]
        self.layout = prepared["layout"]
        self.val_fraction = fraction
        self._source = prepared
        self._tables = {s: np.load(self.root / f"{s}.npy") for s in SPLITS}
        self._shards = {s: sorted(self.root.glob(f"{s}-*.tar")) for s in SPLITS}
        self._files: dict[Path, int] = {}  # open shard descriptors, per process

    def split(self, split: str) -> tuple[list[str], list[int]]:
        table = self._tables[split]
        if len(table) == 0:
            raise FileNotFoundError(f"the {split} split of shard set {self.root} is empty")
        names = [f"{split}:{i:08d}" for i in range(len(table))]
        return names, table[:, LABEL].tolist()

    def read(self, split: str, i: int) -> bytes:
        """The bytes of image ``i`` of ``split``: one positioned read of its shard."""
        shard, offset, size, _ = self._tables[split][i]
        path = self._shards[split][shard]
        fd = self._files.get(path)
        if fd is None:  # opened lazily: each DataLoader worker opens its own
            fd = self._files[path] = os.open(path, os.O_RDONLY)
        return os.pread(fd, int(size), int(offset))

    def describe(self) -> str:
        return f"{self._source['split']} (WebDataset shards in {self.root})"

    def record(self) -> dict[str, Any]:
        return {**self._source, "root": str(self.root.resolve()), "shards": FORMAT}

    def __getstate__(self) -> dict[str, Any]:  # descriptors do not cross process boundaries
        return {**self.__dict__, "_files": {}}


def open_index(
    root: str | os.PathLike, class_subset: str | None, val_fraction: float
) -> FolderIndex | ShardSet:
    """The index of ``root``: a shard set when ``root`` holds ``shards.json``, else a folder."""
    if is_shard_set(root):
        return ShardSet(root, class_subset, val_fraction)
    return index_folder(root, class_subset=class_subset, val_fraction=val_fraction)
