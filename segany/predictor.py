"""``Predictor``: encode an image once, then decode any number of prompts in milliseconds.

A drop-in for ``segment_anything.SamPredictor`` (same methods, arguments and return values)
with two additions: many objects in one call (:meth:`Predictor.predict_batch`, or ``predict``
with several boxes / a batch of point sets) and image embeddings that can be saved and loaded
(:meth:`Predictor.save_embedding`, :meth:`Predictor.load_embedding`) so an image is encoded
once across processes.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .modeling.sam import Sam
from .transforms import ResizeLongestSide

ArrayLike = Any


class Predictor:
    """Stateful wrapper around a stateless :class:`~segany.modeling.Sam`."""

    def __init__(
        self, sam_model: Sam, backend: str | Any = "torch", refine: str | bool | Any = "auto"
    ) -> None:
        """``backend``: "torch" (default), "onnxruntime" (exports the model to ONNX once and
        runs its encoder and decoder with ONNX Runtime; needs the ``onnx`` extra), or an
        object with the ``encode``/``decode`` methods of
        :class:`segany.export.OnnxRuntimeBackend` (e.g. one opened from an export folder).

        ``refine``: snap the returned masks onto the photo's edges with
        :class:`segany.refine.GuidedRefiner` (the low-res logits are left as decoded).
        "auto" (default): for segany-lite models only, so official SAM checkpoints give the
        reference's masks; True / False; or a :class:`~segany.refine.GuidedRefiner` whose
        settings are copied (``predictor.refiner`` is this predictor's own). It
        needs the photo: after :meth:`load_embedding`, pass it to :meth:`set_guide_image`."""
        self.model = sam_model
        self.transform = ResizeLongestSide(sam_model.image_encoder.img_size)
        self.refiner = _make_refiner(sam_model, refine)
        self.backend: Any = None
        if backend == "onnxruntime":
            from .export.onnx_backend import OnnxRuntimeBackend

            self.backend = OnnxRuntimeBackend.from_model(sam_model)
        elif hasattr(backend, "encode") and hasattr(backend, "decode"):
            self.backend = backend
        elif backend != "torch":
            raise ValueError(
                f"backend must be 'torch', 'onnxruntime' or a backend object, got {backend!r}"
            )
        self.reset_image()

    # ------------------------------------------------------------------ image state
    @property
    def device(self) -> torch.device:
        return self.model.device

    def reset_image(self) -> None:
        """Forgets the current image and its embedding."""
        self.is_image_set = False
        self.features: torch.Tensor | None = None
        self.high_res_features: list[torch.Tensor] | None = None
        self.orig_h: int | None = None
        self.orig_w: int | None = None
        self.input_h: int | None = None
        self.input_w: int | None = None
        self.original_size: tuple[int, int] | None = None
        self.input_size: tuple[int, int] | None = None
        if self.refiner is not None:
            self.refiner.reset()

    def set_guide_image(self, image: np.ndarray) -> None:
        """Gives the refiner (``refine``) the ``H x W x 3`` uint8 photo of the current
        embedding, e.g. after :meth:`load_embedding`; :meth:`set_image` does it itself."""
        self._require_image()
        if self.refiner is None:
            return
        if image.ndim != 3 or tuple(image.shape[:2]) != self.original_size:
            raise ValueError(
                f"guide image of shape {image.shape} does not match the embedded image's "
                f"size {self.original_size}"
            )
        self.refiner.set_image(image)

    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        """Encodes an ``H x W x 3`` uint8 image (``image_format`` "RGB" or "BGR")."""
        if image_format not in ("RGB", "BGR"):
            raise ValueError(f"image_format must be 'RGB' or 'BGR', got {image_format!r}")
        from .images import validate_image_array

        image = validate_image_array(image)
        if image_format != self.model.image_format:
            image = image[..., ::-1]
        resized = self.transform.apply_image(np.ascontiguousarray(image))
        tensor = torch.as_tensor(resized, device=self.device).permute(2, 0, 1).contiguous()
        self.set_torch_image(tensor[None], (int(image.shape[0]), int(image.shape[1])))
        self.set_guide_image(image)  # channel order does not matter to the filter

    @torch.no_grad()
    def set_torch_image(
        self, transformed_image: torch.Tensor, original_image_size: tuple[int, ...]
    ) -> None:
        """Encodes a ``1 x 3 x h x w`` image already resized to longest side ``img_size``."""
        size = self.model.image_encoder.img_size
        if (
            transformed_image.ndim != 4
            or transformed_image.shape[0] != 1
            or transformed_image.shape[1] != 3
            or max(*transformed_image.shape[2:]) != size
        ):
            raise ValueError(
                f"set_torch_image expects 1 x 3 x h x w with longest side {size}, "
                f"got {tuple(transformed_image.shape)}"
            )
        self.reset_image()
        self.original_size = (int(original_image_size[0]), int(original_image_size[1]))
        self.input_size = (int(transformed_image.shape[-2]), int(transformed_image.shape[-1]))
        image = self.model.preprocess(transformed_image.to(self.device, torch.float32))
        if self.backend is not None:
            feats, high_res = self.backend.encode(image.cpu().numpy())
            self.features = torch.from_numpy(feats).to(self.device)
            self.high_res_features = (
                None
                if high_res is None
                else [torch.from_numpy(f).to(self.device) for f in high_res]
            )
        else:
            self.features, self.high_res_features = self.model.encode_image(image)
        self._set_sizes()

    def _set_sizes(self) -> None:
        assert self.original_size is not None and self.input_size is not None
        if self.backend is None and self.features is not None and self.features.dim() == 4:
            # Channels-last: the decoder reads the embedding as hw x C tokens, which is then
            # a free view instead of a transpose per prompt (same values).
            self.features = self.features.contiguous(memory_format=torch.channels_last)
        self.orig_h, self.orig_w = self.original_size
        self.input_h, self.input_w = self.input_size
        self.is_image_set = True
        if self.backend is None and self.features is not None and self.features.dim() == 4:
            self.model.prepare_decoder(self.features)  # the first click as fast as the next

    def get_image_embedding(self) -> torch.Tensor:
        """The ``1 x C x h x w`` embedding of the current image."""
        self._require_image()
        assert self.features is not None
        return self.features

    def _require_image(self) -> None:
        if not self.is_image_set:
            raise RuntimeError("no image is set: call set_image(...) before predicting")

    # ------------------------------------------------------------------ embeddings on disk
    def model_fingerprint(self) -> str:
        """Identifies the weights an embedding was computed with: the config plus, for every
        parameter and buffer, its name, shape and up to 64 evenly spaced values."""
        cfg = getattr(self.model, "config", None)
        h = hashlib.sha256(cfg.to_json().encode() if cfg is not None else b"?")
        with torch.no_grad():
            for name, t in self.model.state_dict().items():
                flat = t.detach().reshape(-1)
                step = max(1, flat.numel() // 64)
                h.update(f"{name}{tuple(t.shape)}".encode())
                h.update(flat[::step].float().cpu().numpy().tobytes())
        return h.hexdigest()[:16]

    def save_embedding(self, path: str | os.PathLike[str]) -> None:
        """Writes the current image embedding and sizes to a ``.safetensors`` file (atomically)."""
        from safetensors.torch import save_file

        self._require_image()
        assert self.features is not None
        meta = {
            "format": "pt",
            "segany_embedding": json.dumps(
                {
                    "original_size": list(self.original_size or ()),
                    "input_size": list(self.input_size or ()),
                    "model": self.model_fingerprint(),
                }
            ),
        }
        out = Path(path)
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        try:
            tensors = {"features": self.features.detach().cpu().contiguous()}
            for i, f in enumerate(self.high_res_features or []):
                tensors[f"high_res_{i}"] = f.detach().cpu().contiguous()
            save_file(tensors, str(tmp), meta)
            os.replace(tmp, out)
        finally:
            if tmp.exists():
                tmp.unlink()

    def load_embedding(self, path: str | os.PathLike[str]) -> None:
        """Restores an embedding written by :meth:`save_embedding` for the same model."""
        from safetensors import SafetensorError, safe_open

        p = Path(path)
        if not p.is_file():
            raise ValueError(f"embedding file not found: {p}")
        try:
            with safe_open(str(p), framework="pt", device="cpu") as fh:
                raw = (fh.metadata() or {}).get("segany_embedding")
                features = fh.get_tensor("features")
                names = sorted(k for k in fh.keys() if k.startswith("high_res_"))  # noqa: SIM118
                high_res = [fh.get_tensor(k) for k in names] or None
            if raw is None:
                raise ValueError("no segany_embedding metadata")
            meta = json.loads(raw)
            original, inp = tuple(meta["original_size"]), tuple(meta["input_size"])
            if not all(
                len(v) == 2 and all(isinstance(x, int) and x > 0 for x in v)
                for v in (original, inp)
            ):
                raise ValueError(f"bad image sizes {original} / {inp}")
            if features.ndim != 4 or features.shape[0] != 1:
                raise ValueError(f"features of shape {tuple(features.shape)}")
        except (SafetensorError, OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{p} is not a valid segany embedding file: {exc}") from exc
        if meta.get("model") != self.model_fingerprint():
            raise ValueError(
                f"embedding {p} was computed with different model weights than this predictor's"
            )
        self.reset_image()
        self.features = features.to(self.device)
        self.high_res_features = None if high_res is None else [f.to(self.device) for f in high_res]
        self.original_size = (int(original[0]), int(original[1]))
        self.input_size = (int(inp[0]), int(inp[1]))
        self._set_sizes()

    # ------------------------------------------------------------------ prompts
    def predict(
        self,
        point_coords: ArrayLike | None = None,
        point_labels: ArrayLike | None = None,
        box: ArrayLike | None = None,
        mask_input: ArrayLike | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Masks for one object, as the reference; several objects when given a batch.

        Args (original image pixels):
            point_coords: ``N x 2`` (x, y); or ``B x N x 2`` for B objects.
            point_labels: ``N`` (1 positive, 0 negative, -1 ignored); or ``B x N``.
            box: ``4`` or ``1 x 4`` xyxy; ``B x 4`` for B objects.
            mask_input: ``1 x 256 x 256`` low-res logits from a previous call; ``B x 1 x ...``.

        Returns ``(masks C x H x W, iou_predictions C, low_res_logits C x 256 x 256)`` with
        C = 3 if ``multimask_output`` else 1; with B objects each gains a leading ``B`` axis.
        Masks are bool unless ``return_logits``.
        """
        pts = None if point_coords is None else np.asarray(point_coords)
        bx = None if box is None else np.asarray(box)
        batched = (pts is not None and pts.ndim == 3) or (
            bx is not None and bx.ndim == 2 and bx.shape[0] > 1
        )
        if batched:
            return self.predict_batch(
                pts, point_labels, bx, mask_input, multimask_output, return_logits
            )
        if pts is not None:
            pts = pts[None] if pts.ndim == 2 else pts
        labels = None if point_labels is None else np.asarray(point_labels)
        if labels is not None:
            labels = labels[None] if labels.ndim == 1 else labels
        if bx is not None and bx.ndim == 1:
            bx = bx[None]
        mask = None if mask_input is None else np.asarray(mask_input)
        if mask is not None and mask.ndim == 3:
            mask = mask[None]
        masks, iou, low = self.predict_batch(pts, labels, bx, mask, multimask_output, return_logits)
        return masks[0], iou[0], low[0]

    def predict_batch(
        self,
        point_coords: ArrayLike | Sequence[ArrayLike] | None = None,
        point_labels: ArrayLike | Sequence[ArrayLike] | None = None,
        boxes: ArrayLike | None = None,
        mask_input: ArrayLike | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Masks for B objects, decoded together.

        ``point_coords`` is ``B x N x 2`` or a list of B arrays ``N_i x 2``, ``point_labels``
        likewise, ``boxes`` ``B x 4``, ``mask_input`` ``B x 1 x 256 x 256``; any may be None.
        Point sets of different sizes are decoded in groups of equal size, so every object
        gets exactly the result of its own ``predict`` call (padding them with label -1
        points, as a ``B x N x 2`` array with -1 labels does, adds decoder tokens that change
        the masks, as in the reference). Returns ``B x C x H x W`` masks, ``B x C`` IoU
        predictions and ``B x C x 256 x 256`` low-res logits.
        """
        self._require_image()
        groups = _ragged_groups(point_coords)
        if groups is not None and len(groups) > 1:
            return self._predict_groups(
                groups,
                point_coords,
                point_labels,
                boxes,
                mask_input,
                multimask_output,
                return_logits,
            )
        coords_t, labels_t, box_t, mask_t = self._prepare_prompts(
            point_coords, point_labels, boxes, mask_input
        )
        masks, iou, low = self.predict_torch(
            coords_t, labels_t, box_t, mask_t, multimask_output, return_logits
        )
        return (
            np.ascontiguousarray(masks.detach().cpu().numpy()),  # row-major, as the reference
            iou.detach().float().cpu().numpy(),
            low.detach().float().cpu().numpy(),
        )

    def _predict_groups(
        self,
        groups: list[list[int]],
        point_coords: Any,
        point_labels: Any,
        boxes: Any,
        mask_input: Any,
        multimask_output: bool,
        return_logits: bool,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if point_labels is None:
            raise ValueError("point_coords and point_labels must be given together")
        _pad_points(point_coords, point_labels)  # validates shapes and labels, one message each
        n = len(point_coords)
        box_arr = None if boxes is None else np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        mask_arr = None if mask_input is None else np.asarray(mask_input, dtype=np.float32)
        for name, arr in (("boxes", box_arr), ("mask_input", mask_arr)):
            if arr is not None and len(arr) != n:
                raise ValueError(f"prompt batch sizes differ: points={n}, {name}={len(arr)}")
        outputs: list[Any] = [None] * n
        for idx in groups:
            res = self.predict_batch(
                np.stack([np.asarray(point_coords[i], dtype=np.float64) for i in idx]),
                np.stack([np.asarray(point_labels[i]) for i in idx]),
                None if box_arr is None else box_arr[idx],
                None if mask_arr is None else mask_arr[idx],
                multimask_output,
                return_logits,
            )
            for j, i in enumerate(idx):
                outputs[i] = tuple(r[j] for r in res)
        masks, ious, lows = (np.stack([o[k] for o in outputs]) for k in range(3))
        return masks, ious, lows

    def _prepare_prompts(
        self,
        point_coords: Any,
        point_labels: Any,
        boxes: Any,
        mask_input: Any,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        assert self.original_size is not None
        h, w = self.original_size
        coords_t = labels_t = box_t = mask_t = None
        batch: list[tuple[str, int]] = []
        if point_coords is not None or point_labels is not None:
            if point_coords is None or point_labels is None:
                raise ValueError("point_coords and point_labels must be given together")
            coords, labels = _pad_points(point_coords, point_labels)
            _check_finite(coords, "point_coords")
            valid = labels != -1
            xs, ys = coords[..., 0][valid], coords[..., 1][valid]
            if xs.size and (xs.min() < 0 or ys.min() < 0 or xs.max() > w or ys.max() > h):
                raise ValueError(
                    f"point_coords out of bounds: points must lie within the {w}x{h} image "
                    f"(0 <= x <= {w}, 0 <= y <= {h})"
                )
            coords = self.transform.apply_coords(coords, self.original_size)
            coords_t = torch.as_tensor(coords, dtype=torch.float, device=self.device)
            labels_t = torch.as_tensor(labels, dtype=torch.int, device=self.device)
            batch.append(("points", coords.shape[0]))
        if boxes is not None:
            b = np.asarray(boxes, dtype=np.float64)
            if b.ndim == 1:
                b = b[None]
            if b.ndim != 2 or b.shape[1] != 4:
                raise ValueError(f"boxes must be B x 4 (x0, y0, x1, y1), got shape {b.shape}")
            _check_finite(b, "box")
            if (b[:, 2] < b[:, 0]).any() or (b[:, 3] < b[:, 1]).any():
                raise ValueError("boxes must be x0, y0, x1, y1 with x1 >= x0 and y1 >= y0")
            if b.size and (
                b[:, 0::2].min() < 0
                or b[:, 1::2].min() < 0
                or b[:, 0::2].max() > w
                or b[:, 1::2].max() > h
            ):
                raise ValueError(
                    f"box out of bounds: coordinates must lie within the {w}x{h} image"
                )
            box_t = torch.as_tensor(
                self.transform.apply_boxes(b, self.original_size),
                dtype=torch.float,
                device=self.device,
            )
            batch.append(("boxes", b.shape[0]))
        if mask_input is not None:
            m = np.asarray(mask_input, dtype=np.float32)
            expected = self.model.prompt_encoder.mask_input_size
            if m.ndim == 3:
                m = m[None]
            if m.ndim != 4 or m.shape[1] != 1 or tuple(m.shape[2:]) != tuple(expected):
                raise ValueError(
                    f"mask_input must be B x 1 x {expected[0]} x {expected[1]} low-res logits "
                    f"(as returned by predict), got shape {m.shape}"
                )
            _check_finite(m, "mask_input")
            mask_t = torch.as_tensor(m, dtype=torch.float, device=self.device)
            batch.append(("mask_input", m.shape[0]))
        sizes = {n for _, n in batch}
        if 0 in sizes:
            raise ValueError(
                "empty prompt batch: " + ", ".join(f"{k}={n}" for k, n in batch) + " objects"
            )
        if len(sizes) > 1:
            raise ValueError(
                "prompt batch sizes differ: " + ", ".join(f"{k}={n}" for k, n in batch)
            )
        return coords_t, labels_t, box_t, mask_t

    @torch.no_grad()
    def predict_torch(
        self,
        point_coords: torch.Tensor | None,
        point_labels: torch.Tensor | None,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Batched prediction on tensors already in the model's input frame.

        ``point_coords`` ``B x N x 2``, ``point_labels`` ``B x N``, ``boxes`` ``B x 4``,
        ``mask_input`` ``B x 1 x 256 x 256``. Returns masks ``B x C x H x W``, IoU ``B x C``,
        low-res logits ``B x C x 256 x 256``.
        """
        self._require_image()
        assert self.features is not None and self.input_size and self.original_size
        points = None
        if point_coords is not None:
            if point_labels is None:
                raise ValueError("point_labels must be supplied with point_coords")
            points = (point_coords, point_labels)
        low_res, iou = self.decode_low_res(points, boxes, mask_input, multimask_output)
        refiner = self.refiner if self.refiner is not None and self.refiner.has_image else None
        threshold = None if return_logits else self.model.mask_threshold
        masks = self.model.postprocess_masks(  # the refiner thresholds what it refines
            low_res, self.input_size, self.original_size, threshold=None if refiner else threshold
        )
        if refiner is not None:
            clicks = {}
            if points is not None and refiner.keep_clicks:  # back to image pixels
                scale = torch.tensor(
                    [
                        self.original_size[1] / self.input_size[1],
                        self.original_size[0] / self.input_size[0],
                    ]
                )
                clicks = {
                    "points": (points[0].detach().float().cpu() * scale).numpy(),
                    "labels": points[1].detach().cpu().numpy(),
                }
            refined = refiner.refine(
                masks.detach().float().cpu().numpy(), **clicks, threshold=threshold
            )
            masks = torch.from_numpy(refined).to(masks.device)
        return masks, iou, low_res

    def decode_low_res(
        self,
        points: tuple[torch.Tensor, torch.Tensor] | None,
        boxes: torch.Tensor | None,
        mask_input: torch.Tensor | None,
        multimask_output: bool,
        iou_floor: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt encoder + mask decoder on the cached embedding: ``B x C x 4h x 4w`` logits
        and ``B x C`` IoU predictions, before any upsampling. ``iou_floor``: the caller drops
        masks whose predicted IoU is not above it, so their logits may be left as zeros."""
        self._require_image()
        if self.backend is not None:
            return self._decode_backend(points, boxes, mask_input, multimask_output)
        assert self.features is not None  # _require_image
        return self.model.decode(
            self.features,
            self.high_res_features,
            points=points,
            boxes=boxes,
            masks=mask_input,
            multimask_output=multimask_output,
            iou_floor=iou_floor,
        )

    def _decode_backend(
        self,
        points: tuple[torch.Tensor, torch.Tensor] | None,
        boxes: torch.Tensor | None,
        mask_input: torch.Tensor | None,
        multimask_output: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`decode_low_res` through ``self.backend``: points, then the box corners
        (labels 2, 3) or one padding point (label -1), as the prompt encoder orders them."""
        coords, labels = [], []
        if points is not None:
            coords.append(points[0].detach().cpu().numpy().astype(np.float32))
            labels.append(points[1].detach().cpu().numpy().astype(np.float32))
        b = coords[0].shape[0] if coords else (0 if boxes is None else boxes.shape[0])
        if boxes is not None:
            coords.append(boxes.detach().cpu().numpy().astype(np.float32).reshape(-1, 2, 2))
            labels.append(np.tile(np.array([[2.0, 3.0]], dtype=np.float32), (b, 1)))
        elif points is not None:
            coords.append(np.zeros((b, 1, 2), dtype=np.float32))
            labels.append(-np.ones((b, 1), dtype=np.float32))
        if not coords:
            raise ValueError("this backend needs at least one point or box per object")
        mask = None if mask_input is None else mask_input.detach().cpu().numpy()
        feats = self.features.detach().cpu().numpy()  # type: ignore[union-attr]
        high_res = [f.detach().cpu().numpy() for f in self.high_res_features or []] or None
        low, iou = self.backend.decode(
            feats, high_res, np.concatenate(coords, 1), np.concatenate(labels, 1), mask
        )
        sl = slice(1, None) if multimask_output else slice(0, 1)
        return (
            torch.from_numpy(np.ascontiguousarray(low[:, sl])).to(self.device),
            torch.from_numpy(np.ascontiguousarray(iou[:, sl])).to(self.device),
        )


def _make_refiner(model: Sam, refine: Any) -> Any:
    """The ``refine`` argument of :class:`Predictor` -> a refiner or None."""
    from .refine import GuidedRefiner

    # the decoder's mask grid: 4x the embedding grid, in the input frame
    grid = model.prompt_encoder.mask_input_size[0]
    if isinstance(refine, GuidedRefiner):  # its settings; a refiner holds one photo
        return GuidedRefiner(
            refine.radius,
            refine.eps,
            refine.keep_clicks,
            mask_grid=grid,
            fit_scale=refine.fit_scale,
        )
    if isinstance(refine, str) and refine == "auto":
        cfg = getattr(model, "config", None)
        refine = cfg is not None and cfg.image_encoder.kind == "efficientnet_lite"
    if refine is True:
        return GuidedRefiner(mask_grid=grid)
    if refine is False or refine is None:
        return None
    raise ValueError(f"refine must be 'auto', True, False or a GuidedRefiner, got {refine!r}")


def _ragged_groups(point_coords: Any) -> list[list[int]] | None:
    """Object indices grouped by point count for a list of per-object point arrays (else
    None: one uniform array needs no grouping)."""
    if point_coords is None or isinstance(point_coords, np.ndarray):
        return None
    if not isinstance(point_coords, (list, tuple)) or not point_coords:
        return None
    if np.ndim(point_coords[0]) < 2:
        return None
    groups: dict[int, list[int]] = {}
    for i, c in enumerate(point_coords):
        groups.setdefault(len(c), []).append(i)
    return list(groups.values())


def _check_finite(a: np.ndarray, name: str) -> None:
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or infinite values")


def _pad_points(coords: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    """Stacks per-object point sets into ``B x N x 2`` / ``B x N``, padding with label -1."""
    if (
        isinstance(coords, np.ndarray)
        or not isinstance(coords, (list, tuple))
        or (len(coords) and np.ndim(coords[0]) < 2)
    ):
        c = np.asarray(coords, dtype=np.float64)
        lab = np.asarray(labels)
        if c.ndim not in (2, 3):
            raise ValueError(f"point_coords must be N x 2 or B x N x 2, got shape {c.shape}")
        if lab.ndim != c.ndim - 1:
            raise ValueError(
                f"point_labels must be N (or B x N) for point_coords of shape {c.shape}, "
                f"got shape {lab.shape}"
            )
        c_list = [c] if c.ndim == 2 else list(c)
        l_list = [lab] if lab.ndim == 1 else list(lab)
    else:
        c_list = [np.asarray(c, dtype=np.float64) for c in coords]
        if not isinstance(labels, (list, tuple, np.ndarray)) or (
            len(labels) and np.ndim(labels[0]) == 0
        ):
            raise ValueError("point_labels must hold one label array per point set")
        l_list = [np.asarray(lab) for lab in labels]
    if len(c_list) != len(l_list):
        raise ValueError(f"{len(c_list)} point sets but {len(l_list)} label sets")
    n = max((len(c) for c in c_list), default=0)
    out_c = np.zeros((len(c_list), n, 2), dtype=np.float64)
    out_l = -np.ones((len(c_list), n), dtype=np.int64)
    for i, (c, lab) in enumerate(zip(c_list, l_list)):
        if c.ndim != 2 or c.shape[1] != 2:
            raise ValueError(f"point_coords must be N x 2 (x, y) per object, got {c.shape}")
        if lab.shape != (c.shape[0],):
            raise ValueError(f"point_labels shape {lab.shape} does not match {c.shape[0]} points")
        if lab.size and not np.isin(lab, (-1, 0, 1)).all():
            raise ValueError("point_labels must be 1 (positive), 0 (negative) or -1 (ignore)")
        out_c[i, : len(c)] = c
        out_l[i, : len(c)] = lab
    return out_c, out_l
