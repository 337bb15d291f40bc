"""Datasets of images with ground-truth object masks, for training and evaluation.

Every loader is a sequence of :class:`MaskSample` (one per object mask) and has
``load(sample) -> (image, mask, ignore)``:

* ``image``: ``H x W x 3`` RGB ``uint8`` (read with :func:`segany.images.load_image`);
* ``mask``: ``H x W`` ``bool``, the object;
* ``ignore``: ``H x W`` ``bool`` pixels to leave out of the evaluation, or ``None``.

Loaders
    :class:`ManifestDataset`
        ``root/manifest.jsonl`` with one JSON object per mask (``image``, ``mask`` paths relative
        to ``root`` or absolute; optional ``category``; every other field is kept in ``meta``).
        The layout of ``shared/data/train/*``.
    :class:`DavisDataset`
        ``root/images/NNN.jpg`` and ``root/masks/NNN.png`` (the DAVIS-345 benchmark); optionally
        the DAVIS "void" colour of ``root/instances/NNN.png`` as ignore pixels.
    :class:`CocoDataset`
        a COCO instances JSON (polygons, compressed RLE and uncompressed RLE, decoded with
        pycocotools), one sample per annotation; ``iscrowd`` annotations are skipped by default.
    :class:`FolderDataset`
        ``images_dir/<stem>.<ext>`` paired with ``masks_dir/<stem>.png``.

Mask files (PNG or any format Pillow reads)
    Any value ``> 0`` is the object, so ``0/1``, ``0/255`` and 1-bit PNGs all work, and masks
    with other values (anti-aliased edges, label ids) count every non-zero pixel as object.
    For palette (``P``) files the *index* is compared with 0; for colour files the maximum over
    the colour channels is (alpha is ignored), as RITM reads DAVIS.

Errors
    Problems with the data raise :class:`DatasetError` (a ``ValueError``) naming the file:
    a missing image or mask (checked when the dataset is built, ``check_files=True``), an
    unreadable or corrupt file, a mask whose size differs from its image, and an empty mask
    (no object pixel). With ``skip_empty=True`` the constructor reads every mask once, logs a
    warning for each empty one and drops it instead.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, overload

import numpy as np
from PIL import Image, UnidentifiedImageError

from .images import DEFAULT_MAX_PIXELS, ImageLoadError, load_image

logger = logging.getLogger(__name__)

__all__ = [
    "CocoDataset",
    "DatasetError",
    "DavisDataset",
    "FolderDataset",
    "ManifestDataset",
    "MaskDataset",
    "MaskSample",
    "load_mask",
    "load_sample",
    "load_sample_mask",
]

PathLike = str | os.PathLike

#: File name extensions :class:`FolderDataset` and :class:`DavisDataset` accept as images.
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


class DatasetError(ValueError):
    """A dataset file is missing, unreadable or inconsistent; the message names the file.

    Attributes:
        path: the offending file (``None`` when the problem is not tied to one file).
        reason: what was wrong and what is expected.
    """

    def __init__(self, path: PathLike | None, reason: str) -> None:
        self.path = None if path is None else str(path)
        self.reason = reason
        super().__init__(reason if path is None else f"{path}: {reason}")

    def __reduce__(self) -> tuple[type[DatasetError], tuple[str | None, str]]:
        # Keeps the error picklable (data loader workers send it across processes).
        return (type(self), (self.path, self.reason))


@dataclass
class MaskSample:
    """One object mask of one image.

    Attributes:
        image_path: the image file.
        mask_path: the mask file, or ``None`` when the mask is stored in ``meta`` (COCO:
            ``meta["segmentation"]`` with ``meta["height"]``, ``meta["width"]``).
        category: the object's class name, if known.
        meta: everything else the source says about the mask. ``meta["name"]`` is a short
            unique name (used in reports); ``meta["ignore_path"]`` (with optional
            ``meta["ignore_value"]``) names a file of pixels to ignore.
    """

    image_path: Path
    mask_path: Path | None
    category: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """``meta["name"]``, else the mask (or image) file's stem."""
        name = self.meta.get("name")
        if name is not None:
            return str(name)
        return (self.mask_path or self.image_path).stem


# --------------------------------------------------------------------------- file readers
def load_mask(path: PathLike, *, value: int | None = None) -> np.ndarray:
    """Reads a mask file as an ``H x W`` bool array.

    Args:
        path: a PNG (or any single-channel, palette or colour image Pillow reads).
        value: ``None`` (default): every pixel ``> 0`` is inside. An int: only pixels equal to
            it are inside (e.g. 255 for the DAVIS "void" index of a palette file).

    Raises:
        DatasetError: the file is missing, not an image, or truncated.
    """
    try:
        with Image.open(path) as im:
            im.seek(0)
            im.load()
            mode = im.mode
            if mode == "1":
                arr = np.asarray(im, dtype=bool)
            elif mode in ("L", "P", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"):
                arr = np.asarray(im)
            else:
                # Colour: max over the colour channels, alpha ignored.
                arr = np.asarray(im.convert("RGB")).max(axis=2)
    except FileNotFoundError as exc:
        raise DatasetError(path, "mask file not found") from exc
    except UnidentifiedImageError as exc:
        raise DatasetError(path, "not a readable image; expected a mask PNG") from exc
    except OSError as exc:
        raise DatasetError(path, f"cannot read the mask ({exc}); expected a mask PNG") from exc
    if arr.ndim != 2:
        raise DatasetError(path, f"mask has shape {arr.shape}; expected a single-channel image")
    if value is None:
        return arr > 0
    return arr == value


def _load_image(path: Path, max_pixels: int | None) -> np.ndarray:
    try:
        return load_image(path, max_pixels=max_pixels)
    except ImageLoadError as exc:
        raise DatasetError(path, f"cannot load the image: {exc.reason}") from exc


def _decode_coco(sample: MaskSample) -> np.ndarray:
    """Decodes ``meta["segmentation"]`` (polygons or RLE) at ``meta["height"] x meta["width"]``."""
    from pycocotools import mask as mask_utils

    meta = sample.meta
    where = f"{meta.get('source', 'COCO JSON')} (annotation {meta.get('annotation_id')})"
    segm = meta.get("segmentation")
    try:
        h, w = int(meta["height"]), int(meta["width"])
    except (KeyError, TypeError, ValueError) as exc:
        raise DatasetError(where, "image height/width missing; expected ints") from exc
    if isinstance(segm, list):
        polygons = [list(map(float, p)) for p in segm]
        if not polygons:
            raise DatasetError(where, "empty polygon list")
        for poly in polygons:
            # pycocotools reads a 4-number list as a box, so such polygons must be refused.
            if len(poly) < 6 or len(poly) % 2:
                raise DatasetError(
                    where,
                    f"polygon with {len(poly)} numbers; expected x, y pairs of at least 3 points",
                )
        rle = mask_utils.merge(mask_utils.frPyObjects(polygons, h, w))
    elif isinstance(segm, Mapping) and "counts" in segm and "size" in segm:
        size = [int(s) for s in segm["size"]]
        if size != [h, w]:
            raise DatasetError(where, f"RLE size {size} differs from the image's [{h}, {w}]")
        counts = segm["counts"]
        if isinstance(counts, list):  # uncompressed RLE
            if sum(int(c) for c in counts) != h * w:
                raise DatasetError(where, f"uncompressed RLE counts do not add up to {h} x {w}")
            rle = mask_utils.frPyObjects(dict(segm), h, w)
        elif isinstance(counts, (str, bytes)):  # compressed RLE
            rle = {"size": size, "counts": counts}
        else:
            raise DatasetError(where, f"RLE counts of type {type(counts).__name__}")
    else:
        raise DatasetError(where, "segmentation is neither a polygon list nor an RLE dict")
    try:
        decoded = mask_utils.decode(rle)
    except Exception as exc:  # pycocotools raises bare exceptions on bad strings
        raise DatasetError(where, f"cannot decode the RLE ({exc})") from exc
    return decoded.astype(bool)


def _load_gt(sample: MaskSample) -> np.ndarray:
    if sample.mask_path is not None:
        return load_mask(sample.mask_path)
    if "segmentation" in sample.meta:
        return _decode_coco(sample)
    raise DatasetError(sample.image_path, "sample has neither a mask_path nor a segmentation")


def load_sample_mask(sample: MaskSample) -> np.ndarray:
    """The ``H x W`` bool object mask of a sample of any loader (a mask file or a COCO
    segmentation) without loading its image; sizes and emptiness are not checked (see
    :func:`load_sample`).

    Raises:
        DatasetError: the mask file is missing or corrupt, or the segmentation is malformed.
    """
    return _load_gt(sample)


def _mask_source(sample: MaskSample) -> str:
    if sample.mask_path is not None:
        return str(sample.mask_path)
    return (
        f"{sample.meta.get('source', 'COCO JSON')} (annotation {sample.meta.get('annotation_id')})"
    )


def load_sample(
    sample: MaskSample, *, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Loads a sample of any loader in this module.

    Returns:
        ``(image H x W x 3 uint8 RGB, mask H x W bool, ignore H x W bool or None)``.

    Raises:
        DatasetError: a file is missing or corrupt, the mask (or ignore mask) size differs from
            the image, or the mask is empty.
    """
    image = _load_image(Path(sample.image_path), max_pixels)
    mask = _load_gt(sample)
    hw = image.shape[:2]
    if mask.shape != hw:
        raise DatasetError(
            _mask_source(sample),
            f"mask is {mask.shape[1]} x {mask.shape[0]} (W x H) but its image "
            f"{sample.image_path} is {hw[1]} x {hw[0]}; expected the same size",
        )
    if not mask.any():
        raise DatasetError(
            _mask_source(sample),
            "mask is empty (no object pixel); pass skip_empty=True to drop empty masks",
        )
    ignore = None
    ignore_path = sample.meta.get("ignore_path")
    if ignore_path is not None:
        ignore = load_mask(ignore_path, value=sample.meta.get("ignore_value"))
        if ignore.shape != hw:
            raise DatasetError(
                ignore_path, f"ignore mask is {ignore.shape} but the image is {hw}; expected same"
            )
    return image, mask, ignore


# --------------------------------------------------------------------------- datasets
class MaskDataset(Sequence[MaskSample]):
    """Base class: a list of samples, ``load(sample)`` and the checks every loader shares."""

    def __init__(
        self,
        samples: Sequence[MaskSample],
        *,
        check_files: bool = True,
        skip_empty: bool = False,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.max_pixels = max_pixels
        samples = list(samples)
        if check_files:
            self._check_files(samples)
        if skip_empty:
            samples = self._drop_empty(samples)
        self.samples: list[MaskSample] = samples

    @staticmethod
    def _check_files(samples: Sequence[MaskSample]) -> None:
        seen: set[Path] = set()
        for s in samples:
            for path, what in ((s.image_path, "image"), (s.mask_path, "mask")):
                if path is None or path in seen:
                    continue
                if not Path(path).is_file():
                    raise DatasetError(path, f"{what} file not found")
                seen.add(path)

    @staticmethod
    def _drop_empty(samples: Sequence[MaskSample]) -> list[MaskSample]:
        kept = []
        for s in samples:
            if _load_gt(s).any():
                kept.append(s)
            else:
                logger.warning("%s: empty mask, skipped", _mask_source(s))
        if len(kept) < len(samples):
            logger.warning("skipped %d empty masks of %d", len(samples) - len(kept), len(samples))
        return kept

    def __len__(self) -> int:
        return len(self.samples)

    @overload
    def __getitem__(self, index: int) -> MaskSample: ...

    @overload
    def __getitem__(self, index: slice) -> list[MaskSample]: ...

    def __getitem__(self, index: int | slice) -> MaskSample | list[MaskSample]:
        return self.samples[index]

    def __iter__(self) -> Iterator[MaskSample]:
        return iter(self.samples)

    def load(self, sample: MaskSample | int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """``(image H x W x 3 uint8, mask H x W bool, ignore H x W bool | None)`` of a sample
        (or of the sample at an index); see :func:`load_sample`."""
        if isinstance(sample, (int, np.integer)):
            sample = self.samples[int(sample)]
        return load_sample(sample, max_pixels=self.max_pixels)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} samples)"


class ManifestDataset(MaskDataset):
    """``root/manifest.jsonl``: one JSON object per mask.

    Required fields: ``image`` and ``mask`` (paths relative to ``root``, or absolute). Optional:
    ``category``. All fields are kept in ``meta``; ``meta["name"]`` is the mask file's stem.

    Args:
        root: the dataset folder.
        manifest: the manifest file name inside ``root`` (or a path).
        check_files, skip_empty, max_pixels: see :class:`MaskDataset` and the module docstring.
    """

    def __init__(
        self,
        root: PathLike,
        *,
        manifest: PathLike = "manifest.jsonl",
        check_files: bool = True,
        skip_empty: bool = False,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.root = Path(root)
        self.manifest_path = self.root / manifest
        super().__init__(
            self._read(),
            check_files=check_files,
            skip_empty=skip_empty,
            max_pixels=max_pixels,
        )

    def _read(self) -> list[MaskSample]:
        path = self.manifest_path
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError as exc:
            raise DatasetError(path, "manifest not found; expected a manifest.jsonl") from exc
        except (OSError, UnicodeDecodeError) as exc:
            raise DatasetError(path, f"cannot read the manifest ({exc})") from exc
        samples = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetError(path, f"line {lineno} is not valid JSON ({exc})") from exc
            if not isinstance(record, dict):
                raise DatasetError(path, f"line {lineno} is not a JSON object")
            missing = [k for k in ("image", "mask") if not isinstance(record.get(k), str)]
            if missing:
                raise DatasetError(
                    path, f"line {lineno} lacks {' and '.join(missing)}; expected path strings"
                )
            mask_path = self.root / record["mask"]
            category = record.get("category")
            samples.append(
                MaskSample(
                    image_path=self.root / record["image"],
                    mask_path=mask_path,
                    category=None if category is None else str(category),
                    meta={"name": mask_path.stem, **record},
                )
            )
        if not samples:
            logger.warning("%s: no masks listed", path)
        return samples


class DavisDataset(MaskDataset):
    """The DAVIS-345 layout: ``root/images/NNN.jpg`` and ``root/masks/NNN.png``.

    Args:
        root: the ``val/DAVIS`` folder.
        ignore_void: take the DAVIS "void" index (255) of ``root/instances/NNN.png`` as ignore
            pixels. Off by default: the literature (RITM's loader, hence every published NoC)
            counts them as object, as ``masks/`` does.
        check_files, skip_empty, max_pixels: see :class:`MaskDataset`.
    """

    def __init__(
        self,
        root: PathLike,
        *,
        ignore_void: bool = False,
        check_files: bool = True,
        skip_empty: bool = False,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.root = Path(root)
        images_dir = self.root / "images"
        if not images_dir.is_dir():
            raise DatasetError(images_dir, "folder not found; expected root/images/NNN.jpg")
        samples = []
        for image_path in sorted(images_dir.iterdir()):
            if image_path.suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            meta: dict[str, Any] = {"name": image_path.stem}
            if ignore_void:
                meta["ignore_path"] = self.root / "instances" / f"{image_path.stem}.png"
                meta["ignore_value"] = 255
            samples.append(
                MaskSample(
                    image_path=image_path,
                    mask_path=self.root / "masks" / f"{image_path.stem}.png",
                    category=None,
                    meta=meta,
                )
            )
        if not samples:
            raise DatasetError(images_dir, "no images found")
        super().__init__(
            samples, check_files=check_files, skip_empty=skip_empty, max_pixels=max_pixels
        )


class FolderDataset(MaskDataset):
    """``images_dir/<stem>.<ext>`` paired with ``masks_dir/<stem><mask_suffix>``.

    Every image needs its mask (a missing one is a :class:`DatasetError` when
    ``check_files=True``); masks without an image are ignored.
    """

    def __init__(
        self,
        images_dir: PathLike,
        masks_dir: PathLike,
        *,
        mask_suffix: str = ".png",
        category: str | None = None,
        check_files: bool = True,
        skip_empty: bool = False,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.images_dir, self.masks_dir = Path(images_dir), Path(masks_dir)
        for d in (self.images_dir, self.masks_dir):
            if not d.is_dir():
                raise DatasetError(d, "folder not found")
        samples = [
            MaskSample(
                image_path=p,
                mask_path=self.masks_dir / f"{p.stem}{mask_suffix}",
                category=category,
                meta={"name": p.stem},
            )
            for p in sorted(self.images_dir.iterdir())
            if p.suffix.lower() in IMAGE_EXTENSIONS
        ]
        if not samples:
            raise DatasetError(self.images_dir, "no images found")
        super().__init__(
            samples, check_files=check_files, skip_empty=skip_empty, max_pixels=max_pixels
        )


class CocoDataset(MaskDataset):
    """A COCO instances JSON: one sample per annotation, images from ``image_dir``.

    Segmentations may be polygons, compressed RLE (``counts`` a string) or uncompressed RLE
    (``counts`` a list); they are decoded at the image entry's ``height x width``, which must
    match the image file. The annotation (``segmentation``, ``bbox``, ``area``, ids) is kept in
    ``meta``; ``meta["name"]`` is ``<image stem>_ann<annotation id>``.

    Args:
        json_path: the annotation file.
        image_dir: folder holding the images' ``file_name``.
        include_crowd: keep ``iscrowd=1`` annotations (skipped by default, as in COCO
            evaluation: they cover groups of objects).
        check_files, skip_empty, max_pixels: see :class:`MaskDataset`.
    """

    def __init__(
        self,
        json_path: PathLike,
        image_dir: PathLike,
        *,
        include_crowd: bool = False,
        check_files: bool = True,
        skip_empty: bool = False,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.json_path, self.image_dir = Path(json_path), Path(image_dir)
        samples = self._read(include_crowd)
        super().__init__(
            samples, check_files=check_files, skip_empty=skip_empty, max_pixels=max_pixels
        )

    def _read(self, include_crowd: bool) -> list[MaskSample]:
        path = self.json_path
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise DatasetError(path, "COCO JSON not found") from exc
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DatasetError(path, f"cannot read the COCO JSON ({exc})") from exc
        if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
            raise DatasetError(path, "expected a JSON object with 'images' and 'annotations'")
        try:
            images = {img["id"]: img for img in data.get("images", [])}
            categories = {c["id"]: c.get("name") for c in data.get("categories", [])}
        except (KeyError, TypeError) as exc:
            raise DatasetError(path, f"malformed images or categories list ({exc})") from exc
        samples = []
        n_crowd = 0
        for ann in data["annotations"]:
            if not isinstance(ann, dict) or "segmentation" not in ann:
                raise DatasetError(path, f"annotation without a segmentation: {str(ann)[:200]}")
            if ann.get("iscrowd", 0) and not include_crowd:
                n_crowd += 1
                continue
            img = images.get(ann.get("image_id"))
            if img is None:
                raise DatasetError(
                    path,
                    f"annotation {ann.get('id')} refers to unknown image {ann.get('image_id')}",
                )
            try:
                image_path = self.image_dir / img["file_name"]
                height, width = int(img["height"]), int(img["width"])
            except (KeyError, TypeError, ValueError) as exc:
                raise DatasetError(
                    path, f"image {img.get('id')} lacks file_name, height or width"
                ) from exc
            cat = categories.get(ann.get("category_id"))
            samples.append(
                MaskSample(
                    image_path=image_path,
                    mask_path=None,
                    category=None if cat is None else str(cat),
                    meta={
                        "name": f"{image_path.stem}_ann{ann.get('id')}",
                        "source": str(path),
                        "annotation_id": ann.get("id"),
                        "image_id": ann.get("image_id"),
                        "category_id": ann.get("category_id"),
                        "segmentation": ann["segmentation"],
                        "height": height,
                        "width": width,
                        "bbox": ann.get("bbox"),
                        "area": ann.get("area"),
                        "iscrowd": ann.get("iscrowd", 0),
                    },
                )
            )
        if n_crowd:
            logger.info("%s: skipped %d iscrowd annotations", path, n_crowd)
        return samples
