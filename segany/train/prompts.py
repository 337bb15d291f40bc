"""Prompt simulation for training (the SAM recipe), on masks in a training frame.

Masks here are ``H x W`` bool arrays in some frame (e.g. the padded model input at 1/2
resolution); coordinates are returned in that frame's pixels as (x, y) of pixel centres.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


@dataclass
class Click:
    x: float
    y: float
    positive: bool


def _distance_inside(region: np.ndarray) -> np.ndarray:
    """Distance of each region pixel to the nearest non-region pixel (frame border = outside)."""
    padded = np.pad(region.astype(np.uint8), 1)
    dist = cv2.distanceTransform(padded, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    return dist[1:-1, 1:-1]


def _pick(region: np.ndarray, rng: np.random.Generator, center_prob: float) -> tuple[int, int]:
    """A pixel of ``region``: its innermost point with ``center_prob``, else uniform."""
    if rng.random() < center_prob:
        dist = _distance_inside(region)
        flat = int(np.argmax(dist))
        return flat % region.shape[1], flat // region.shape[1]
    ys, xs = np.nonzero(region)
    i = int(rng.integers(len(xs)))
    return int(xs[i]), int(ys[i])


def initial_click(gt: np.ndarray, rng: np.random.Generator, center_prob: float = 0.5) -> Click:
    """A positive click inside a non-empty ``gt``."""
    if not gt.any():
        raise ValueError("cannot place a click in an empty mask")
    x, y = _pick(gt, rng, center_prob)
    return Click(float(x), float(y), True)


def corrective_click(
    gt: np.ndarray,
    pred: np.ndarray,
    rng: np.random.Generator,
    center_prob: float = 0.5,
    valid: np.ndarray | None = None,
) -> Click | None:
    """Next click from the error of ``pred``: positive in missed object, negative in false
    foreground. With ``center_prob`` it follows the evaluation protocol (innermost point of
    the larger error region); otherwise it is uniform over all error pixels (SAM's recipe).
    Returns None when there is no error."""
    fn = gt & ~pred
    fp = pred & ~gt
    if valid is not None:
        fn &= valid
        fp &= valid
    if not fn.any() and not fp.any():
        return None
    if rng.random() < center_prob:
        dfn, dfp = _distance_inside(fn), _distance_inside(fp)
        positive = dfn.max() > dfp.max()
        dist = dfn if positive else dfp
        flat = int(np.argmax(dist))
        return Click(float(flat % gt.shape[1]), float(flat // gt.shape[1]), bool(positive))
    err = fn | fp
    ys, xs = np.nonzero(err)
    i = int(rng.integers(len(xs)))
    return Click(float(xs[i]), float(ys[i]), bool(fn[ys[i], xs[i]]))


def noisy_box(
    gt: np.ndarray, rng: np.random.Generator, noise: float = 0.1, max_noise: float = 20.0
) -> np.ndarray:
    """The tight box of ``gt`` (x0, y0, x1, y1) with each side moved by N(0, noise * side),
    capped at ``max_noise`` pixels, as in SAM's training; clipped to the frame."""
    ys, xs = np.nonzero(gt)
    if len(xs) == 0:
        raise ValueError("cannot box an empty mask")
    box = np.array([xs.min(), ys.min(), xs.max(), ys.max()], dtype=np.float64)
    w, h = box[2] - box[0] + 1, box[3] - box[1] + 1
    scale = np.array([w, h, w, h]) * noise
    jitter = np.clip(rng.normal(0, 1, 4) * scale, -max_noise, max_noise)
    box = box + jitter
    hgt, wid = gt.shape
    box[0::2] = np.clip(box[0::2], 0, wid - 1)
    box[1::2] = np.clip(box[1::2], 0, hgt - 1)
    x0, x1 = sorted(box[0::2])
    y0, y1 = sorted(box[1::2])
    return np.array([x0, y0, x1, y1])


def noisy_mask_logits(
    gt: np.ndarray, rng: np.random.Generator, out_size: tuple[int, int]
) -> np.ndarray:
    """A rough version of ``gt`` as logits of ``out_size``: random erosion/dilation, blur
    and a random amplitude (the "rough mask" prompt)."""
    m: np.ndarray = gt.astype(np.uint8)
    k = int(rng.integers(1, max(2, min(gt.shape) // 20) + 1))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * k + 1, 2 * k + 1))
    m = cv2.dilate(m, kernel) if rng.random() < 0.5 else cv2.erode(m, kernel)
    soft = cv2.resize(
        m.astype(np.float32), (out_size[1], out_size[0]), interpolation=cv2.INTER_AREA
    )
    sigma = float(rng.uniform(0.5, 2.0))
    soft = cv2.GaussianBlur(soft, (0, 0), sigma)
    amplitude = float(rng.uniform(2.0, 10.0))
    return ((soft - 0.5) * 2 * amplitude).astype(np.float32)
