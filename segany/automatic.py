""" "Segment everything": prompt a grid of points, keep the good masks, remove duplicates.

``AutomaticMaskGenerator`` is a drop-in for ``segment_anything.SamAutomaticMaskGenerator``:
same parameters, same output records, same masks. Differences are internal only: box NMS is
implemented here in torch/numpy (no torchvision), candidates are filtered on their predicted
IoU before being upsampled (the reference upsamples all first; the result is identical), and
masks are kept as COCO RLE between crops (pycocotools).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from itertools import product
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .modeling.sam import Sam, count_true
from .predictor import Predictor
from .registry import generator_defaults

logger = logging.getLogger(__name__)

OUTPUT_MODES = ("binary_mask", "uncompressed_rle", "coco_rle")


class AutomaticMaskGenerator:
    """Generates masks for a whole image without prompts (see the reference for semantics).

    Args:
        model: the SAM model.
        points_per_side: grid points along one side (``points_per_side**2`` prompts); exactly
            one of this and ``point_grids`` must be given.
        points_per_batch: prompts decoded together (memory/speed trade-off).
        pred_iou_thresh: keep masks whose predicted IoU is above this.
        stability_score_thresh: keep masks whose stability score is at least this.
        stability_score_offset: logit offset used for the stability score.
            These three default (None) to the model's own
            (:func:`segany.registry.generator_defaults`): SAM's 0.88 / 0.95 / 1.0 for the
            official variants and any unregistered config, calibrated values for segany-lite.
        box_nms_thresh: IoU threshold of box NMS among masks of one crop.
        crop_n_layers: extra layers of image crops (layer i has ``(2**i)**2`` crops).
        crop_nms_thresh: IoU threshold of box NMS between crops.
        crop_overlap_ratio: overlap of neighbouring crops, as a fraction of the side.
        crop_n_points_downscale_factor: grid side in layer i is divided by this ``**i``.
        point_grids: explicit grids, one ``N x 2`` array in [0, 1] per layer.
        min_mask_region_area: remove islands/holes smaller than this (pixels); 0 disables.
        output_mode: "binary_mask", "uncompressed_rle" or "coco_rle".
        backend: "torch" or "onnxruntime" (see :class:`segany.Predictor`).
        mask_chunk_bytes: full-size float masks are made at most this many bytes at a time
            (bounds the memory of large photos; the results do not depend on it). Small
            chunks are also faster on CPU: tensors above glibc's 32 MiB mmap ceiling are
            fresh pages every time (a one-off run, segany-lite everything at 640 px: 256 MiB
            4.3 s, 16 MiB 3.3 s, 4 MiB 3.6 s; ``benchmarks/lite_targets.py`` gives the total).
    """

    def __init__(
        self,
        model: Sam,
        points_per_side: int | None = 32,
        points_per_batch: int = 64,
        pred_iou_thresh: float | None = None,
        stability_score_thresh: float | None = None,
        stability_score_offset: float | None = None,
        box_nms_thresh: float = 0.7,
        crop_n_layers: int = 0,
        crop_nms_thresh: float = 0.7,
        crop_overlap_ratio: float = 512 / 1500,
        crop_n_points_downscale_factor: int = 1,
        point_grids: list[np.ndarray] | None = None,
        min_mask_region_area: int = 0,
        output_mode: str = "binary_mask",
        backend: str | Any = "torch",
        mask_chunk_bytes: int = 16 << 20,
    ) -> None:
        if (points_per_side is None) == (point_grids is None):
            raise ValueError("exactly one of points_per_side or point_grids must be given")
        if output_mode not in OUTPUT_MODES:
            raise ValueError(f"output_mode must be one of {OUTPUT_MODES}, got {output_mode!r}")
        if points_per_batch < 1:
            raise ValueError("points_per_batch must be >= 1")
        if crop_n_layers < 0:
            raise ValueError("crop_n_layers must be >= 0")
        if points_per_side is not None:
            if points_per_side < 1:
                raise ValueError("points_per_side must be >= 1")
            if crop_n_points_downscale_factor < 1:
                raise ValueError("crop_n_points_downscale_factor must be >= 1")
            last = points_per_side // crop_n_points_downscale_factor**crop_n_layers
            if last < 1:
                raise ValueError(
                    f"points_per_side={points_per_side} leaves no points in crop layer "
                    f"{crop_n_layers} (divided by {crop_n_points_downscale_factor}**"
                    f"{crop_n_layers}); use more points or fewer crop layers"
                )
            self.point_grids = build_all_layer_point_grids(
                points_per_side, crop_n_layers, crop_n_points_downscale_factor
            )
        else:
            assert point_grids is not None
            if len(point_grids) != crop_n_layers + 1:
                raise ValueError(
                    f"point_grids needs one grid per crop layer ({crop_n_layers + 1}), "
                    f"got {len(point_grids)}"
                )
            self.point_grids = [np.asarray(g, dtype=np.float64) for g in point_grids]
        self.predictor = Predictor(model, backend=backend)
        self.points_per_batch = points_per_batch
        defaults = generator_defaults(model)
        given = {
            "pred_iou_thresh": pred_iou_thresh,
            "stability_score_thresh": stability_score_thresh,
            "stability_score_offset": stability_score_offset,
        }
        settings = {k: float(defaults[k] if v is None else v) for k, v in given.items()}
        self.pred_iou_thresh = settings["pred_iou_thresh"]
        self.stability_score_thresh = settings["stability_score_thresh"]
        self.stability_score_offset = settings["stability_score_offset"]
        self.box_nms_thresh = box_nms_thresh
        self.crop_n_layers = crop_n_layers
        self.crop_nms_thresh = crop_nms_thresh
        self.crop_overlap_ratio = crop_overlap_ratio
        self.crop_n_points_downscale_factor = crop_n_points_downscale_factor
        self.min_mask_region_area = min_mask_region_area
        self.output_mode = output_mode
        if mask_chunk_bytes < 1:
            raise ValueError("mask_chunk_bytes must be >= 1")
        self.mask_chunk_bytes = mask_chunk_bytes

    @torch.no_grad()
    def generate(self, image: np.ndarray) -> list[dict[str, Any]]:
        """Masks for an ``H x W x 3`` uint8 RGB image, one record per mask.

        Record keys: ``segmentation`` (per ``output_mode``), ``area`` (int), ``bbox`` (xywh),
        ``predicted_iou``, ``point_coords`` ([[x, y]]), ``stability_score``, ``crop_box``
        (xywh).
        """
        from .images import validate_image_array
        from .masks import decode_rle, mask_to_uncompressed_rle, rle_area

        image = validate_image_array(image)
        data = self._generate_masks(image)
        if self.min_mask_region_area > 0:
            data = self._postprocess_small_regions(
                data, self.min_mask_region_area, max(self.box_nms_thresh, self.crop_nms_thresh)
            )
        records = []
        for i, rle in enumerate(data["rles"]):
            if self.output_mode == "coco_rle":
                seg: Any = rle
            elif self.output_mode == "binary_mask":
                seg = decode_rle(rle)
            else:
                seg = mask_to_uncompressed_rle(decode_rle(rle))
            records.append(
                {
                    "segmentation": seg,
                    "area": int(rle_area(rle)),
                    "bbox": _xyxy_to_xywh(data["boxes"][i]),
                    "predicted_iou": float(data["iou_preds"][i]),
                    "point_coords": [data["points"][i].tolist()],
                    "stability_score": float(data["stability_score"][i]),
                    "crop_box": _xyxy_to_xywh(data["crop_boxes"][i]),
                }
            )
        return records

    # ------------------------------------------------------------------ internals
    def _generate_masks(self, image: np.ndarray) -> dict[str, Any]:
        orig_size = (int(image.shape[0]), int(image.shape[1]))
        crop_boxes, layer_idxs = generate_crop_boxes(
            orig_size, self.crop_n_layers, self.crop_overlap_ratio
        )
        parts = [
            self._process_crop(image, box, layer, orig_size)
            for box, layer in zip(crop_boxes, layer_idxs)
        ]
        data = _cat(parts)
        if len(crop_boxes) > 1 and len(data["rles"]):
            # Prefer masks from smaller crops (they saw the object at higher resolution).
            scores = 1.0 / box_area(torch.as_tensor(data["crop_boxes"]))
            keep = batched_nms(
                torch.as_tensor(data["boxes"]).float(),
                scores,
                torch.zeros(len(data["rles"])),
                self.crop_nms_thresh,
            )
            data = _filter(data, keep.numpy())
        return data

    def _process_crop(
        self,
        image: np.ndarray,
        crop_box: list[int],
        layer_idx: int,
        orig_size: tuple[int, int],
    ) -> dict[str, Any]:
        x0, y0, x1, y1 = crop_box
        cropped = image[y0:y1, x0:x1, :]
        crop_size = (int(cropped.shape[0]), int(cropped.shape[1]))
        self.predictor.set_image(cropped)
        scale = np.array(crop_size)[None, ::-1]
        points_for_image = self.point_grids[layer_idx] * scale
        parts = [
            self._process_batch(points, crop_size, crop_box, orig_size)
            for points in batch_iterator(self.points_per_batch, points_for_image)
        ]
        self.predictor.reset_image()
        data = _cat(parts)
        if len(data["rles"]):
            keep = batched_nms(
                torch.as_tensor(data["boxes"]).float(),
                torch.as_tensor(data["iou_preds"]),
                torch.zeros(len(data["rles"])),
                self.box_nms_thresh,
            )
            data = _filter(data, keep.numpy())
        data["boxes"] = data["boxes"] + np.array([x0, y0, x0, y0], dtype=data["boxes"].dtype)
        data["points"] = data["points"] + np.array([x0, y0], dtype=data["points"].dtype)
        data["crop_boxes"] = np.tile(np.array(crop_box, dtype=np.int64), (len(data["rles"]), 1))
        return data

    def _process_batch(
        self,
        points: np.ndarray,
        im_size: tuple[int, int],
        crop_box: list[int],
        orig_size: tuple[int, int],
    ) -> dict[str, Any]:
        pred = self.predictor
        orig_h, orig_w = orig_size
        coords = pred.transform.apply_coords(points, im_size)
        # float64 like the reference: the prompt encoder casts after its +0.5 and scaling.
        in_points = torch.as_tensor(coords, device=pred.device)[:, None, :]
        in_labels = torch.ones(in_points.shape[0], 1, dtype=torch.int, device=pred.device)
        floor = self.pred_iou_thresh if self.pred_iou_thresh > 0.0 else None
        low_res, iou = pred.decode_low_res((in_points, in_labels), None, None, True, floor)
        n_out = low_res.shape[1]
        low_res = low_res.flatten(0, 1)
        iou = iou.flatten(0, 1)
        pts = np.repeat(points, n_out, axis=0)
        # Filtering on predicted IoU first is exact and spares upsampling rejected masks.
        keep = (
            iou > self.pred_iou_thresh
            if self.pred_iou_thresh > 0.0
            else torch.ones_like(iou, dtype=torch.bool)
        )
        low_res, iou, pts = low_res[keep], iou[keep], pts[keep.cpu().numpy()]
        # Full-size float masks for a whole batch would take points_per_batch x 3 x H x W x 4
        # bytes (9 GB for 64 points on a 4000 x 3000 photo): the rest runs per mask, so it
        # runs on chunks that fit ``mask_chunk_bytes``, with the same results.
        per_mask = 4 * im_size[0] * im_size[1] + orig_h * orig_w  # float crop + bool uncropped
        step = max(1, int(self.mask_chunk_bytes) // per_mask)
        parts = [
            self._masks_to_records(
                low_res[i : i + step], iou[i : i + step], pts[i : i + step], crop_box, orig_size
            )
            for i in range(0, len(iou), step)
        ]
        if not parts:
            parts = [self._masks_to_records(low_res, iou, pts, crop_box, orig_size)]
        return _cat(parts)

    def _masks_to_records(
        self,
        low_res: torch.Tensor,
        iou: torch.Tensor,
        pts: np.ndarray,
        crop_box: list[int],
        orig_size: tuple[int, int],
    ) -> dict[str, Any]:
        """Low-res logits of some masks -> RLEs, boxes and scores of those that pass the
        stability and crop-edge filters."""
        from .masks import encode_rle_batch

        pred = self.predictor
        model = pred.model
        orig_h, orig_w = orig_size
        assert pred.input_size is not None and pred.original_size is not None
        t, offset = model.mask_threshold, self.stability_score_offset
        stats = model.postprocess_mask_stats(
            low_res, pred.input_size, pred.original_size, (t + offset, t - offset)
        )
        if stats is not None:
            # thresholded and counted block by block: the float masks are never whole
            binary, (inter, union) = stats
            stability = (inter / union).to(low_res.dtype)
        else:
            masks = model.postprocess_masks(low_res[:, None], pred.input_size, pred.original_size)[
                :, 0
            ]
            stability = calculate_stability_score(masks, t, offset)
            binary = masks > t
            del masks
        if self.stability_score_thresh > 0.0:
            keep = stability >= self.stability_score_thresh
            binary, iou, stability, pts = (
                binary[keep],
                iou[keep],
                stability[keep],
                pts[keep.cpu().numpy()],
            )
        boxes = batched_mask_to_box(binary)
        keep = ~is_box_near_crop_edge(boxes, crop_box, [0, 0, orig_w, orig_h])
        if not bool(keep.all()):
            binary, boxes, iou, stability, pts = (
                binary[keep],
                boxes[keep],
                iou[keep],
                stability[keep],
                pts[keep.cpu().numpy()],
            )
        binary = uncrop_masks(binary, crop_box, orig_h, orig_w)
        return {
            "rles": encode_rle_batch(binary.cpu().numpy()),
            "boxes": boxes.cpu().numpy(),
            "iou_preds": iou.float().cpu().numpy(),
            "points": pts,
            "stability_score": stability.float().cpu().numpy(),
        }

    @staticmethod
    def _postprocess_small_regions(
        data: dict[str, Any], min_area: int, nms_thresh: float
    ) -> dict[str, Any]:
        """Removes small islands and holes, then NMS preferring unchanged masks."""
        from .masks import decode_rle, encode_rle

        if len(data["rles"]) == 0:
            return data
        new_masks, scores = [], []
        for rle in data["rles"]:
            mask = decode_rle(rle)
            mask, changed_holes = remove_small_regions(mask, min_area, mode="holes")
            mask, changed_islands = remove_small_regions(mask, min_area, mode="islands")
            new_masks.append(torch.as_tensor(mask))
            scores.append(0.0 if (changed_holes or changed_islands) else 1.0)
        masks = torch.stack(new_masks)
        boxes = batched_mask_to_box(masks)
        keep = batched_nms(
            boxes.float(), torch.as_tensor(scores), torch.zeros(len(boxes)), nms_thresh
        ).numpy()
        rles = list(data["rles"])
        out_boxes = data["boxes"].copy()
        for i in keep:
            if scores[i] == 0.0:
                rles[i] = encode_rle(masks[i].numpy())
                out_boxes[i] = boxes[i].numpy()
        data = dict(data, rles=rles, boxes=out_boxes)
        return _filter(data, keep)


# ---------------------------------------------------------------------- helpers
def _xyxy_to_xywh(box: np.ndarray) -> list[Any]:
    x0, y0, x1, y1 = box.tolist()
    return [x0, y0, x1 - x0, y1 - y0]


def _cat(parts: list[dict[str, Any]]) -> dict[str, Any]:
    keys = ("boxes", "iou_preds", "points", "stability_score")
    out: dict[str, Any] = {"rles": [r for p in parts for r in p["rles"]]}
    for k in keys:
        arrays = [p[k] for p in parts]
        out[k] = np.concatenate(arrays) if arrays else np.zeros((0,))
    if parts and "crop_boxes" in parts[0]:
        out["crop_boxes"] = np.concatenate([p["crop_boxes"] for p in parts])
    return out


def _filter(data: dict[str, Any], keep: np.ndarray) -> dict[str, Any]:
    out = {}
    for k, v in data.items():
        out[k] = [v[i] for i in keep] if isinstance(v, list) else v[keep]
    return out


def build_point_grid(n_per_side: int) -> np.ndarray:
    """``n**2 x 2`` grid of cell centres in [0, 1] (x varies fastest)."""
    offset = 1 / (2 * n_per_side)
    side = np.linspace(offset, 1 - offset, n_per_side)
    xs = np.tile(side[None, :], (n_per_side, 1))
    ys = np.tile(side[:, None], (1, n_per_side))
    return np.stack([xs, ys], axis=-1).reshape(-1, 2)


def build_all_layer_point_grids(
    n_per_side: int, n_layers: int, scale_per_layer: int
) -> list[np.ndarray]:
    return [build_point_grid(int(n_per_side / (scale_per_layer**i))) for i in range(n_layers + 1)]


def generate_crop_boxes(
    im_size: tuple[int, int], n_layers: int, overlap_ratio: float
) -> tuple[list[list[int]], list[int]]:
    """The whole image, then ``2**i x 2**i`` overlapping crops per layer i (xyxy)."""
    im_h, im_w = im_size
    crop_boxes, layer_idxs = [[0, 0, im_w, im_h]], [0]
    short_side = min(im_h, im_w)
    for i_layer in range(n_layers):
        n_per_side = 2 ** (i_layer + 1)
        overlap = int(overlap_ratio * short_side * (2 / n_per_side))
        crop_w = int(math.ceil((overlap * (n_per_side - 1) + im_w) / n_per_side))
        crop_h = int(math.ceil((overlap * (n_per_side - 1) + im_h) / n_per_side))
        x0s = [int((crop_w - overlap) * i) for i in range(n_per_side)]
        y0s = [int((crop_h - overlap) * i) for i in range(n_per_side)]
        for x0, y0 in product(x0s, y0s):
            crop_boxes.append([x0, y0, min(x0 + crop_w, im_w), min(y0 + crop_h, im_h)])
            layer_idxs.append(i_layer + 1)
    return crop_boxes, layer_idxs


def batch_iterator(batch_size: int, array: np.ndarray) -> Iterator[np.ndarray]:
    for start in range(0, len(array), batch_size):
        yield array[start : start + batch_size]


def calculate_stability_score(
    masks: torch.Tensor, mask_threshold: float, offset: float
) -> torch.Tensor:
    """IoU between the masks thresholded at ``threshold +- offset`` (``N x H x W`` logits)."""
    inter = count_true(masks > (mask_threshold + offset))
    union = count_true(masks > (mask_threshold - offset))
    return inter / union


def batched_mask_to_box(masks: torch.Tensor) -> torch.Tensor:
    """``N x H x W`` bool -> ``N x 4`` int64 xyxy with inclusive max; empty masks -> zeros."""
    if masks.numel() == 0:
        return torch.zeros((*masks.shape[:-2], 4), dtype=torch.int64, device=masks.device)
    rows = masks.any(dim=-1)  # N x H
    cols = masks.any(dim=-2)  # N x W
    h, w = rows.shape[-1], cols.shape[-1]
    top = rows.to(torch.uint8).argmax(dim=-1)
    bottom = h - 1 - rows.flip(-1).to(torch.uint8).argmax(dim=-1)
    left = cols.to(torch.uint8).argmax(dim=-1)
    right = w - 1 - cols.flip(-1).to(torch.uint8).argmax(dim=-1)
    boxes = torch.stack([left, top, right, bottom], dim=-1).to(torch.int64)
    empty = ~rows.any(dim=-1)
    return boxes * (~empty).unsqueeze(-1)


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def is_box_near_crop_edge(
    boxes: torch.Tensor, crop_box: list[int], orig_box: list[int], atol: float = 20.0
) -> torch.Tensor:
    """True for boxes touching a crop edge that is not also an image edge."""
    crop_t = torch.as_tensor(crop_box, dtype=torch.float, device=boxes.device)
    orig_t = torch.as_tensor(orig_box, dtype=torch.float, device=boxes.device)
    offset = torch.as_tensor([crop_box[0], crop_box[1]] * 2, device=boxes.device)
    b = (boxes + offset).float()
    near_crop = torch.isclose(b, crop_t[None, :], atol=atol, rtol=0)
    near_image = torch.isclose(b, orig_t[None, :], atol=atol, rtol=0)
    return torch.any(near_crop & ~near_image, dim=1)


def uncrop_masks(
    masks: torch.Tensor, crop_box: list[int], orig_h: int, orig_w: int
) -> torch.Tensor:
    x0, y0, x1, y1 = crop_box
    if (x0, y0, x1, y1) == (0, 0, orig_w, orig_h):
        return masks
    return F.pad(masks, (x0, orig_w - x1, y0, orig_h - y1), value=0)


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy NMS (same decisions as torchvision.ops.nms): indices kept, by decreasing score.

    Ties in score keep their input order (stable sort). IoU is computed in float32.
    """
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.int64)
    order = torch.sort(scores.float().cpu(), descending=True, stable=True).indices.numpy()
    b = boxes.detach().float().cpu().numpy()[order]
    x0, y0, x1, y1 = b[:, 0], b[:, 1], b[:, 2], b[:, 3]
    areas = (x1 - x0) * (y1 - y0)
    n = len(order)
    suppressed = np.zeros(n, dtype=bool)
    keep = []
    with np.errstate(divide="ignore", invalid="ignore"):
        for i in range(n):
            if suppressed[i]:
                continue
            keep.append(i)
            rest = slice(i + 1, n)
            w = np.maximum(np.minimum(x1[i], x1[rest]) - np.maximum(x0[i], x0[rest]), 0)
            h = np.maximum(np.minimum(y1[i], y1[rest]) - np.maximum(y0[i], y0[rest]), 0)
            inter = w * h
            iou = inter / (areas[i] + areas[rest] - inter)
            # float32 IoU compared with the float64 threshold, as torchvision does in C++.
            suppressed[rest] |= iou.astype(np.float64) > iou_threshold
    return torch.as_tensor(order[keep], dtype=torch.int64)


def batched_nms(
    boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor, iou_threshold: float
) -> torch.Tensor:
    """NMS within each category ``idxs`` independently (boxes offset per category)."""
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.int64)
    offsets = idxs.to(boxes) * (boxes.max() + 1)
    return nms(boxes + offsets[:, None], scores, iou_threshold)


def remove_small_regions(
    mask: np.ndarray, area_thresh: float, mode: str
) -> tuple[np.ndarray, bool]:
    """Removes islands (``mode="islands"``) or fills holes (``"holes"``) below ``area_thresh``.

    Returns the mask and whether it changed. Uses OpenCV 8-connected components.
    """
    import cv2

    if mode not in ("holes", "islands"):
        raise ValueError(f"mode must be 'holes' or 'islands', got {mode!r}")
    correct_holes = mode == "holes"
    working = (correct_holes ^ mask).astype(np.uint8)
    n_labels, regions, stats, _ = cv2.connectedComponentsWithStats(working, connectivity=8)
    sizes = stats[:, -1][1:]
    small = [i + 1 for i, s in enumerate(sizes) if s < area_thresh]
    if not small:
        return mask, False
    fill = [0, *small]
    if not correct_holes:
        fill = [i for i in range(n_labels) if i not in fill]
        if not fill:  # every island is small: keep the largest
            fill = [int(np.argmax(sizes)) + 1]
    return np.isin(regions, fill), True
