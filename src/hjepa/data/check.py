"""What ``hjepa data NAME`` reports: per split, the images that can be read and the classes; for
an image folder also how its test split is made, the files that cannot be decoded and what
their headers say about colour.

Every file of an image folder is decoded once (threads: Pillow decodes without the GIL), so
the counts are of images training would really see; that takes minutes for ImageNet.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from hjepa.data.datasets import SPLITS, build_dataset
from hjepa.data.folder_index import DEFAULT_VAL_FRACTION
from hjepa.data.image_folder import DECODE_ERRORS, ImageFolder

LISTED = 20  # unreadable files named per split; the count covers all of them


def unreadable_files(dataset: ImageFolder) -> list[str]:
    """Paths of ``dataset`` that Pillow cannot decode, in dataset order."""

    def fails(index: int) -> bool:
        try:
            dataset.load(dataset.source(index))
        except DECODE_ERRORS:
            return True
        return False

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        failed = list(pool.map(fails, range(len(dataset))))
    return [dataset.path(i) for i, bad in enumerate(failed) if bad]


def _folder_split(dataset: ImageFolder) -> dict[str, Any]:
    bad = unreadable_files(dataset)
    present = {dataset.classes[i] for i in set(dataset.labels.tolist())}
    return {
        "images": len(dataset) - len(bad),
        "unreadable": len(bad),
        "unreadable_files": bad[:LISTED],
        "num_classes": dataset.num_classes,
        "classes_without_images": [c for c in dataset.classes if c not in present],
        "channels": dataset.channels,
        "colour": dataset.file_channels.describe(),
    }


def describe_dataset(
    name: str, root: str | None, *, image_size: int, val_fraction: float | None = None
) -> dict[str, Any]:
    """The report of ``hjepa data``: a JSON-ready dict."""
    if val_fraction is not None and name != "image_folder":
        raise ValueError(f"--val-fraction splits an image folder; {name} has its own test split")
    fraction = DEFAULT_VAL_FRACTION if val_fraction is None else val_fraction
    report: dict[str, Any] = {"dataset": name}
    for split in SPLITS:
        ds = build_dataset(name, root, split, image_size=image_size, val_fraction=fraction)
        if isinstance(ds, ImageFolder):
            report["split"] = ds.index.describe()
            report[split] = _folder_split(ds)
        else:
            report[split] = {"images": len(ds), "num_classes": getattr(ds, "num_classes", None)}
    return report
