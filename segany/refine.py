"""Edge-aware refinement of mask logits at the original resolution, with the photo as guide.

A mask decoder predicts logits on a grid four times finer than its image embedding; bilinear
upsampling to the original size then draws every boundary as a smooth ramp a few grid cells
wide, blind to the edges in the photo. :class:`GuidedRefiner` snaps that ramp onto the image's
edges with the guided filter (He, Sun and Tang, "Guided Image Filtering", TPAMI 2013) in its
colour form: in every window the refined probability is an affine function of the RGB values,
fitted by least squares to the predicted probability, and the fits of the overlapping windows
are averaged. Where the probability is flat (deep inside or outside the object) the filter
leaves it unchanged, so only a band around the predicted boundary is computed.

The window radius is given in cells of the decoder's mask grid (``radius`` x original size /
mask-grid size pixels), so the same setting suits any photo size. ``eps`` is the
regulariser on the RGB covariance (intensities in [0, 1]): smaller follows weaker edges.

:class:`segany.Predictor` applies it for segany-lite models by default (``refine="auto"``);
official SAM checkpoints keep the reference's masks unless asked (``refine=True``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import cv2
import numpy as np

__all__ = ["REFINE_CHOICES", "GuidedRefiner"]

#: ``--refine`` values of the command line and benchmarks -> ``Predictor(refine=...)``
REFINE_CHOICES: dict[str, str | bool] = {"auto": "auto", "on": True, "off": False}

_P_LOW = 1e-3  # probabilities outside (_P_LOW, 1 - _P_LOW) count as flat
_CLIP = 1e-6  # refined probabilities are kept in (_CLIP, 1 - _CLIP) before the logit
_PLANES_PIXELS = 4_000_000  # full-resolution colour planes kept up to this size (12 B/px)
_ONE_PASS_PIXELS = 1_500_000  # bands up to this size are finished in one piece
_TILE = 512  # larger ones in tiles of this side, near the boundary only
_PAIRS = ((0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (2, 2))  # the covariance's upper triangle


class GuidedRefiner:
    """Colour guided filter on ``sigmoid(logits)``, returned as logits (module docs).

    Args:
        radius: window radius in cells of the mask grid (``mask_grid`` below).
        eps: regulariser of the guide's covariance, intensities in [0, 1].
        keep_clicks: :class:`segany.Predictor` passes the prompt's clicks to :meth:`refine`
            (which keeps whatever clicks it is given), so the refinement never undoes what a
            click asked (off by default: on the held-out masks it cost 0.12 clicks of
            NoC@90 for 0.03 more clicks obeyed).
        fit_scale: fit the windows at 1/``fit_scale`` of the photo's resolution; None
            (default): about 1 pixel a mask cell (:meth:`subsample`); 1: at full resolution.
        mask_grid: longest side of the decoder's mask grid in the input frame (the encoder's
            input size / 4); :class:`segany.Predictor` sets it from the model.
    """

    def __init__(
        self,
        radius: float = 2.4,
        eps: float = 1e-3,
        keep_clicks: bool = False,
        mask_grid: int = 256,
        fit_scale: int | None = None,
    ) -> None:
        if not (np.isfinite(radius) and radius > 0):
            raise ValueError(f"radius must be a positive number of mask cells, got {radius!r}")
        if not (np.isfinite(eps) and eps > 0):
            raise ValueError(f"eps must be positive, got {eps!r}")
        if int(mask_grid) < 1:
            raise ValueError(f"mask_grid must be a positive int, got {mask_grid!r}")
        if fit_scale is not None and (isinstance(fit_scale, bool) or int(fit_scale) < 1):
            raise ValueError(f"fit_scale must be None or a positive int, got {fit_scale!r}")
        self.radius = float(radius)
        self.eps = float(eps)
        self.keep_clicks = bool(keep_clicks)
        self.mask_grid = int(mask_grid)
        self.fit_scale = None if fit_scale is None else int(fit_scale)
        self._guide: np.ndarray | None = None
        self._cache: tuple[Any, tuple[np.ndarray, np.ndarray | None]] | None = None
        self._terms_cache: tuple[Any, _GuideTerms] | None = None

    @property
    def has_image(self) -> bool:
        return self._guide is not None

    def set_image(self, image: np.ndarray) -> None:
        """The ``H x W x 3`` uint8 RGB photo the next logits belong to (kept, not copied)."""
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(
                f"the guide must be an H x W x 3 uint8 image, got {image.dtype} {image.shape}"
            )
        self._guide = image
        self._cache = self._terms_cache = None

    def reset(self) -> None:
        self._guide = None
        self._cache = self._terms_cache = None

    def pixel_radius(self, hw: tuple[int, int]) -> int:
        """The window radius in original pixels for an ``H x W`` photo."""
        return max(1, round(self.radius * max(hw) / self.mask_grid))

    def refine(
        self,
        logits: np.ndarray,
        points: np.ndarray | None = None,
        labels: np.ndarray | None = None,
        threshold: float | None = None,
    ) -> np.ndarray:
        """``H x W`` or ``... x H x W`` float logits of the current image -> refined logits
        (a new float32 array; pixels away from every boundary keep their value), or with
        ``threshold`` the refined masks (bool, refined logit > ``threshold``; faster).

        ``points`` (``N x 2`` x, y in image pixels) and ``labels`` (``N``: 1 positive, 0
        negative, others ignored), or ``B x N x 2`` and ``B x N`` for logits ``B x ... x H x
        W``: the clicks the masks were asked for. Within a window radius of each click the
        refinement may only agree more with it (positive: the larger of the refined and the
        given logit; negative: the smaller), so it never undoes what a click asked."""
        if self._guide is None:
            raise RuntimeError("GuidedRefiner.set_image must be called before refine")
        logits = np.asarray(logits)
        hw = self._guide.shape[:2]
        if logits.ndim < 2 or logits.shape[-2:] != hw:
            raise ValueError(
                f"logits of shape {logits.shape} do not match the guide image's {hw[0]} x {hw[1]}"
            )
        clicks = _clicks(points, labels, logits.shape[:-2])
        given = logits.reshape(-1, *hw)
        out: np.ndarray = (
            logits.astype(np.float32, copy=True) if threshold is None else logits > threshold
        )
        flat = out.reshape(-1, *hw)
        per_item = flat.shape[0] // len(clicks)
        r = self.pixel_radius(hw)
        for i in range(flat.shape[0]):
            self._refine_one(given[i], flat[i], threshold)
            for x, y, positive in clicks[i // per_item]:
                _keep_click(flat[i], given[i], x, y, positive, r, threshold)
        return out

    def subsample(self, hw: tuple[int, int]) -> int:
        """The factor the filter's windows are fitted at below the photo's resolution: about
        1 pixel a mask cell (the fast guided filter; the fits are then interpolated and
        applied to the full-resolution photo; on the held-out masks 1 and 2 pixels a cell
        scored the same); ``fit_scale`` when given (1: no subsampling)."""
        if self.fit_scale is not None:
            return self.fit_scale
        return max(1, round(max(hw) / self.mask_grid))

    def _low_res(self, s: int) -> tuple[np.ndarray, np.ndarray | None]:
        """The photo at 1/``s`` (area-averaged, uint8) and its full-resolution colour planes
        in [0, 1] (None above ``_PLANES_PIXELS``: made per tile then), once per image."""
        assert self._guide is not None
        key = ("low", s)
        if self._cache is None or self._cache[0] != key:
            h, w = self._guide.shape[:2]
            low = self._guide
            if s > 1:
                low = cv2.resize(
                    self._guide, (-(-w // s), -(-h // s)), interpolation=cv2.INTER_AREA
                )
            full = _planes(self._guide) if h * w <= _PLANES_PIXELS else None
            self._cache = (key, (low, full))
        return self._cache[1]

    def _terms(self, low: np.ndarray, s: int, r: int) -> _GuideTerms:
        """The guide's terms of the low-resolution photo, made once per image and radius."""
        key = ("terms", s, r)
        if self._terms_cache is None or self._terms_cache[0] != key:
            self._terms_cache = (key, _guide_terms(low, r, self.eps))
        return self._terms_cache[1]

    def _refine_one(self, logit: np.ndarray, out: np.ndarray, threshold: float | None) -> None:
        """Refines one ``H x W`` logit map into ``out``: float32 logits (None ``threshold``)
        or a bool mask, already holding the unrefined result."""
        h, w = logit.shape
        r_full = self.pixel_radius((h, w))
        s = self.subsample((h, w))
        low, full = self._low_res(s)
        guide = self._guide
        assert guide is not None
        hl, wl = low.shape[:2]
        r = max(1, round(r_full / s))
        if s == 1:
            rect = _band(logit, 2 * r_full + 1)
            if rect is None:
                return
            ly0, ly1, lx0, lx1 = y0, y1, x0, x1 = rect
            p = _sigmoid(logit[y0:y1, x0:x1])
        else:  # the band found on the logits at 1/s, then its box in the photo's frame
            low_logit = cv2.resize(
                np.asarray(logit, np.float32), (wl, hl), interpolation=cv2.INTER_LINEAR
            )
            low_rect = _band(low_logit, 2 * r + 2)  # a cell to spare for the interpolation
            if low_rect is None:
                return
            ly0, ly1, lx0, lx1 = low_rect
            y0, y1 = ly0 * h // hl, min(h, -(-ly1 * h // hl))
            x0, x1 = lx0 * w // wl, min(w, -(-lx1 * w // wl))
            p = _sigmoid(low_logit[ly0:ly1, lx0:lx1])
        coef = _coefficients(self._terms(low, s, r).crop(ly0, ly1, lx0, lx1), p, r)
        q_threshold = None if threshold is None else 1.0 / (1.0 + np.exp(-threshold))
        # Back at full resolution: in one piece, or for a large band in tiles, skipping those
        # far from every uncertain pixel (there the fit is flat and the result is the given
        # one): bounded memory, and the work of a huge photo follows its boundaries.
        box = (ly0, ly1, lx0, lx1)
        if (y1 - y0) * (x1 - x0) <= _ONE_PASS_PIXELS:
            tiles = [(y0, y1, x0, x1)]
        else:
            near = _near_band(low_logit if s > 1 else logit, box, 2 * r + 2)
            tiles = [
                (t0, min(y1, t0 + _TILE), u0, min(x1, u0 + _TILE))
                for t0 in range(y0, y1, _TILE)
                for u0 in range(x0, x1, _TILE)
                if near[
                    _cells(t0, min(y1, t0 + _TILE), h, hl, ly0),
                    _cells(u0, min(x1, u0 + _TILE), w, wl, lx0),
                ].any()
            ]
        for t0, t1, u0, u1 in tiles:
            if s == 1:
                c: Any = coef[:, t0 - y0 : t1 - y0, u0 - x0 : u1 - x0]
            else:  # bilinear, pixel centres as cv2.resize maps them (an affine map per axis)
                c = _upsampled(coef, (hl / h, wl / w), (t0, t1, u0, u1), (ly0, lx0))
            g = full[:, t0:t1, u0:u1] if full is not None else _planes(guide[t0:t1, u0:u1])
            q = c[3].copy() if s == 1 else c[3]  # a fresh plane when interpolated
            for k in range(3):  # q += a_k * I_k, one pass each
                cv2.accumulateProduct(c[k], g[k], q)
            if q_threshold is not None:
                np.greater(q, q_threshold, out=out[t0:t1, u0:u1])
            else:
                np.clip(q, _CLIP, 1.0 - _CLIP, out=q)
                out[t0:t1, u0:u1] = np.log(q) - np.log1p(-q)


def _upsampled(
    coef: np.ndarray,
    scale: tuple[float, float],
    tile: tuple[int, int, int, int],
    origin: tuple[int, int],
) -> list[np.ndarray]:
    """The planes of ``coef`` (a crop at ``origin`` of a grid ``scale`` times the photo's
    size) bilinearly interpolated at the photo's pixels ``tile`` (``y0, y1, x0, x1``), pixel
    centres mapped as :func:`cv2.resize` maps them, edges replicated. An affine warp: 5-10x
    faster than a remap with per-pixel maps, and no maps to build; like a remap it
    interpolates at 1/32-pixel steps of the coefficient grid (cv2.resize exactly)."""
    (sy, sx), (t0, t1, u0, u1), (oy, ox) = scale, tile, origin
    warp = np.array([[sx, 0.0, (u0 + 0.5) * sx - 0.5 - ox], [0.0, sy, (t0 + 0.5) * sy - 0.5 - oy]])
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    return [
        cv2.warpAffine(k, warp, (u1 - u0, t1 - t0), flags=flags, borderMode=cv2.BORDER_REPLICATE)
        for k in coef
    ]


def _cells(a: int, b: int, n: int, n_low: int, offset: int) -> slice:
    """The cells of a low-res crop starting at ``offset`` that full-res rows (or columns)
    ``a:b`` of ``n`` read, one to spare each side."""
    return slice(max(0, a * n_low // n - offset - 1), max(0, -(-b * n_low // n) - offset + 1))


def _near_band(logit: np.ndarray, rect: tuple[int, int, int, int], margin: int) -> np.ndarray:
    """Over ``rect`` of ``logit``: the pixels within ``margin`` of an uncertain one (the
    pixels :func:`_band` looks for), as bool."""
    y0, y1, x0, x1 = rect
    active = _active(logit[y0:y1, x0:x1]).astype(np.uint8)
    size = 2 * margin + 1
    return cv2.dilate(active, np.ones((size, size), np.uint8)) > 0


def _planes(image: np.ndarray) -> np.ndarray:
    """``H x W x 3`` uint8 -> ``3 x H x W`` float32 in [0, 1]."""
    planes = np.ascontiguousarray(np.moveaxis(image, -1, 0), dtype=np.float32)
    planes *= np.float32(1.0 / 255.0)
    return planes


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return (1.0 / (1.0 + np.exp(-np.clip(x, -30.0, 30.0)))).astype(np.float32)


def _clicks(
    points: np.ndarray | None, labels: np.ndarray | None, lead: tuple[int, ...]
) -> list[list[tuple[float, float, bool]]]:
    """``(x, y, positive)`` of the 0/1-labelled clicks, per item of the logits' first axis
    when the points are batched (one list for all masks otherwise)."""
    if points is None and labels is None:
        return [[]]
    if points is None or labels is None:
        raise ValueError("points and labels must be given together")
    pts, lab = np.asarray(points, dtype=np.float64), np.asarray(labels)
    if pts.shape[-1:] != (2,) or pts.shape[:-1] != lab.shape or pts.ndim not in (2, 3):
        raise ValueError(
            f"points must be N x 2 or B x N x 2 with labels N or B x N, got "
            f"{pts.shape} and {lab.shape}"
        )
    if pts.ndim == 3 and (not lead or lead[0] != pts.shape[0]):
        raise ValueError(f"{pts.shape[0]} point sets for logits of leading shape {lead}")
    pts, lab = (pts[None], lab[None]) if pts.ndim == 2 else (pts, lab)
    return [
        [(float(x), float(y), bool(v == 1)) for (x, y), v in zip(p, lb, strict=True) if v in (0, 1)]
        for p, lb in zip(pts, lab, strict=True)
    ]


def _keep_click(
    out: np.ndarray,
    given: np.ndarray,
    x: float,
    y: float,
    positive: bool,
    r: int,
    threshold: float | None = None,
) -> None:
    """Within radius ``r`` of the click ``(x, y)``, ``out`` (logits, or masks with
    ``threshold``) agrees with the click at least as much as ``given`` does."""
    h, w = out.shape
    cx, cy = min(max(int(x), 0), w - 1), min(max(int(y), 0), h - 1)
    y0, y1, x0, x1 = max(0, cy - r), min(h, cy + r + 1), max(0, cx - r), min(w, cx + r + 1)
    yy, xx = np.ogrid[y0:y1, x0:x1]
    disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    region, before = out[y0:y1, x0:x1], given[y0:y1, x0:x1]
    if threshold is not None:
        before = before > threshold
        kept = (region | before) if positive else (region & before)
    else:
        kept = np.maximum(region, before) if positive else np.minimum(region, before)
    region[disc] = kept[disc]


def _active(logit: np.ndarray) -> np.ndarray:
    """The pixels whose probability is not flat or whose side of 0 differs from a
    neighbour's (bool)."""
    limit = float(np.log((1.0 - _P_LOW) / _P_LOW))
    active = np.abs(logit) < limit
    inside = logit > 0
    active[:, 1:] |= inside[:, 1:] != inside[:, :-1]
    active[1:, :] |= inside[1:, :] != inside[:-1, :]
    return active


def _band(logit: np.ndarray, margin: int) -> tuple[int, int, int, int] | None:
    """``(y0, y1, x0, x1)``: the box of the :func:`_active` pixels grown by ``margin``; None
    when there are none."""
    active = _active(logit)
    rows = np.flatnonzero(active.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(active.any(axis=0))
    h, w = logit.shape
    return (
        max(0, int(rows[0]) - margin),
        min(h, int(rows[-1]) + 1 + margin),
        max(0, int(cols[0]) - margin),
        min(w, int(cols[-1]) + 1 + margin),
    )


def _box(x: np.ndarray, r: int) -> np.ndarray:
    """Mean over the ``(2r + 1)^2`` window (edges reflected), per channel."""
    return cv2.boxFilter(x, -1, (2 * r + 1, 2 * r + 1), borderType=cv2.BORDER_REFLECT)


class _GuideTerms(NamedTuple):
    """The guide's side of the filter over a region, as contiguous planes (numpy is far
    faster on them than on interleaved channels): the RGB values, their window means, and
    the inverse of each window's covariance (+ eps I), its upper triangle in ``_PAIRS``
    order."""

    guide: np.ndarray  # 3 x H x W float32 in [0, 1]
    mean: np.ndarray  # 3 x H x W
    inv_cov: np.ndarray  # 6 x H x W

    def crop(self, y0: int, y1: int, x0: int, x1: int) -> _GuideTerms:
        return _GuideTerms(*(t[:, y0:y1, x0:x1] for t in self))


def _guide_terms(image: np.ndarray, r: int, eps: float) -> _GuideTerms:
    guide = _planes(image)
    mean = np.stack([_box(g, r) for g in guide])
    a, b, c, d, e, f = (
        _box(guide[i] * guide[j], r) - mean[i] * mean[j] + (np.float32(eps) if i == j else 0)
        for i, j in _PAIRS
    )
    inv = np.stack(
        [d * f - e * e, c * e - b * f, b * e - c * d, a * f - c * c, b * c - a * e, a * d - b * b]
    )
    inv /= a * inv[0] + b * inv[1] + c * inv[2]  # the determinant
    return _GuideTerms(guide, mean, inv)


def _coefficients(terms: _GuideTerms, p: np.ndarray, r: int) -> np.ndarray:
    """``4 x H x W``: each pixel's mean over its windows of the fitted ``a`` (3) and ``b``
    of ``p ~ a . I + b``; the filtered ``p`` is ``a . I + b`` with the pixel's own ``I``."""
    guide, mean, inv = terms
    mean_p = _box(p, r)
    v0, v1, v2 = (_box(guide[k] * p, r) - mean[k] * mean_p for k in range(3))
    i00, i01, i02, i11, i12, i22 = inv
    a0 = i00 * v0 + i01 * v1 + i02 * v2
    a1 = i01 * v0 + i11 * v1 + i12 * v2
    a2 = i02 * v0 + i12 * v1 + i22 * v2
    b = mean_p - a0 * mean[0] - a1 * mean[1] - a2 * mean[2]
    return np.stack([_box(a0, r), _box(a1, r), _box(a2, r), _box(b, r)])
