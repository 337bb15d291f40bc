"""Training data: the config's ``data`` entries as :mod:`segany.data` datasets, grouped by image.

A ``data`` entry is one of

* a path: a manifest folder (``root/manifest.jsonl``, the layout of ``shared/data/train/*``),
  or a folder with ``images/`` and ``masks/`` paired by file stem;
* ``{"manifest": root}``: the same as a manifest path;
* ``{"coco": "annotations.json", "images": "image_dir"}``: a COCO instances JSON (polygons,
  compressed or uncompressed RLE; ``"include_crowd": true`` keeps ``iscrowd`` annotations);
* ``{"images": "image_dir", "masks": "mask_dir"}``: ``<stem>.<ext>`` paired with
  ``<stem>.png``.

Every dict may also carry ``"name"``, the set name written in cache indexes and logs. Relative
paths are taken from the current directory.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..data import (
    CocoDataset,
    DatasetError,
    FolderDataset,
    ManifestDataset,
    MaskDataset,
    MaskSample,
    load_sample_mask,
)

__all__ = [
    "ImageRecord",
    "dataset_from_entry",
    "load_record_masks",
    "records_from_dataset",
    "records_from_datasets",
]


@dataclass
class ImageRecord:
    """One image and its object masks.

    ``masks`` are :class:`segany.data.MaskSample` (a plain path is taken as a mask file of
    ``image``); ``set_name`` and ``image_id`` name the image in cache indexes and logs.
    """

    image: Path
    masks: list[MaskSample]
    set_name: str
    image_id: str

    def __post_init__(self) -> None:
        self.image = Path(self.image)
        self.masks = [
            m if isinstance(m, MaskSample) else MaskSample(self.image, Path(m)) for m in self.masks
        ]


def dataset_from_entry(entry: Any) -> tuple[MaskDataset, str]:
    """``(dataset, set name)`` for one ``data`` entry (see the module docstring)."""
    if isinstance(entry, (str, os.PathLike)):
        root = Path(entry)
        if (root / "manifest.jsonl").is_file():
            return ManifestDataset(root), root.name
        if (root / "images").is_dir() and (root / "masks").is_dir():
            return FolderDataset(root / "images", root / "masks"), root.name
        raise DatasetError(
            root,
            "not a training set: expected a folder with manifest.jsonl, or with images/ and "
            'masks/; for COCO JSON use {"coco": "annotations.json", "images": "image_dir"}',
        )
    if not isinstance(entry, Mapping):
        raise ValueError(f"data entry {entry!r}: expected a path or a dict")
    keys = set(entry) - {"name"}
    name = entry.get("name")
    if "coco" in entry:
        if keys - {"coco", "images", "include_crowd"} or "images" not in entry:
            raise ValueError(
                f"data entry {dict(entry)}: a COCO entry is "
                '{"coco": JSON, "images": DIR[, "include_crowd": BOOL][, "name": STR]}'
            )
        json_path = Path(entry["coco"])
        ds: MaskDataset = CocoDataset(
            json_path, entry["images"], include_crowd=bool(entry.get("include_crowd", False))
        )
        return ds, str(name or json_path.stem)
    if keys == {"manifest"}:
        root = Path(entry["manifest"])
        return ManifestDataset(root), str(name or root.name)
    if keys == {"images", "masks"}:
        images = Path(entry["images"])
        return FolderDataset(images, entry["masks"]), str(name or images.parent.name)
    raise ValueError(
        f"data entry {dict(entry)}: expected a path, {{'manifest': DIR}}, "
        "{'coco': JSON, 'images': DIR} or {'images': DIR, 'masks': DIR}"
    )


def records_from_dataset(dataset: Iterable[MaskSample], set_name: str) -> list[ImageRecord]:
    """The samples of ``dataset`` grouped by image, in order of first appearance."""
    groups: OrderedDict[Path, list[MaskSample]] = OrderedDict()
    for sample in dataset:
        groups.setdefault(Path(sample.image_path), []).append(sample)
    return [ImageRecord(img, masks, set_name, img.stem) for img, masks in groups.items()]


def records_from_datasets(entries: Iterable[Any]) -> list[ImageRecord]:
    """Image records of every ``data`` entry, in order."""
    records: list[ImageRecord] = []
    for entry in entries:
        dataset, name = dataset_from_entry(entry)
        records += records_from_dataset(dataset, name)
    return records


def mask_source(sample: MaskSample) -> str:
    """Where a mask comes from, for indexes and messages (the file, or JSON#annotation)."""
    if sample.mask_path is not None:
        return str(sample.mask_path)
    return f"{sample.meta.get('source', 'COCO JSON')}#{sample.meta.get('annotation_id')}"


def load_record_masks(record: ImageRecord, image_hw: tuple[int, int]) -> np.ndarray:
    """``K x H x W`` bool masks of ``record``; a mask of another size than the image raises
    :class:`segany.data.DatasetError`."""
    out = np.zeros((len(record.masks), *image_hw), dtype=bool)
    for k, sample in enumerate(record.masks):
        mask = load_sample_mask(sample)
        if mask.shape != tuple(image_hw):
            raise DatasetError(
                mask_source(sample),
                f"mask is {mask.shape} but its image {record.image} is {tuple(image_hw)}",
            )
        out[k] = mask
    return out
