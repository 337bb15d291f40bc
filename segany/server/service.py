"""The server's model work, as plain blocking functions (run in :class:`ModelRunner` threads).

Nothing here knows about HTTP: user errors are ``ValueError`` (and :class:`ImageLoadError`,
a ``ValueError``), which the app turns into 4xx answers.
"""

from __future__ import annotations

import base64
import binascii
import ctypes
import functools
import hashlib
import io
import logging
import math
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..modeling.sam import Sam
from ..predictor import Predictor
from ..registry import find_variant
from .cache import CachedImage, EmbeddingCache
from .settings import ALLOWED_FORMATS, ServerSettings

logger = logging.getLogger(__name__)


class UnsupportedImage(ValueError):
    """Not one of the image formats the server decodes (answered with 415)."""


class ImageTooLarge(ValueError):
    """More pixels than ``max_pixels`` (answered with 413)."""


def image_id(data: bytes) -> str:
    """The id of an uploaded file: the SHA-256 of its bytes (clients can compute it too)."""
    return hashlib.sha256(data).hexdigest()


def _finite(value: float) -> float:
    return float(value) if math.isfinite(value) else 0.0


class SegmentService:
    """One model, its embedding cache and the operations of the API."""

    def __init__(self, model: Sam, settings: ServerSettings, name: str | None = None) -> None:
        self.model = model.eval()
        self.settings = settings
        probe = Predictor(model)
        self.fingerprint = probe.model_fingerprint()
        self.name = name or find_variant(model.config) or "custom"
        self.mask_input_size = tuple(int(v) for v in model.prompt_encoder.mask_input_size)
        self.cache = EmbeddingCache(
            settings.cache_bytes,
            directory=settings.cache_dir,
            disk_max_bytes=settings.disk_cache_bytes,
            fingerprint=self.fingerprint,
        )
        # (image id, crop) -> encoded crop predictors of zoom-in requests, most recent last
        self._zoom_crops: OrderedDict[
            tuple[str, tuple[int, ...]], tuple[Predictor, Predictor | None]
        ] = OrderedDict()
        self._zoom_lock = threading.Lock()

    # ------------------------------------------------------------------ images
    def check_header(self, data: bytes) -> tuple[int, int]:
        """Format and size from the header only; raises before anything is decoded."""
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(io.BytesIO(data), formats=list(ALLOWED_FORMATS)) as im:
                    width, height = im.size
        except Image.DecompressionBombError as exc:
            raise ImageTooLarge(f"image is too large: {exc}") from exc
        except UnidentifiedImageError as exc:
            raise UnsupportedImage(
                "not an image in a supported format; expected one of " + ", ".join(ALLOWED_FORMATS)
            ) from exc
        except Exception as exc:  # Pillow raises many types for corrupt headers
            raise ValueError(f"corrupt image header: {exc}") from exc
        pixels = int(width) * int(height)
        if pixels > self.settings.max_pixels:
            raise ImageTooLarge(
                f"image is {width} x {height} = {pixels:,} pixels, more than the server's "
                f"limit of {self.settings.max_pixels:,}"
            )
        return int(width), int(height)

    def encode(self, key: str, data: bytes, file_name: str = "") -> tuple[CachedImage, bool, float]:
        """(entry, was it cached already, encoding time in ms). Blocking."""
        from ..images import load_image

        entry = self.cache.get(key) or self.cache.load(key, Predictor(self.model))
        if entry is not None:
            return entry, True, 0.0
        image = load_image(data, max_pixels=self.settings.max_pixels)
        start = time.perf_counter()
        predictor = Predictor(self.model)
        predictor.set_image(image)
        elapsed = (time.perf_counter() - start) * 1000
        entry = CachedImage.from_predictor(key, data, predictor, file_name)
        self.cache.put(entry)
        self.cache.save(entry, predictor)
        logger.info("encoded %s (%d x %d) in %.0f ms", key[:12], entry.width, entry.height, elapsed)
        del image, predictor
        _trim_heap()
        return entry, False, elapsed

    def load_cached(self, key: str) -> CachedImage | None:
        """From memory, else from the disk cache. Blocking (disk)."""
        return self.cache.get(key) or self.cache.load(key, Predictor(self.model))

    # ------------------------------------------------------------------ prompts
    def decode_mask_input(self, text: str) -> np.ndarray:
        h, w = self.mask_input_size
        try:
            raw = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ValueError(f"mask_input is not valid base64: {exc}") from exc
        if len(raw) != 4 * h * w:
            raise ValueError(
                f"mask_input must hold {h} x {w} float32 values ({4 * h * w} bytes), got "
                f"{len(raw)} bytes"
            )
        arr = np.frombuffer(raw, dtype="<f4").astype(np.float32).reshape(1, h, w)
        if not np.isfinite(arr).all():
            raise ValueError("mask_input contains NaN or infinite values")
        return arr

    def predict(
        self,
        entry: CachedImage,
        points: Sequence[Sequence[float]],
        labels: Sequence[int],
        box: Sequence[float] | None,
        mask_input: str | None,
        multimask_output: bool,
        return_low_res_logits: bool,
        zoom_in: bool = False,
        zoom_crop: Sequence[int] | None = None,
    ) -> dict[str, Any]:
        from ..masks import encode_rle_batch

        if len(points) > self.settings.max_prompt_points:
            raise ValueError(
                f"at most {self.settings.max_prompt_points} points per request, got {len(points)}"
            )
        start = time.perf_counter()
        from ..images import load_image

        predictor: Any = entry.restore(Predictor(self.model))
        if predictor.refiner is not None or zoom_in:
            image = load_image(entry.data, max_pixels=self.settings.max_pixels)
            predictor.set_guide_image(image)
        if zoom_in:
            from ..zoom import ZoomInPredictor

            zoom = ZoomInPredictor(predictor)
            zoom.set_encoded_image(image)
            if zoom_crop is not None:
                self._start_zoom(zoom, entry.id, zoom_crop)
            predictor = zoom
        masks, scores, low_res = predictor.predict(
            point_coords=np.asarray(points, dtype=np.float64) if points else None,
            point_labels=np.asarray(labels, dtype=np.int64) if points else None,
            box=None if box is None else np.asarray(box, dtype=np.float64),
            mask_input=None if mask_input is None else self.decode_mask_input(mask_input),
            multimask_output=multimask_output,
        )
        held = None
        if zoom_in:
            held = predictor.encoded_crop()
            if held is not None:
                self._keep_zoom_crop(entry.id, held)
        rles = encode_rle_batch(masks)
        out: list[dict[str, Any]] = []
        for rle, mask, score in zip(rles, masks, scores):
            out.append(
                {
                    "segmentation": rle,
                    "score": _finite(score),
                    "area": int(mask.sum()),
                    "bbox": _bbox(mask),
                }
            )
        result: dict[str, Any] = {
            "masks": out,
            "best": int(np.argmax(np.nan_to_num(scores, nan=-np.inf))),
        }
        if return_low_res_logits:
            result["low_res_logits"] = [
                base64.b64encode(np.ascontiguousarray(m, dtype="<f4").tobytes()).decode("ascii")
                for m in low_res
            ]
        if zoom_in:
            result["zoom_crop"] = None if held is None else [int(v) for v in held[0]]
        result["decode_ms"] = (time.perf_counter() - start) * 1000
        return result

    def _start_zoom(self, zoom: Any, key: str, rect: Sequence[int]) -> None:
        """Puts a request's zoom_crop in ``zoom``: the kept encoding, else a new one (the
        answer does not depend on which)."""
        crop = tuple(int(v) for v in rect)
        with self._zoom_lock:
            kept = self._zoom_crops.get((key, crop))
            if kept is not None:
                self._zoom_crops.move_to_end((key, crop))
        if kept is not None:
            zoom.use_crop(crop, *kept)
        else:
            zoom.encode_crop(rect)  # checks the rectangle (ValueError: 422)

    def _keep_zoom_crop(
        self, key: str, held: tuple[tuple[int, ...], Predictor, Predictor | None]
    ) -> None:
        if self.settings.zoom_crops == 0:
            return
        rect, crop, mirror = held
        with self._zoom_lock:
            self._zoom_crops[(key, tuple(rect))] = (crop, mirror)
            self._zoom_crops.move_to_end((key, tuple(rect)))
            while len(self._zoom_crops) > self.settings.zoom_crops:
                self._zoom_crops.popitem(last=False)

    def forget_zoom_crops(self, key: str) -> int:
        """Drops the crop encodings of one image (when it is deleted); how many."""
        with self._zoom_lock:
            keys = [k for k in self._zoom_crops if k[0] == key]
            for k in keys:
                del self._zoom_crops[k]
        return len(keys)

    @property
    def zoom_crops_kept(self) -> int:
        """Zoom-in crop encodings held for reuse."""
        return len(self._zoom_crops)

    # ------------------------------------------------------------------ everything
    def everything(self, entry: CachedImage, params: dict[str, Any]) -> dict[str, Any]:
        from ..automatic import AutomaticMaskGenerator
        from ..images import load_image

        s = self.settings
        if params["points_per_side"] > s.max_points_per_side:
            raise ValueError(
                f"points_per_side is at most {s.max_points_per_side} on this server, "
                f"got {params['points_per_side']}"
            )
        if params["crop_n_layers"] > s.max_crop_layers:
            raise ValueError(
                f"crop_n_layers is at most {s.max_crop_layers} on this server, "
                f"got {params['crop_n_layers']}"
            )
        deepest = params["points_per_side"] // (
            params["crop_n_points_downscale_factor"] ** params["crop_n_layers"]
        )
        if deepest < 1:
            raise ValueError(
                "points_per_side / crop_n_points_downscale_factor ** crop_n_layers must be "
                f">= 1 (the deepest crop layer would get no points), got {deepest}"
            )
        start = time.perf_counter()
        image = load_image(entry.data, max_pixels=s.max_pixels)
        # Candidates of one batch are upsampled to the image size together (float logits,
        # then boolean copies): about 3 masks x 7 bytes per pixel per point.
        per_point = 3 * 7 * entry.width * entry.height
        batch = max(1, min(params["points_per_batch"], s.everything_memory_bytes // per_point))
        generator = AutomaticMaskGenerator(
            self.model, **dict(params, points_per_batch=batch), output_mode="coco_rle"
        )
        generator.predictor = _CachedImagePredictor(self.model, image, entry)
        records = generator.generate(image)
        masks = []
        for r in records:
            seg = r["segmentation"]
            counts = seg["counts"]
            masks.append(
                {
                    "segmentation": {
                        "size": [int(v) for v in seg["size"]],
                        "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts,
                    },
                    "area": int(r["area"]),
                    "bbox": [float(v) for v in r["bbox"]],
                    "predicted_iou": _finite(r["predicted_iou"]),
                    "stability_score": _finite(r["stability_score"]),
                    "point_coords": [[float(v) for v in p] for p in r["point_coords"]],
                    "crop_box": [float(v) for v in r["crop_box"]],
                }
            )
        del generator, image, records
        _trim_heap()
        return {
            "masks": masks,
            "points_per_batch": batch,
            "elapsed_ms": (time.perf_counter() - start) * 1000,
        }

    # ------------------------------------------------------------------ exports
    def _annotation_masks(
        self, key: str, annotations: Sequence[dict[str, Any]]
    ) -> tuple[int, int, CachedImage | None]:
        """Image size (from the cache, else the annotations) after checking every mask's size."""
        entry = self.cache.get(key)
        sizes = {tuple(a["segmentation"]["size"]) for a in annotations}
        if entry is not None:
            h, w = entry.height, entry.width
        elif len(sizes) == 1:
            h, w = next(iter(sizes))
        elif not sizes:
            raise LookupError(f"image {key} is not in the cache and there are no annotations")
        else:
            raise ValueError(f"annotations have different sizes: {sorted(sizes)}")
        for k, a in enumerate(annotations):
            if tuple(a["segmentation"]["size"]) != (h, w):
                hh, ww = a["segmentation"]["size"]
                raise ValueError(f"annotation {k} is {hh} x {ww} but the image is {h} x {w}")
        return h, w, entry

    def coco(
        self,
        key: str,
        annotations: Sequence[dict[str, Any]],
        mode: str,
        polygon_tolerance: float,
        file_name: str | None,
    ) -> dict[str, Any]:
        from ..masks import coco_json

        h, w, entry = self._annotation_masks(key, annotations)
        names: list[str] = []
        for a in annotations:
            if a["category"] not in names:
                names.append(a["category"])
        ids = {name: k + 1 for k, name in enumerate(names)}
        categories = [{"id": ids[n], "name": n, "supercategory": "object"} for n in names]
        anns = []
        for a in annotations:
            ann: dict[str, Any] = {
                "segmentation": a["segmentation"],
                "category_id": ids[a["category"]],
            }
            if a.get("name") is not None:
                ann["name"] = a["name"]
            if a.get("score") is not None:
                ann["score"] = a["score"]
            anns.append(ann)
        name = file_name or (entry.file_name if entry is not None else "") or f"{key[:16]}.png"
        image = {"id": 1, "file_name": name, "height": h, "width": w, "segany_id": key}
        return coco_json(
            [image],
            [anns],
            mode="polygon" if mode == "polygon" else "rle",
            categories=categories or None,
            polygon_tolerance=polygon_tolerance,
        )

    def label_map_png(self, key: str, annotations: Sequence[dict[str, Any]]) -> bytes:
        """8-bit (16-bit beyond 255 objects) gray PNG: 0 background, k = annotation k."""
        from ..masks import decode_rle, label_map

        h, w, _ = self._annotation_masks(key, annotations)
        if annotations:
            labels = label_map(np.stack([decode_rle(a["segmentation"]) for a in annotations]))
        else:
            labels = np.zeros((h, w), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(labels).save(buf, format="PNG")  # mode L or I;16
        return buf.getvalue()


class _CachedImagePredictor(Predictor):
    """A predictor that restores the cached embedding when asked to encode the cached image
    itself (the whole-image crop of "segment everything") and encodes anything else."""

    def __init__(self, model: Sam, image: np.ndarray, entry: CachedImage) -> None:
        super().__init__(model)
        self._image = image
        self._entry = entry

    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        if (
            image_format == "RGB"
            and image.shape == self._image.shape
            and np.array_equal(image, self._image)
        ):
            self._entry.restore(self)
        else:
            super().set_image(image, image_format)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        fn: Callable[[int], int] = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None
    return fn


def _trim_heap() -> None:
    """Gives the encoder's freed working memory back to the system (glibc keeps it otherwise:
    measured with segany-lite on 60 photos and a 64 MiB cache, the process grew 163 MiB
    without this and 62 MiB after the first encoding with it)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _bbox(mask: np.ndarray) -> list[float]:
    """Tight ``[x, y, w, h]`` of a bool mask (zeros when empty)."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return [0.0, 0.0, 0.0, 0.0]
    return [
        float(cols[0]),
        float(rows[0]),
        float(cols[-1] - cols[0] + 1),
        float(rows[-1] - rows[0] + 1),
    ]
