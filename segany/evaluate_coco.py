"""COCO-style mask AP / AR: "segment everything" and box-prompted masks against ground truth.

Two evaluations, both scored by pycocotools' ``COCOeval`` (``iouType="segm"``):

:func:`evaluate_everything`
    Runs an automatic mask generator (:class:`segany.AutomaticMaskGenerator`, or anything with
    ``generate(image) -> records``) on every image and compares all its masks with all the
    image's ground-truth masks.
:func:`evaluate_box_prompted`
    Prompts a predictor with the tight box of every ground-truth mask and compares the
    returned masks with the ground truth (mask AP / AR, and the mean IoU of each prediction
    with its own ground truth).

Conventions (both evaluations)
    * **Class-agnostic.** SAM predicts no classes, so every ground-truth mask and every
      prediction is put in one category; a prediction may match any object or stuff region.
    * **Scores.** COCO AP ranks predictions by score. "Everything" masks are scored with the
      generator's ``predicted_iou`` by default, the ranking the generator itself uses for NMS;
      ``score="stability_score"`` or ``"product"`` (``predicted_iou * stability_score``) are
      the alternatives. Box-prompted masks are scored with the predictor's predicted IoU.
    * **Crowd and ignore regions.** A ground-truth mask flagged ``iscrowd`` (COCO's crowd
      annotations; the ``iscrowd`` field of a ``manifest.jsonl``) is a crowd region for
      ``COCOeval``: it is never missed, and a prediction that matches no object but lies
      mostly inside it (intersection / prediction area >= the IoU threshold) is not a false
      positive. Ignore pixels of a dataset (DAVIS "void") become one more crowd region of
      their image. Crowd regions are not prompted in the box evaluation. A
      :class:`segany.data.CocoDataset` skips crowd annotations unless built with
      ``include_crowd=True``; without them, predictions on crowds count as false positives.
    * **Areas.** Areas (for small / medium / large: below 32², 32² to 96², above 96² pixels)
      are pixel counts of the masks, for the ground truth as for the predictions.
    * **Numbers.** AP and AR are fractions in [0, 1]; ``None`` where undefined (no ground
      truth in that size range). ``AP``, ``AP50``, ``AP75`` and ``AP_small/medium/large`` are
      COCO's, at ``ap_max_dets`` (100) predictions per image; ``AR@k`` is the recall with at
      most ``k`` predictions per image for every ``k`` of ``max_dets`` (1, 10, 100 and 1000,
      since SAM emits many masks: AR@1000 is the usual figure for object proposals), and
      ``AR_small/medium/large@K`` is at the largest ``K`` of ``max_dets``.

Datasets
    Any loader of :mod:`segany.data` (``ManifestDataset``, ``CocoDataset``, ``DavisDataset``,
    ``FolderDataset``: one sample per mask, grouped here by image file), an iterable of
    :class:`ImageTargets`, or of ``(name, image, masks)`` / ``(name, image, masks, iscrowd)``
    tuples with an ``H x W x 3`` uint8 image and ``N x H x W`` masks.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from tqdm.auto import tqdm

from .evaluate import InteractivePredictor, _gt_box, _Runner, mask_iou

logger = logging.getLogger(__name__)

__all__ = [
    "SCORES",
    "CocoMaskEvaluator",
    "ImageTargets",
    "MaskGenerator",
    "evaluate_box_prompted",
    "evaluate_everything",
    "iter_image_targets",
    "summary_line",
]

#: How "everything" masks are scored for the AP ranking (see the module docstring).
SCORES = ("predicted_iou", "stability_score", "product")
DEFAULT_MAX_DETS = (1, 10, 100, 1000)
_CROWD_COLOR = (128, 128, 128)


class MaskGenerator(Protocol):
    """What :func:`evaluate_everything` needs: ``AutomaticMaskGenerator.generate``."""

    def generate(self, image: np.ndarray) -> list[dict[str, Any]]: ...


# --------------------------------------------------------------------------- ground truth
@dataclass
class ImageTargets:
    """One image and all its ground-truth masks.

    Attributes:
        name: a short unique name (reports, overlay file names).
        image: ``H x W x 3`` uint8 RGB.
        masks: ``N`` masks, each ``H x W`` bool.
        iscrowd: ``N`` flags; a crowd mask is a region to ignore, not an object to find.
        ignore: ``H x W`` bool pixels to ignore (evaluated as one more crowd region), or None.
    """

    name: str
    image: np.ndarray
    masks: list[np.ndarray]
    iscrowd: list[bool]
    ignore: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.image = np.asarray(self.image)
        if self.image.ndim != 3 or self.image.shape[2] != 3:
            raise ValueError(f"{self.name}: image has shape {self.image.shape}; expected H x W x 3")
        hw = self.image.shape[:2]
        self.masks = [np.asarray(m).astype(bool, copy=False) for m in self.masks]
        for k, m in enumerate(self.masks):
            if m.shape != hw:
                raise ValueError(f"{self.name}: mask {k} is {m.shape} but the image is {hw}")
        self.iscrowd = [bool(c) for c in self.iscrowd]
        if len(self.iscrowd) != len(self.masks):
            raise ValueError(
                f"{self.name}: {len(self.masks)} masks but {len(self.iscrowd)} iscrowd flags"
            )
        if self.ignore is not None:
            self.ignore = np.asarray(self.ignore).astype(bool, copy=False)
            if self.ignore.shape != hw:
                raise ValueError(f"{self.name}: ignore is {self.ignore.shape} but image is {hw}")

    @property
    def objects(self) -> list[int]:
        """Indices of the masks that are objects (not crowd)."""
        return [k for k, c in enumerate(self.iscrowd) if not c]


def _is_crowd(meta: Mapping[str, Any]) -> bool:
    value = meta.get("iscrowd")
    return bool(value) if value is not None else False


def _group_samples(dataset: Any) -> list[tuple[Path, list[Any]]]:
    groups: OrderedDict[Path, list[Any]] = OrderedDict()
    for sample in dataset:
        groups.setdefault(Path(sample.image_path), []).append(sample)
    return list(groups.items())


def _load_group(image_path: Path, samples: list[Any], max_pixels: int | None) -> ImageTargets:
    """Reads an image once and all its masks (empty masks are skipped with a warning)."""
    from .data import DatasetError, _load_image, _mask_source, load_mask, load_sample_mask

    image = _load_image(image_path, max_pixels)
    hw = image.shape[:2]
    masks, crowd = [], []
    ignore: np.ndarray | None = None
    for s in samples:
        mask = load_sample_mask(s)
        if mask.shape != hw:
            raise DatasetError(
                _mask_source(s),
                f"mask is {mask.shape[1]} x {mask.shape[0]} (W x H) but its image {image_path} "
                f"is {hw[1]} x {hw[0]}; expected the same size",
            )
        if not mask.any():
            logger.warning("%s: empty mask, skipped", _mask_source(s))
        else:
            masks.append(mask)
            crowd.append(_is_crowd(s.meta))
        ignore_path = s.meta.get("ignore_path")
        if ignore_path is not None:
            extra = load_mask(ignore_path, value=s.meta.get("ignore_value"))
            if extra.shape != hw:
                raise DatasetError(ignore_path, f"ignore mask is {extra.shape}; image is {hw}")
            ignore = extra if ignore is None else ignore | extra
    name = str(samples[0].meta.get("image_id", image_path.stem)) if samples else image_path.stem
    return ImageTargets(name, image, masks, crowd, ignore)


def iter_image_targets(data: Any, limit: int | None = None) -> Iterator[ImageTargets]:
    """:class:`ImageTargets` of each image of ``data`` (see "Datasets" in the module docstring).

    Args:
        data: a dataset of :mod:`segany.data`, ImageTargets, or tuples.
        limit: only the first ``limit`` images.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit must be a non-negative int or None, got {limit!r}")
    if callable(getattr(data, "load", None)):
        max_pixels = getattr(data, "max_pixels", None)
        for i, (path, samples) in enumerate(_group_samples(data)):
            if limit is not None and i >= limit:
                return
            yield _load_group(path, samples, max_pixels)
        return
    for i, item in enumerate(data):
        if limit is not None and i >= limit:
            return
        if isinstance(item, ImageTargets):
            yield item
        elif isinstance(item, (tuple, list)) and len(item) in (3, 4):
            masks = list(np.asarray(item[2], dtype=bool)) if len(item[2]) else []
            crowd = list(item[3]) if len(item) == 4 else [False] * len(masks)
            yield ImageTargets(str(item[0]), np.asarray(item[1]), masks, crowd)
        else:
            raise ValueError(
                "data must be a dataset with load(sample), ImageTargets, or (name, image, "
                f"masks[, iscrowd]) tuples; item {i} is {type(item).__name__}"
            )


def _count_images(data: Any, limit: int | None) -> int | None:
    if callable(getattr(data, "load", None)):
        n: int | None = len({Path(s.image_path) for s in data})
    elif hasattr(data, "__len__"):
        n = len(data)
    else:
        n = None
    if n is None or limit is None:
        return n
    return min(n, limit)


# --------------------------------------------------------------------------- COCOeval
def _to_rle(mask_or_rle: Any) -> dict[str, Any]:
    """An ``H x W`` mask, or a compressed / uncompressed RLE -> pycocotools' compressed RLE."""
    from .masks import _coco_rle, encode_rle

    if isinstance(mask_or_rle, Mapping):
        return _coco_rle(mask_or_rle)
    if hasattr(mask_or_rle, "detach"):  # a torch tensor
        mask_or_rle = mask_or_rle.detach().cpu().numpy()
    return _coco_rle(encode_rle(np.asarray(mask_or_rle)))


class CocoMaskEvaluator:
    """Collects ground truth and predictions image by image, then runs ``COCOeval`` on them.

    Every mask goes in one category (class-agnostic). Usage::

        ev = CocoMaskEvaluator()
        ev.add_image((h, w), gt_masks, gt_iscrowd, pred_masks, pred_scores)
        metrics = ev.summarize()

    Args:
        max_dets: the ``maxDets`` of ``COCOeval`` (increasing); AR is reported for each.
        ap_max_dets: predictions per image for AP (COCO: 100); must be one of ``max_dets``.
    """

    def __init__(
        self, max_dets: Sequence[int] = DEFAULT_MAX_DETS, *, ap_max_dets: int = 100
    ) -> None:
        dets = [int(d) for d in max_dets]
        if not dets or any(d < 1 for d in dets) or dets != sorted(set(dets)):
            raise ValueError(f"max_dets must be increasing positive ints, got {list(max_dets)}")
        if ap_max_dets not in dets:
            raise ValueError(f"ap_max_dets {ap_max_dets} must be one of max_dets {dets}")
        self.max_dets = dets
        self.ap_max_dets = int(ap_max_dets)
        self.images: list[dict[str, Any]] = []
        self.gts: list[dict[str, Any]] = []
        self.dts: list[dict[str, Any]] = []

    def add_image(
        self,
        hw: tuple[int, int],
        gt_masks: Sequence[Any],
        gt_iscrowd: Sequence[bool],
        pred_masks: Sequence[Any],
        pred_scores: Sequence[float],
    ) -> int:
        """Adds one image; masks are ``H x W`` arrays or RLEs. Returns its COCO image id."""
        from pycocotools import mask as mask_utils

        if len(gt_masks) != len(gt_iscrowd):
            raise ValueError(f"{len(gt_masks)} gt masks but {len(gt_iscrowd)} iscrowd flags")
        if len(pred_masks) != len(pred_scores):
            raise ValueError(f"{len(pred_masks)} predictions but {len(pred_scores)} scores")
        h, w = int(hw[0]), int(hw[1])
        image_id = len(self.images) + 1
        self.images.append({"id": image_id, "height": h, "width": w})
        for mask, crowd in zip(gt_masks, gt_iscrowd):
            rle = _to_rle(mask)
            self._check_size(rle, h, w)
            self.gts.append(
                {
                    "id": len(self.gts) + 1,
                    "image_id": image_id,
                    "category_id": 1,
                    "segmentation": rle,
                    "area": float(mask_utils.area(rle)),
                    "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                    "iscrowd": int(bool(crowd)),
                }
            )
        for mask, score in zip(pred_masks, pred_scores):
            rle = _to_rle(mask)
            self._check_size(rle, h, w)
            score = float(score)
            if not np.isfinite(score):
                raise ValueError(f"prediction score {score} is not finite")
            self.dts.append(
                {"image_id": image_id, "category_id": 1, "segmentation": rle, "score": score}
            )
        return image_id

    @staticmethod
    def _check_size(rle: Mapping[str, Any], h: int, w: int) -> None:
        if [int(s) for s in rle["size"]] != [h, w]:
            raise ValueError(f"a mask is {list(rle['size'])} but its image is [{h}, {w}]")

    def summarize(self) -> dict[str, float | None]:
        """Runs ``COCOeval`` (segm, one category) and returns the metrics (module docstring)."""
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        if not self.images:
            raise ValueError("no images to evaluate")
        gt = COCO()
        gt.dataset = {
            "images": [dict(i) for i in self.images],
            "categories": [{"id": 1, "name": "object"}],
            "annotations": [dict(a) for a in self.gts],
        }
        # pycocotools reports its progress with print(): keep it out of our stdout.
        with contextlib.redirect_stdout(io.StringIO()):
            gt.createIndex()
            if self.dts:
                dt = gt.loadRes([dict(d) for d in self.dts])
            else:  # loadRes cannot take an empty list
                dt = COCO()
                dt.dataset = {
                    "images": [dict(i) for i in self.images],
                    "categories": [{"id": 1, "name": "object"}],
                    "annotations": [],
                }
                dt.createIndex()
            ev = COCOeval(gt, dt, iouType="segm")
            ev.params.maxDets = list(self.max_dets)
            ev.evaluate()
            ev.accumulate()
        self.cocoeval = ev
        top = self.max_dets[-1]
        ap = self.ap_max_dets
        metrics: dict[str, float | None] = {
            "AP": _read(ev, True, None, "all", ap),
            "AP50": _read(ev, True, 0.5, "all", ap),
            "AP75": _read(ev, True, 0.75, "all", ap),
            "AP_small": _read(ev, True, None, "small", ap),
            "AP_medium": _read(ev, True, None, "medium", ap),
            "AP_large": _read(ev, True, None, "large", ap),
        }
        for d in self.max_dets:
            metrics[f"AR@{d}"] = _read(ev, False, None, "all", d)
        for size in ("small", "medium", "large"):
            metrics[f"AR_{size}@{top}"] = _read(ev, False, None, size, top)
        return metrics


def _read(ev: Any, ap: bool, iou: float | None, area: str, max_dets: int) -> float | None:
    """The mean of ``COCOeval.eval``'s precision (``ap``) or recall over the valid entries
    (> -1) at one IoU threshold (or all), area range and maxDets, exactly as
    ``COCOeval.summarize`` reads it; ``None`` where it prints -1."""
    p = ev.params
    a = p.areaRngLbl.index(area)
    m = list(p.maxDets).index(max_dets)
    # precision is T x R x K x A x M, recall T x K x A x M (T IoU thresholds, R recall
    # points, K categories, A area ranges, M maxDets): keep one area range and one maxDets.
    s = ev.eval["precision" if ap else "recall"][..., a, m]
    if iou is not None:
        s = s[np.flatnonzero(np.isclose(p.iouThrs, iou))]
    valid = s[s > -1]
    return float(np.mean(valid)) if valid.size else None


# --------------------------------------------------------------------------- helpers
def _record_score(record: Mapping[str, Any], score: str) -> float:
    if score == "predicted_iou":
        return float(record["predicted_iou"])
    if score == "stability_score":
        return float(record["stability_score"])
    return float(record["predicted_iou"]) * float(record["stability_score"])


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:80] or "image"


def _save_side_by_side(
    path: Path,
    target: ImageTargets,
    pred_masks: Sequence[np.ndarray],
    boxes: np.ndarray | None = None,
) -> None:
    """Ground truth (crowd and ignore in grey) on the left, predictions on the right."""
    from PIL import Image

    from .masks import atomic_write, overlay, palette

    gt = [target.masks[k] for k in target.objects]
    grey = [target.masks[k] for k, c in enumerate(target.iscrowd) if c]
    if target.ignore is not None and target.ignore.any():
        grey.append(target.ignore)
    colors = np.concatenate([palette(len(gt)), np.tile(_CROWD_COLOR, (len(grey), 1))])
    left = overlay(target.image, gt + grey, colors=colors if len(colors) else None, boxes=boxes)
    right = overlay(target.image, list(pred_masks), boxes=boxes)
    gap = np.full((left.shape[0], 8, 3), 255, dtype=np.uint8)
    with atomic_write(path) as f:
        Image.fromarray(np.concatenate([left, gap, right], axis=1)).save(f, format="PNG")


def _prepare_overlays(overlays: str | Path | None, n_overlays: int) -> Path | None:
    if n_overlays < 0:
        raise ValueError(f"n_overlays must be >= 0, got {n_overlays}")
    if overlays is None or n_overlays == 0:
        return None
    out = Path(overlays)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _crowd_regions(target: ImageTargets) -> tuple[list[np.ndarray], list[bool]]:
    """The image's ground truth for COCOeval: its masks, plus the ignore pixels as a crowd."""
    masks, crowd = list(target.masks), list(target.iscrowd)
    if target.ignore is not None and target.ignore.any():
        masks.append(target.ignore)
        crowd.append(True)
    return masks, crowd


# --------------------------------------------------------------------------- everything
def evaluate_everything(
    generator_or_model: Any,
    dataset: Any,
    *,
    score: str = "predicted_iou",
    max_dets: Sequence[int] = DEFAULT_MAX_DETS,
    ap_max_dets: int = 100,
    limit: int | None = None,
    progress: bool = True,
    overlays: str | Path | None = None,
    n_overlays: int = 8,
    generator_kwargs: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Mask AP / AR of "segment everything" against every ground-truth mask of each image.

    Args:
        generator_or_model: an :class:`segany.AutomaticMaskGenerator` (or any object with
            ``generate(image) -> records`` whose records have ``segmentation`` as an ``H x W``
            mask or an RLE, ``predicted_iou`` and ``stability_score``), or a SAM model, for
            which an ``AutomaticMaskGenerator(model, **generator_kwargs)`` is built.
        dataset: see "Datasets" in the module docstring.
        score: the prediction score for the AP ranking, one of :data:`SCORES`.
        max_dets: ``COCOeval``'s maxDets; AR is reported at each.
        ap_max_dets: predictions per image for AP (COCO's 100).
        limit: evaluate the first ``limit`` images only.
        progress: show a tqdm progress bar over images.
        overlays: a folder for side-by-side PNGs (ground truth | generated masks) of the first
            ``n_overlays`` images, or None.
        n_overlays: how many images get an overlay.
        generator_kwargs: settings of the generator built from a model (e.g.
            ``points_per_side``, ``pred_iou_thresh``); refused with a generator.

    Returns:
        A JSON-serialisable dict: ``metrics`` (``AP``, ``AP50``, ``AP75``, ``AP_small``,
        ``AP_medium``, ``AP_large``, ``AR@k`` for each k of ``max_dets``,
        ``AR_small/medium/large@K`` at the largest K), ``n_images``, ``n_gt`` (objects),
        ``n_crowd`` (crowd and ignore regions), ``n_predictions``,
        ``predictions_per_image``, ``seconds_per_image`` (generation only), ``generator``
        (class name and settings), ``settings`` and ``per_image`` (``name``, ``n_gt``,
        ``n_crowd``, ``n_predictions``, ``seconds``).

    Raises:
        ValueError: bad arguments, an empty dataset, or records without the needed fields.
    """
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    generator = _as_generator(generator_or_model, generator_kwargs)
    evaluator = CocoMaskEvaluator(max_dets, ap_max_dets=ap_max_dets)
    overlay_dir = _prepare_overlays(overlays, n_overlays)
    per_image: list[dict[str, Any]] = []
    seconds = 0.0
    bar = tqdm(
        iter_image_targets(dataset, limit),
        total=_count_images(dataset, limit),
        disable=not progress,
        desc="everything",
        unit="img",
    )
    for target in bar:
        start = time.perf_counter()
        records = generator.generate(target.image)
        elapsed = time.perf_counter() - start
        seconds += elapsed
        try:
            rles = [_to_rle(r["segmentation"]) for r in records]
            scores = [_record_score(r, score) for r in records]
        except (KeyError, TypeError) as exc:
            raise ValueError(
                f"{target.name}: generator records need 'segmentation', 'predicted_iou' and "
                f"'stability_score' ({exc!r})"
            ) from exc
        gt_masks, gt_crowd = _crowd_regions(target)
        evaluator.add_image(target.image.shape[:2], gt_masks, gt_crowd, rles, scores)
        if overlay_dir is not None and len(per_image) < n_overlays:
            from .masks import decode_rle

            order = np.argsort(-np.asarray(scores), kind="stable")
            path = overlay_dir / f"{len(per_image):03d}_{_safe_name(target.name)}.png"
            _save_side_by_side(path, target, [decode_rle(rles[i]) for i in order])
        per_image.append(
            {
                "name": target.name,
                "n_gt": len(target.objects),
                "n_crowd": len(gt_masks) - len(target.objects),
                "n_predictions": len(records),
                "seconds": elapsed,
            }
        )
        bar.set_postfix(masks=len(records))
    bar.close()
    if not per_image:
        raise ValueError("no images to evaluate (empty dataset or limit=0)")
    metrics = evaluator.summarize()
    n = len(per_image)
    n_pred = sum(r["n_predictions"] for r in per_image)
    report: dict[str, Any] = {
        "task": "everything",
        "metrics": metrics,
        "n_images": n,
        "n_gt": sum(r["n_gt"] for r in per_image),
        "n_crowd": sum(r["n_crowd"] for r in per_image),
        "n_predictions": n_pred,
        "predictions_per_image": n_pred / n,
        "seconds_per_image": seconds / n,
        "generator": _describe_generator(generator),
        "settings": {
            "score": score,
            "max_dets": list(evaluator.max_dets),
            "ap_max_dets": evaluator.ap_max_dets,
            "class_agnostic": True,
            "iou_type": "segm",
            "limit": limit,
        },
        "per_image": per_image,
    }
    logger.info(
        "everything on %d images: AP %s, AR@%d %s",
        n,
        metrics["AP"],
        evaluator.max_dets[-1],
        metrics[f"AR@{evaluator.max_dets[-1]}"],
    )
    return report


def _as_generator(obj: Any, kwargs: Mapping[str, Any] | None) -> MaskGenerator:
    if callable(getattr(obj, "generate", None)):
        if kwargs:
            raise ValueError("generator_kwargs are only used when a model is given")
        return obj  # type: ignore[no-any-return]
    import torch

    if isinstance(obj, torch.nn.Module):
        from .automatic import AutomaticMaskGenerator

        settings = {"output_mode": "coco_rle", **(kwargs or {})}
        return AutomaticMaskGenerator(obj, **settings)  # type: ignore[arg-type]
    raise ValueError(
        f"expected a mask generator (with generate(image)) or a SAM model, got {type(obj).__name__}"
    )


_GENERATOR_SETTINGS = (
    "points_per_batch",
    "pred_iou_thresh",
    "stability_score_thresh",
    "stability_score_offset",
    "box_nms_thresh",
    "crop_n_layers",
    "crop_nms_thresh",
    "crop_overlap_ratio",
    "crop_n_points_downscale_factor",
    "min_mask_region_area",
)


def _describe_generator(generator: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"class": type(generator).__name__}
    for key in _GENERATOR_SETTINGS:
        value = getattr(generator, key, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = value
    grids = getattr(generator, "point_grids", None)
    if grids:
        out["points_per_layer"] = [len(g) for g in grids]
    return out


# --------------------------------------------------------------------------- box prompts
def evaluate_box_prompted(
    predictor: InteractivePredictor,
    dataset: Any,
    *,
    multimask: bool = False,
    max_dets: Sequence[int] = DEFAULT_MAX_DETS,
    ap_max_dets: int = 100,
    limit: int | None = None,
    progress: bool = True,
    overlays: str | Path | None = None,
    n_overlays: int = 8,
) -> dict[str, Any]:
    """Mask AP / AR and mean IoU with each ground-truth box as the prompt.

    Each image is encoded once (``set_image``); every object mask (not crowd) is prompted with
    its tight box ``x0, y0, x1, y1`` = min column, min row, max column, max row (inclusive, as
    :func:`segany.evaluate.evaluate_interactive`'s box run and SAM's generator), computed
    outside ignore pixels. The prediction is one mask (``multimask_output=False``, SAM's
    setting for an unambiguous box prompt), or with ``multimask=True`` the candidate of three
    with the highest predicted IoU. A pixel is object when its logit is > 0 (the model's mask
    threshold). Each prediction is scored with its predicted IoU for the AP ranking.

    Args:
        predictor: ``set_image(image)`` and ``predict(box=..., multimask_output=...,
            return_logits=True)`` as :class:`segany.Predictor`.
        dataset: see "Datasets" in the module docstring.
        multimask: predict three candidates and keep the best-scoring one.
        max_dets, ap_max_dets: as in :func:`evaluate_everything`.
        limit: evaluate the first ``limit`` images only.
        progress: show a tqdm progress bar over images.
        overlays: a folder for side-by-side PNGs (ground truth | predictions, with the box
            prompts) of the first ``n_overlays`` images, or None.
        n_overlays: how many images get an overlay.

    Returns:
        A JSON-serialisable dict: ``metrics`` (as :func:`evaluate_everything`), ``miou`` (mean
        over instances of the IoU of each prediction with its own ground truth, ignore pixels
        left out), ``n_images``, ``n_instances``, ``n_crowd``, ``seconds_per_prediction``,
        ``seconds_per_image`` (``set_image``), ``predictor``, ``settings`` and
        ``per_instance`` (``name``, ``iou``, ``score``).
    """
    evaluator = CocoMaskEvaluator(max_dets, ap_max_dets=ap_max_dets)
    overlay_dir = _prepare_overlays(overlays, n_overlays)
    run = _Runner(predictor, 0.0)
    per_instance: list[dict[str, Any]] = []
    n_images = n_crowd = 0
    image_seconds = 0.0
    bar = tqdm(
        iter_image_targets(dataset, limit),
        total=_count_images(dataset, limit),
        disable=not progress,
        desc="box prompts",
        unit="img",
    )
    for target in bar:
        hw = target.image.shape[:2]
        objects = [k for k in target.objects if _box_target(target, k).any()]
        preds: list[np.ndarray] = []
        scores: list[float] = []
        boxes = np.zeros((0, 4), dtype=np.float32)
        if objects:
            start = time.perf_counter()
            predictor.set_image(target.image)
            image_seconds += time.perf_counter() - start
            boxes = np.stack([_gt_box(_box_target(target, k)) for k in objects])
        for k, box in zip(objects, boxes):
            masks, ious, _ = run(hw, box=box, multimask_output=multimask)
            best = int(np.argmax(ious)) if multimask and len(ious) == len(masks) else 0
            preds.append(masks[best])
            scores.append(float(ious[best]) if len(ious) else 1.0)
            per_instance.append(
                {
                    "name": f"{target.name}#{k}",
                    "iou": mask_iou(masks[best], target.masks[k], target.ignore),
                    "score": scores[-1],
                }
            )
        gt_masks, gt_crowd = _crowd_regions(target)
        evaluator.add_image(hw, gt_masks, gt_crowd, preds, scores)
        n_images += 1
        n_crowd += sum(gt_crowd)
        if overlay_dir is not None and n_images <= n_overlays:
            path = overlay_dir / f"{n_images - 1:03d}_{_safe_name(target.name)}.png"
            _save_side_by_side(path, target, preds, boxes=boxes)
        if per_instance:
            bar.set_postfix(miou=f"{np.mean([r['iou'] for r in per_instance]):.3f}")
    bar.close()
    if n_images == 0:
        raise ValueError("no images to evaluate (empty dataset or limit=0)")
    if not per_instance:
        raise ValueError("no object masks to prompt (every mask is empty or a crowd region)")
    metrics = evaluator.summarize()
    report: dict[str, Any] = {
        "task": "box",
        "metrics": metrics,
        "miou": float(np.mean([r["iou"] for r in per_instance])),
        "n_images": n_images,
        "n_instances": len(per_instance),
        "n_crowd": n_crowd,
        "seconds_per_prediction": run.seconds_per_prediction,
        "seconds_per_image": image_seconds / n_images,
        "predictor": type(predictor).__name__,
        "settings": {
            "multimask": multimask,
            "box_convention": "x0, y0, x1, y1 = min col, min row, max col, max row (inclusive)",
            "max_dets": list(evaluator.max_dets),
            "ap_max_dets": evaluator.ap_max_dets,
            "class_agnostic": True,
            "iou_type": "segm",
            "limit": limit,
        },
        "per_instance": per_instance,
    }
    logger.info(
        "box prompts on %d instances: AP %s, mIoU %.4f",
        len(per_instance),
        metrics["AP"],
        report["miou"],
    )
    return report


def _box_target(target: ImageTargets, k: int) -> np.ndarray:
    mask = target.masks[k]
    return mask if target.ignore is None else mask & ~target.ignore


def summary_line(report: Mapping[str, Any]) -> str:
    """One line of the main figures of a report of this module."""
    m = report["metrics"]

    def f(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.3f}"

    ars = [k for k in m if k.startswith("AR@")]
    parts = [f"AP {f(m['AP'])}", f"AP50 {f(m['AP50'])}", f"AP75 {f(m['AP75'])}"]
    parts += [f"{k} {f(m[k])}" for k in ars]
    if report.get("task") == "box":
        parts.append(f"mIoU {report['miou']:.3f} ({report['n_instances']} boxes)")
    else:
        parts.append(
            f"({report['n_images']} images, {report['predictions_per_image']:.1f} masks each)"
        )
    return "  ".join(parts)
