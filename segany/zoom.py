"""Zoom-in refinement: later clicks are predicted on a crop around the object.

A model sees the whole image at its input size (1024 px for SAM, 768 px for segany-lite), so a
small object, or the boundary of a large one, gets few embedding cells. Interactive methods
since RITM (and FocalClick, FocSAM) therefore predict the corrective clicks on a crop around
the object, resized to the model's input: the same model, more pixels per object. RITM's
published NoC figures are measured this way.

:class:`ZoomInPredictor` does it behind ``SamPredictor``'s interface (``set_image`` /
``predict``), so the evaluator, the CLI and user code use it as they use a
:class:`~segany.Predictor`:

1. A call with no earlier prediction fed back (``mask_input`` is None), or with at most
   ``skip_clicks`` points, is predicted on the whole image. A box prompt, when
   ``zoom_boxes`` is set, is predicted on a crop around the box instead.
2. Later calls feed back a previous answer as ``mask_input``. The *region of interest* is the
   tight box of that prediction's mask plus the positive clicks, grown by ``expansion``
   (at least ``min_crop`` of the image's longest side), clipped to the image. The crop is
   encoded once and kept while later regions stay inside it and overlap it by at least
   ``recompute_iou``; otherwise a new crop is encoded.
3. The clicks inside the crop (negative clicks outside it are already satisfied: everything
   outside the crop keeps the previous, background, logits) and the previous logits, cropped
   and resized to the crop's low-res frame, are decoded on the crop; the crop's logits are
   pasted into the previous full-size logits.
4. Returned low-res logits are the full-size logits resized to the whole image's low-res
   frame, so callers feed them back as usual. When a later ``mask_input`` is exactly one of
   the arrays returned last, its full-size logits are used (nothing is lost to the
   round trip through the low-res frame); any other ``mask_input`` is upsampled.

``first_click_refine`` adds one zoomed pass after a whole-image click: the chosen candidate's
region is cropped and the same click is decoded again there with that candidate's logits as
the mask input (one user click, two decodes and one crop encoding).

The crop in use is state (step 2 keeps it across calls). :attr:`ZoomInPredictor.crop_rect`,
:meth:`~ZoomInPredictor.encoded_crop`, :meth:`~ZoomInPredictor.use_crop` and
:meth:`~ZoomInPredictor.encode_crop` let a stateless caller (the HTTP server) carry it
between requests and reuse an encoded crop, so that a fresh predictor told the crop answers
exactly as the one that made it would.
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np

from .predictor import Predictor
from .transforms import preprocess_shape

__all__ = ["ZoomInPredictor", "object_roi"]

_BACKGROUND = -20.0  # logit of the low-res padding and of "no prediction yet"


def object_roi(
    mask: np.ndarray,
    points: np.ndarray | None,
    *,
    expansion: float,
    min_size: float,
) -> tuple[int, int, int, int] | None:
    """Crop ``(x0, y0, x1, y1)`` (``x1``, ``y1`` exclusive) around ``mask`` and ``points``.

    The tight box of the ``H x W`` bool ``mask`` and of the ``N x 2`` (x, y) ``points`` is
    grown about its centre by ``expansion`` (each side at least ``min_size`` pixels, at most
    the image), then shifted to lie inside the image. ``None`` if both are empty.
    """
    h, w = mask.shape
    ys, xs = np.nonzero(mask)
    xs_f = xs.astype(np.float64)
    ys_f = ys.astype(np.float64)
    if points is not None and len(points):
        pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        xs_f = np.concatenate([xs_f, np.clip(pts[:, 0], 0, w - 1)])
        ys_f = np.concatenate([ys_f, np.clip(pts[:, 1], 0, h - 1)])
    if xs_f.size == 0:
        return None
    bx0, bx1 = float(xs_f.min()), float(xs_f.max()) + 1.0
    by0, by1 = float(ys_f.min()), float(ys_f.max()) + 1.0
    cx, cy = (bx0 + bx1) / 2, (by0 + by1) / 2
    side_w = min(float(w), max((bx1 - bx0) * expansion, min_size))
    side_h = min(float(h), max((by1 - by0) * expansion, min_size))
    x0 = int(round(min(max(cx - side_w / 2, 0.0), w - side_w)))
    y0 = int(round(min(max(cy - side_h / 2, 0.0), h - side_h)))
    x1 = min(w, x0 + max(1, int(round(side_w))))
    y1 = min(h, y0 + max(1, int(round(side_h))))
    return x0, y0, x1, y1


def _box_iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union else 0.0


def _contains(outer: tuple[int, int, int, int], inner: tuple[int, int, int, int]) -> bool:
    return (
        outer[0] <= inner[0]
        and outer[1] <= inner[1]
        and outer[2] >= inner[2]
        and outer[3] >= inner[3]
    )


class ZoomInPredictor:
    """A :class:`~segany.Predictor` that predicts corrective clicks on a crop (module docs).

    Args:
        predictor: the whole-image predictor (its model and backend are shared by the crop).
        skip_clicks: calls with at most this many points use the whole image (1: zoom from the
            second click on).
        expansion: the region of interest is the object's box times this factor.
        min_crop: the shortest crop side, as a fraction of the image's longest side.
            The defaults (2.0, 0.3) were chosen on masks held out of segany-lite's training:
            RITM's tighter 1.4 helped whole objects and hurt parts and stuff regions, whose
            first mask is often a piece of the target that a tight crop then cuts off.
        recompute_iou: a crop is kept while the next region lies inside it and overlaps it
            by at least this much; otherwise the new region is encoded.
        first_click_refine: decode a whole-image first click a second time on a crop around
            the chosen candidate (see the module docs).
        zoom_boxes: predict a box prompt given without ``mask_input`` on a crop around it.
        flip: also predict on the mirrored image (or crop) and average the two logits and
            scores (test-time flip, as RITM evaluates; twice the encoding and decoding).
    """

    def __init__(
        self,
        predictor: Predictor,
        *,
        skip_clicks: int = 1,
        expansion: float = 2.0,
        min_crop: float = 0.3,
        recompute_iou: float = 0.7,
        first_click_refine: bool = True,
        zoom_boxes: bool = False,
        flip: bool = False,
    ) -> None:
        if not isinstance(predictor, Predictor):
            raise TypeError(f"predictor must be a segany.Predictor, got {type(predictor).__name__}")
        if isinstance(skip_clicks, bool) or not isinstance(skip_clicks, int) or skip_clicks < 0:
            raise ValueError(f"skip_clicks must be an int >= 0, got {skip_clicks!r}")
        if not expansion >= 1.0:
            raise ValueError(f"expansion must be >= 1, got {expansion}")
        if not 0.0 <= min_crop <= 1.0:
            raise ValueError(f"min_crop must be in [0, 1], got {min_crop}")
        if not 0.0 <= recompute_iou <= 1.0:
            raise ValueError(f"recompute_iou must be in [0, 1], got {recompute_iou}")
        backend = predictor.backend or "torch"
        self._backend = backend
        self.full = predictor
        self.full_mirror = self._fresh() if flip else None
        self.skip_clicks = skip_clicks
        self.expansion = float(expansion)
        self.min_crop = float(min_crop)
        self.recompute_iou = float(recompute_iou)
        self.first_click_refine = first_click_refine
        self.zoom_boxes = zoom_boxes
        self.flip = flip
        self.crops_encoded = 0  #: crops encoded since construction (a cost figure)
        self._forget()  # the wrapped predictor keeps its embedding (see set_encoded_image)

    @property
    def settings(self) -> dict[str, Any]:
        """The refinement settings, as recorded in evaluation reports."""
        return {
            "skip_clicks": self.skip_clicks,
            "expansion": self.expansion,
            "min_crop": self.min_crop,
            "recompute_iou": self.recompute_iou,
            "first_click_refine": self.first_click_refine,
            "zoom_boxes": self.zoom_boxes,
            "flip": self.flip,
        }

    # ------------------------------------------------------------------ image state
    @property
    def model(self) -> Any:
        return self.full.model

    @property
    def is_image_set(self) -> bool:
        return self._image is not None

    def reset_image(self) -> None:
        """Forgets the image, its crop and the remembered predictions."""
        self.full.reset_image()
        self._forget()

    def _fresh(self) -> Predictor:
        """A new predictor of the full one's model, backend and mask refinement."""
        return Predictor(self.full.model, backend=self._backend, refine=_refine_of(self.full))

    def _forget(self) -> None:
        if self.full_mirror is not None:
            self.full_mirror.reset_image()
        # Each crop gets new predictors (here and in encode_crop), so one handed out by
        # encoded_crop() or taken in by use_crop() is never reset or re-encoded under its holder.
        self.crop = self._fresh()
        self.crop_mirror: Predictor | None = self._fresh() if self.flip else None
        self._image: np.ndarray | None = None
        self._crop_rect: tuple[int, int, int, int] | None = None
        self._last_low: np.ndarray | None = None  # C x m x m, as last returned
        self._last_full: np.ndarray | None = None  # C x H x W logits behind them

    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        """Encodes the whole ``H x W x 3`` uint8 image (and its mirror with ``flip``); crops
        are encoded when a prediction needs them."""
        image = self._in_model_format(image, image_format)
        self.reset_image()
        self.full.set_image(image, self.full.model.image_format)
        self._attach(image)

    def set_encoded_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        """Like :meth:`set_image`, but keeps the embedding the wrapped predictor already holds,
        which must have been computed from ``image`` (e.g. restored from a cache or a file);
        only the mirror (``flip``) is encoded."""
        if not self.full.is_image_set:
            raise RuntimeError("the wrapped predictor holds no embedding: call set_image")
        image = self._in_model_format(image, image_format)
        if tuple(image.shape[:2]) != tuple(self.full.original_size or ()):
            raise ValueError(
                f"image is {image.shape[1]} x {image.shape[0]} but the embedding was made from "
                f"a {self.full.orig_w} x {self.full.orig_h} image"
            )
        self._forget()
        self.full.set_guide_image(image)
        self._attach(image)

    def _in_model_format(self, image: np.ndarray, image_format: str) -> np.ndarray:
        """The checked ``H x W x 3`` uint8 image in the model's channel order."""
        from .images import validate_image_array

        if image_format not in ("RGB", "BGR"):
            raise ValueError(f"image_format must be 'RGB' or 'BGR', got {image_format!r}")
        image = validate_image_array(image)
        if image_format != self.full.model.image_format:
            image = image[..., ::-1]
        return np.ascontiguousarray(image)

    def _attach(self, image: np.ndarray) -> None:
        """Keeps ``image`` (model channel order) for crops; encodes its mirror with ``flip``."""
        if self.full_mirror is not None:
            self.full_mirror.set_image(
                np.ascontiguousarray(image[:, ::-1]), self.full.model.image_format
            )
        self._image = image

    # ------------------------------------------------------------------ the crop
    @property
    def crop_rect(self) -> tuple[int, int, int, int] | None:
        """The encoded crop ``(x0, y0, x1, y1)`` (exclusive ends) the next zoomed call starts
        from, or None (none yet since the image was set)."""
        return self._crop_rect

    def encoded_crop(self) -> tuple[tuple[int, int, int, int], Predictor, Predictor | None] | None:
        """``(rect, crop predictor, mirrored crop predictor or None)`` of the current crop,
        for :meth:`use_crop` on another ZoomInPredictor of the same image and model; None if
        no crop is encoded. The predictors are not encoded again by this object."""
        if self._crop_rect is None:
            return None
        return self._crop_rect, self.crop, self.crop_mirror

    def _check_rect(self, rect: Any) -> tuple[int, int, int, int]:
        if self._image is None:
            raise RuntimeError("no image is set: call set_image(...) first")
        try:
            vals = [float(v) for v in rect]
        except (TypeError, ValueError):
            raise ValueError(f"a crop is 4 integers x0, y0, x1, y1, got {rect!r}") from None
        if len(vals) != 4 or not all(np.isfinite(vals)) or any(v != int(v) for v in vals):
            raise ValueError(f"a crop is 4 integers x0, y0, x1, y1, got {rect!r}")
        x0, y0, x1, y1 = (int(v) for v in vals)
        h, w = self._image.shape[:2]
        if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
            raise ValueError(
                f"crop {[x0, y0, x1, y1]} is not a non-empty rectangle inside the "
                f"{w} x {h} image (x1, y1 exclusive)"
            )
        return x0, y0, x1, y1

    def encode_crop(self, rect: Any) -> None:
        """Encodes the crop ``rect`` = ``(x0, y0, x1, y1)`` (exclusive ends, inside the
        image) and makes it the current crop, as a zoomed call that chose it would."""
        x0, y0, x1, y1 = rect = self._check_rect(rect)
        assert self._image is not None
        part = self._image[y0:y1, x0:x1]
        fmt = self.full.model.image_format
        self.crop = self._fresh()
        self.crop.set_image(part, fmt)
        if self.flip:
            self.crop_mirror = self._fresh()
            self.crop_mirror.set_image(np.ascontiguousarray(part[:, ::-1]), fmt)
        self._crop_rect = rect
        self.crops_encoded += 1

    def use_crop(self, rect: Any, crop: Predictor, crop_mirror: Predictor | None = None) -> None:
        """Makes an already encoded crop of this image the current one (see
        :meth:`encoded_crop`): ``crop`` must hold the embedding of ``image[y0:y1, x0:x1]``
        made by this model (and ``crop_mirror`` that of its mirror when ``flip``); only the
        sizes can be checked here."""
        rect = self._check_rect(rect)
        size = (rect[3] - rect[1], rect[2] - rect[0])
        for name, p in (("crop", crop), ("crop_mirror", crop_mirror)):
            if p is None:
                if name == "crop" or self.flip:
                    raise ValueError(f"{name} is required{' with flip' if self.flip else ''}")
                continue
            if not isinstance(p, Predictor) or p.model is not self.full.model:
                raise ValueError(f"{name} must be a Predictor of this predictor's model")
            if not p.is_image_set or tuple(p.original_size or ()) != size:
                raise ValueError(
                    f"{name} holds no embedding of a {size[1]} x {size[0]} crop "
                    f"(it holds {p.original_size})"
                )
        self.crop, self.crop_mirror = crop, (crop_mirror if self.flip else None)
        self._crop_rect = rect

    # ------------------------------------------------------------------ frames
    @property
    def _low_side(self) -> int:
        return int(self.full.model.prompt_encoder.mask_input_size[0])

    def _low_hw(self, hw: tuple[int, int]) -> tuple[int, int]:
        """Rows and columns of an ``hw`` image's valid area in the low-res frame."""
        m, size = self._low_side, self.full.model.img_size
        ih, iw = preprocess_shape(hw[0], hw[1], size)
        return max(1, round(ih * m / size)), max(1, round(iw * m / size))

    def _to_low(self, logits: np.ndarray) -> np.ndarray:
        """``H x W`` logits -> the model's ``m x m`` low-res frame of that image (resized with
        the longest side to ``m``, padded bottom/right with background)."""
        m = self._low_side
        lh, lw = self._low_hw(logits.shape[:2])
        small = cv2.resize(
            np.ascontiguousarray(logits, dtype=np.float32), (lw, lh), interpolation=cv2.INTER_AREA
        )
        out = np.full((m, m), _BACKGROUND, dtype=np.float32)
        out[:lh, :lw] = small
        return out

    def _from_low(self, low: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
        """Inverse of :meth:`_to_low` (up to resampling): ``m x m`` -> ``H x W`` logits."""
        lh, lw = self._low_hw(hw)
        crop = np.ascontiguousarray(low[:lh, :lw], dtype=np.float32)
        return cv2.resize(crop, (hw[1], hw[0]), interpolation=cv2.INTER_LINEAR)

    def _previous_logits(self, mask_input: Any) -> np.ndarray:
        """Full-size logits behind a ``mask_input`` that :meth:`predict` has already checked
        (shape and finiteness, by the wrapped predictor's prompt checks)."""
        assert self._image is not None
        m = self._low_side
        low = np.asarray(mask_input, dtype=np.float32).reshape(m, m)
        if self._last_low is not None and self._last_full is not None:
            for c in range(len(self._last_low)):
                if np.array_equal(low, self._last_low[c]):
                    return self._last_full[c]
        return self._from_low(low, self._image.shape[:2])

    # ------------------------------------------------------------------ prediction
    def predict(
        self,
        point_coords: Any | None = None,
        point_labels: Any | None = None,
        box: Any | None = None,
        mask_input: Any | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(masks C x H x W, scores C, low_res C x m x m)`` for one object, as
        :meth:`Predictor.predict` (``m`` = the model's mask-input side). Coordinates are
        original-image pixels; prompts are checked as :meth:`Predictor.predict` checks them."""
        if self._image is None:
            raise RuntimeError("no image is set: call set_image(...) before predicting")
        pts = lab = None
        if point_coords is not None or point_labels is not None:
            if point_coords is None or point_labels is None:
                raise ValueError("point_coords and point_labels must be given together")
            pts = np.asarray(point_coords, dtype=np.float64)
            lab = np.asarray(point_labels).reshape(-1)
            if pts.ndim != 2 or pts.shape[1] != 2 or len(lab) != len(pts):
                raise ValueError(
                    "ZoomInPredictor predicts one object: point_coords N x 2 and point_labels N "
                    f"(got {pts.shape} and {lab.shape}; use Predictor.predict_batch for several)"
                )
        bx = None
        if box is not None:
            bx = np.asarray(box, dtype=np.float64).reshape(-1)
            if bx.size != 4:
                raise ValueError(f"box must be 4 numbers x0, y0, x1, y1, got shape {np.shape(box)}")
        h, w = self._image.shape[:2]
        # Checks every prompt (bounds, NaN, shapes) on the whole image, as Predictor does.
        self.full._prepare_prompts(
            None if pts is None else pts[None],
            None if lab is None else lab[None],
            None if bx is None else bx[None],
            None if mask_input is None else _as_4d(mask_input),
        )
        n_points = 0 if pts is None else len(pts)
        positive = None if pts is None or lab is None else pts[lab == 1]
        prev = None if mask_input is None else self._previous_logits(mask_input)
        roi = None
        if prev is not None and n_points > self.skip_clicks:
            roi = self._roi(prev > 0, positive)
        elif prev is None and bx is not None and self.zoom_boxes:
            roi = self._roi(np.zeros((h, w), dtype=bool), bx.reshape(2, 2))
        own_low = None
        if roi is None:
            raw = None if mask_input is None else np.asarray(mask_input, dtype=np.float32)
            full, scores, own_low = self._decode(None, prev, raw, pts, lab, bx, multimask_output)
            if self.first_click_refine and prev is None and bx is None and n_points:
                full, scores = self._refine_first(
                    full, scores, pts, lab, positive, multimask_output
                )
                own_low = None
        else:
            full, scores, _ = self._decode(roi, prev, None, pts, lab, bx, multimask_output)
        # The model's own low-res logits when it saw the whole image alone (so this equals a
        # Predictor exactly then); else the full-size logits in the low-res frame.
        low = own_low if own_low is not None else np.stack([self._to_low(f) for f in full])
        self._last_low, self._last_full = low, full
        thr = float(self.full.model.mask_threshold)
        return (full if return_logits else full > thr), scores, low

    def _roi(self, mask: np.ndarray, points: np.ndarray | None) -> tuple[int, int, int, int] | None:
        h, w = mask.shape
        tight = object_roi(mask, points, expansion=1.0, min_size=1.0)
        if tight is None:
            return None
        rect = object_roi(
            mask, points, expansion=self.expansion, min_size=self.min_crop * max(h, w)
        )
        assert rect is not None
        old = self._crop_rect
        if old is not None and _contains(old, tight) and _box_iou(old, rect) >= self.recompute_iou:
            return old
        return rect

    def _decode(
        self,
        rect: tuple[int, int, int, int] | None,
        prev: np.ndarray | None,
        raw_mask_input: np.ndarray | None,
        pts: np.ndarray | None,
        lab: np.ndarray | None,
        box: np.ndarray | None,
        multimask_output: bool,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Decodes the prompts on the whole image (``rect`` None) or on the crop ``rect``,
        with the mirrored view too when ``flip``; returns full-size ``C x H x W`` logits
        (outside the crop: ``prev``, else background), ``C`` scores, and the model's own
        ``C x m x m`` low-res logits when the whole image was decoded without a mirror."""
        assert self._image is not None
        h, w = self._image.shape[:2]
        if rect is None:
            x0, y0, x1, y1 = 0, 0, w, h
            views = [(self.full, False), (self.full_mirror, True)]
        else:
            x0, y0, x1, y1 = rect
            if self._crop_rect != rect:
                self.encode_crop(rect)
            views = [(self.crop, False), (self.crop_mirror, True)]
        cw, ch = x1 - x0, y1 - y0
        coords = labels = None
        if pts is not None and lab is not None and len(pts):
            local = pts - np.array([x0, y0], dtype=np.float64)
            # A negative click outside the crop is satisfied by the background kept there.
            inside = (local >= 0).all(1) & (local[:, 0] <= cw) & (local[:, 1] <= ch)
            if inside.any():
                coords, labels = local[inside], lab[inside]
        local_box = None
        if box is not None:
            local_box = np.clip(box - np.array([x0, y0, x0, y0]), 0, [cw, ch, cw, ch])
        region_prev = None if prev is None else prev[y0:y1, x0:x1]
        total: np.ndarray | None = None
        total_scores: np.ndarray | None = None
        n_views = 0
        own_low = None
        for predictor, mirrored in views:
            if predictor is None:
                continue
            c, b, p = coords, local_box, region_prev
            if mirrored:
                if c is not None:
                    c = c.copy()
                    c[:, 0] = np.clip(cw - 1 - c[:, 0], 0, cw)
                if b is not None:
                    b = np.clip(
                        np.array([cw - 1 - b[2], b[1], cw - 1 - b[0], b[3]]), 0, [cw, ch, cw, ch]
                    )
                if p is not None:
                    p = p[:, ::-1]
            if rect is None and not mirrored and raw_mask_input is not None:
                m_in = _as_4d(raw_mask_input)[0]  # the caller's logits, exactly
            else:
                m_in = None if p is None else self._to_low(p)[None]
            masks, scores, low = predictor.predict(
                c, labels, b, m_in, multimask_output, return_logits=True
            )
            if rect is None and not mirrored:
                own_low = low
            masks = masks.astype(np.float32, copy=False)
            if mirrored:
                masks = masks[..., ::-1]
            total = masks.copy() if total is None else total + masks
            s = np.asarray(scores, dtype=np.float32)
            total_scores = s.copy() if total_scores is None else total_scores + s
            n_views += 1
        assert total is not None and total_scores is not None
        total /= n_views
        total_scores /= n_views
        if rect is None:
            return total, total_scores, (own_low if n_views == 1 else None)
        base = prev if prev is not None else np.full((h, w), _BACKGROUND, dtype=np.float32)
        full = np.repeat(base[None], len(total), axis=0)
        full[:, y0:y1, x0:x1] = total
        return full, total_scores, None

    def _refine_first(
        self,
        full: np.ndarray,
        scores: np.ndarray,
        pts: np.ndarray | None,
        lab: np.ndarray | None,
        positive: np.ndarray | None,
        multimask_output: bool,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Second pass of a whole-image click on a crop around the best-scored candidate."""
        best = int(np.argmax(scores))
        chosen = full[best]
        rect = self._roi(chosen > 0, positive)
        if rect is None:
            return full, scores
        refined, refined_scores, _ = self._decode(rect, chosen, None, pts, lab, None, False)
        if not multimask_output:
            return refined, refined_scores
        out = full.copy()
        out[best] = refined[0]
        return out, np.asarray(scores, dtype=np.float32)


def _refine_of(predictor: Predictor) -> Any:
    """``refine`` for a predictor of crops or mirrors: the same as ``predictor``'s."""
    return predictor.refiner if predictor.refiner is not None else False


def _as_4d(mask_input: Any) -> np.ndarray:
    m = np.asarray(mask_input, dtype=np.float32)
    return m[None] if m.ndim == 3 else (m[None, None] if m.ndim == 2 else m)
