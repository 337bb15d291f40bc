"""Augmentation for raw-image training, in the model's square input frame.

An image (``H x W x 3`` uint8) and its object masks (``K x H x W`` bool) become a
:class:`FrameSample`: the image resized so its longest side is ``scale * S`` (``S`` the model
input side; bilinear like :class:`segany.transforms.ResizeLongestSide`, so ``scale = 1`` gives
exactly what the predictor feeds the model), randomly cropped where it exceeds ``S`` and padded
right/bottom where it is smaller, optionally flipped left-right first. Masks follow the same
geometry (resized as coverage, kept where at least half covered). ``copy_paste`` then pastes an
object (pixels + mask) of one frame into another at the same place: the pasted object becomes a
new mask and occludes the masks under it, which are cut and dropped when too little is left.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..transforms import preprocess_shape

__all__ = ["FrameSample", "copy_paste", "downsample_masks", "hflip", "to_frame"]


@dataclass
class FrameSample:
    """One training image in the ``S x S`` model input frame.

    Attributes:
        image: ``S x S x 3`` uint8 RGB; zeros outside ``valid``.
        masks: ``K x S x S`` bool object masks.
        valid: ``S x S`` bool, the pixels that hold image content (the rest is padding).
    """

    image: np.ndarray
    masks: np.ndarray
    valid: np.ndarray


def hflip(image: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Left-right flip of ``H x W x 3`` pixels and ``K x H x W`` masks."""
    return np.ascontiguousarray(image[:, ::-1]), np.ascontiguousarray(masks[:, :, ::-1])


def resize_masks(masks: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """``K x H x W`` bool -> ``K x h x w`` bool, kept where the resized coverage is >= 0.5.

    Coverage is resized with the filter the image gets (bilinear, antialiased when shrinking,
    as PIL's), so masks stay on their pixels.
    """
    k, h0, w0 = masks.shape
    h, w = hw
    if (h, w) == (h0, w0):
        return masks.copy()
    out = np.empty((k, h, w), dtype=bool)
    for start in range(0, k, 8):  # bounded float memory for big frames
        chunk = torch.from_numpy(masks[start : start + 8]).float()[None]
        soft = F.interpolate(
            chunk, size=(h, w), mode="bilinear", align_corners=False, antialias=True
        )
        out[start : start + 8] = (soft[0] >= 0.5).numpy()
    return out


def to_frame(
    image: np.ndarray,
    masks: np.ndarray,
    size: int,
    *,
    scale: float = 1.0,
    offset: tuple[float, float] = (0.0, 0.0),
) -> FrameSample:
    """Resizes to longest side ``round(scale * size)`` and places the result in the
    ``size x size`` frame: where it is larger than the frame, the window starts at
    ``offset`` (fractions 0..1 of the excess along y and x); where smaller, it is padded."""
    long_side = max(1, int(round(scale * size)))
    h, w = preprocess_shape(image.shape[0], image.shape[1], long_side)
    h, w = max(1, h), max(1, w)
    if (h, w) == image.shape[:2]:
        resized = image
    else:
        resized = np.array(Image.fromarray(image).resize((w, h), Image.Resampling.BILINEAR))
    rmasks = resize_masks(masks, (h, w))
    y0 = int(round(offset[0] * max(0, h - size)))
    x0 = int(round(offset[1] * max(0, w - size)))
    ch, cw = min(h, size), min(w, size)
    frame = np.zeros((size, size, 3), dtype=np.uint8)
    frame[:ch, :cw] = resized[y0 : y0 + ch, x0 : x0 + cw]
    fmasks = np.zeros((len(masks), size, size), dtype=bool)
    fmasks[:, :ch, :cw] = rmasks[:, y0 : y0 + ch, x0 : x0 + cw]
    valid = np.zeros((size, size), dtype=bool)
    valid[:ch, :cw] = True
    return FrameSample(frame, fmasks, valid)


def copy_paste(dst: FrameSample, src: FrameSample, obj: int, *, min_area: int = 1) -> FrameSample:
    """``dst`` with object ``obj`` of ``src`` pasted on top (same frame position).

    The pasted mask is appended as the last mask; masks of ``dst`` under it lose the covered
    pixels, and those left with fewer than ``min_area`` pixels are dropped.
    """
    paste = src.masks[obj]
    image = dst.image.copy()
    image[paste] = src.image[paste]
    cut = dst.masks & ~paste
    keep = cut.reshape(len(cut), -1).sum(1) >= min_area
    masks = np.concatenate([cut[keep], paste[None]], axis=0)
    return FrameSample(image, masks, dst.valid | paste)


def downsample_masks(masks: np.ndarray, factor: int) -> np.ndarray:
    """``... x S x S`` bool -> ``... x S/f x S/f``: kept where at least half covered (area
    average, the mask frame of the feature cache)."""
    if factor == 1:
        return masks.copy()
    *lead, h, w = masks.shape
    hs, ws = h // factor, w // factor
    blocks = masks[..., : hs * factor, : ws * factor].reshape(*lead, hs, factor, ws, factor)
    dtype = np.uint8 if factor * factor < 256 else np.int32
    return 2 * blocks.sum(axis=(-3, -1), dtype=dtype).astype(np.int32) >= factor * factor
