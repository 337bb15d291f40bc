"""Mask formats: COCO RLE, COCO polygons, PNG files, label maps, overlays and COCO JSON.

Conventions
    A mask is an ``H x W`` array; ``bool`` or an integer type where non-zero means "inside".
    Float masks (logits, probabilities) are refused: threshold them first (``mask > 0``).
    Coordinates are ``(x, y)`` pixels; boxes are ``x0, y0, x1, y1`` (``xyxy``) when drawn and
    ``x, y, w, h`` (``xywh``) in COCO data.

RLE
    *Compressed* RLE is pycocotools' format ``{"size": [H, W], "counts": str}``; ``counts`` is
    kept as a ``str`` so the dict is JSON-serialisable. *Uncompressed* RLE is
    ``{"size": [H, W], "counts": [int, ...]}``: run lengths over the mask flattened in
    column-major (Fortran) order, starting with a run of zeros (possibly of length 0). It is
    the format of ``segment_anything.utils.amg.mask_to_rle_pytorch``.

Polygons
    COCO polygons are flat lists ``[x0, y0, x1, y1, ...]``. pycocotools rasterises each polygon
    with crossing parity and takes the *union* of an object's polygons, so a hole cannot be a
    separate polygon. :func:`mask_to_polygons` therefore returns one polygon per connected
    part (8-connectivity), traced along pixel *edges* (integer corner coordinates, so pixel
    ``(x, y)`` is the square ``[x, x+1] x [y, y+1]``), with each hole joined into its outer
    ring by a zero-width bridge traversed twice. With ``tolerance=0`` the polygons rasterise
    back to exactly the input mask, one-pixel parts and one-pixel-wide lines included.

Files
    All writers go through :func:`atomic_write`: the data is written to a temporary file in
    the destination directory and moved into place with ``os.replace``, so readers never see
    a partial file and a failed write leaves the previous file (or no file) behind.
"""

from __future__ import annotations

import colorsys
import contextlib
import datetime
import json
import logging
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from typing import IO, Any, Literal

import cv2
import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from .images import validate_image_array

logger = logging.getLogger(__name__)

__all__ = [
    "atomic_write",
    "coco_json",
    "decode_rle",
    "encode_rle",
    "encode_rle_batch",
    "label_map",
    "mask_to_polygons",
    "mask_to_uncompressed_rle",
    "overlay",
    "palette",
    "polygons_to_mask",
    "rle_area",
    "rle_to_bbox",
    "save_coco_json",
    "save_label_map_png",
    "save_mask_png",
    "save_overlay_png",
]

PathLike = str | os.PathLike


# ----------------------------------------------------------------------------- input checks


def _as_mask(mask: Any, name: str = "mask") -> np.ndarray:
    """Any ``H x W`` bool/integer array -> ``H x W`` bool (non-zero = inside)."""
    arr = np.asarray(mask)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D H x W array, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty (shape {arr.shape}); expected H x W with H, W > 0")
    return _to_bool(arr, name)


def _as_masks(masks: Any, name: str = "masks") -> np.ndarray:
    """A sequence of ``H x W`` masks or an ``N x H x W`` array -> ``N x H x W`` bool."""
    if isinstance(masks, np.ndarray):
        arr = masks
    else:
        items = list(masks)
        if not items:
            raise ValueError(
                f"{name} is an empty list, so the mask size is unknown; pass an "
                "np.zeros((0, H, W), bool) array instead"
            )
        arr = np.stack([np.asarray(m) for m in items])
    if arr.ndim != 3:
        raise ValueError(f"{name} must be N x H x W (or a list of H x W), got shape {arr.shape}")
    if arr.shape[1] == 0 or arr.shape[2] == 0:
        raise ValueError(f"{name} has empty masks (shape {arr.shape}); expected H, W > 0")
    return _to_bool(arr, name)


def _to_bool(arr: np.ndarray, name: str) -> np.ndarray:
    if arr.dtype == np.bool_:
        return arr
    if np.issubdtype(arr.dtype, np.integer):
        return arr != 0
    raise ValueError(
        f"{name} must be bool or integer (non-zero = inside), got dtype {arr.dtype}; "
        "threshold float masks first, e.g. mask > 0 for logits"
    )


def _rle_size(rle: Any) -> tuple[int, int]:
    if not isinstance(rle, Mapping) or "size" not in rle or "counts" not in rle:
        raise ValueError(
            "an RLE must be a dict with 'size' [H, W] and 'counts' (str, bytes or list of int), "
            f"got {type(rle).__name__}"
            + (f" with keys {sorted(rle)}" if isinstance(rle, Mapping) else "")
        )
    size = rle["size"]
    try:
        h, w = (int(v) for v in size)
    except (TypeError, ValueError):
        raise ValueError(f"RLE 'size' must be [H, W], got {size!r}") from None
    if h < 0 or w < 0 or h * w >= 2**32:
        raise ValueError(f"RLE 'size' must be [H, W] with 0 <= H * W < 2**32, got {size!r}")
    return h, w


def _parse_compressed_counts(counts: bytes) -> np.ndarray:
    """pycocotools' compressed counts string -> run lengths (int64), validated.

    Each count is written in 5-bit groups, least significant first, as characters
    ``48 + group`` with bit 0x20 meaning "more groups follow" and bit 0x10 of the last group
    being the sign; from the fourth count on, the value is stored as a difference to the count
    two places earlier.
    """
    codes = np.frombuffer(counts, dtype=np.uint8).astype(np.int64) - 48
    if codes.size == 0:
        return np.zeros(0, dtype=np.int64)
    if codes.min() < 0 or codes.max() > 63:
        raise ValueError("compressed RLE counts contain characters outside '0'..'o'")
    more = (codes & 0x20) != 0
    if more[-1]:
        raise ValueError("compressed RLE counts end in the middle of a number")
    ends = np.flatnonzero(~more)
    starts = np.concatenate([[0], ends[:-1] + 1])
    lengths = ends - starts + 1
    if lengths.max() > 7:
        raise ValueError("compressed RLE counts contain a number that is too large")
    k = np.arange(codes.size) - np.repeat(starts, lengths)  # group index within its number
    groups = (codes & 0x1F) << (5 * k)
    values = np.add.reduceat(groups, starts)
    negative = (codes[ends] & 0x10) != 0
    values[negative] -= np.int64(1) << (5 * lengths[negative])
    cnts = values.copy()
    cnts[2::2] = np.cumsum(values[2::2])
    if values.size > 3:
        cnts[3::2] = np.cumsum(values[3::2]) + values[1]
    return cnts


def _rle_runs(rle: Any) -> tuple[int, int, np.ndarray, bytes | None]:
    """Validated RLE -> ``(H, W, run lengths, compressed counts or None)``.

    The run lengths must be non-negative and add up to ``H * W`` (pycocotools itself does
    not check this and would write past its buffer when decoding such an RLE).
    """
    h, w = _rle_size(rle)
    counts = rle["counts"]
    if isinstance(counts, str):
        try:
            counts = counts.encode("ascii")
        except UnicodeEncodeError:
            raise ValueError("compressed RLE counts must be ASCII") from None
    if isinstance(counts, (bytes, bytearray)):
        runs = _parse_compressed_counts(bytes(counts))
        compressed: bytes | None = bytes(counts)
    elif isinstance(counts, (list, tuple, np.ndarray)):
        runs = np.asarray(counts)
        if runs.ndim != 1 or (runs.size and not np.issubdtype(runs.dtype, np.integer)):
            raise ValueError("uncompressed RLE 'counts' must be a flat list of non-negative ints")
        runs = runs.astype(np.int64)
        compressed = None
    else:
        raise ValueError(
            f"RLE 'counts' must be a str, bytes or a list of ints, got {type(counts).__name__}"
        )
    if runs.size and runs.min() < 0:
        raise ValueError("RLE counts must be non-negative")
    if int(runs.sum()) != h * w:
        raise ValueError(
            f"RLE counts add up to {int(runs.sum())} pixels but 'size' {[h, w]} has {h * w}"
        )
    return h, w, runs, compressed


def _coco_rle(rle: Any) -> dict[str, Any]:
    """Validated RLE (compressed or uncompressed) -> pycocotools' dict with bytes counts."""
    h, w, runs, compressed = _rle_runs(rle)
    if compressed is None:
        coco = mask_utils.frPyObjects({"size": [h, w], "counts": runs.tolist()}, h, w)
        compressed = coco["counts"]
    return {"size": [h, w], "counts": compressed}


def _runs_to_mask(h: int, w: int, runs: np.ndarray) -> np.ndarray:
    """Column-major run lengths (zeros first) -> ``H x W`` bool, C-contiguous."""
    values = (np.arange(len(runs)) % 2).astype(bool)
    flat = np.repeat(values, runs)  # H * W values, column by column
    return np.ascontiguousarray(flat.reshape(w, h).T)


# ----------------------------------------------------------------------------------- RLE


def encode_rle(mask: np.ndarray) -> dict[str, Any]:
    """``H x W`` bool/integer mask -> compressed COCO RLE ``{"size": [H, W], "counts": str}``."""
    return encode_rle_batch(_as_mask(mask)[None])[0]


def encode_rle_batch(masks: np.ndarray | Sequence[np.ndarray]) -> list[dict[str, Any]]:
    """``N x H x W`` masks -> ``N`` compressed RLEs, encoded in one pycocotools call."""
    arr = _as_masks(masks)
    n, h, w = arr.shape
    if n == 0:
        return []
    # pycocotools wants H x W x N uint8 in Fortran order.
    stacked = np.asfortranarray(np.transpose(arr, (1, 2, 0)), dtype=np.uint8)
    encoded = mask_utils.encode(stacked)
    return [{"size": [h, w], "counts": r["counts"].decode("ascii")} for r in encoded]


def decode_rle(rle: Mapping[str, Any]) -> np.ndarray:
    """Compressed (counts ``str``/``bytes``) or uncompressed (counts list) RLE -> ``H x W`` bool.

    Raises:
        ValueError: malformed RLE, including counts that do not add up to ``H * W``.
    """
    h, w, runs, _ = _rle_runs(rle)
    return _runs_to_mask(h, w, runs)


def mask_to_uncompressed_rle(mask: np.ndarray) -> dict[str, Any]:
    """``H x W`` mask -> ``{"size": [H, W], "counts": [int, ...]}``, column-major.

    The first count is the number of leading zeros (0 when the first pixel is set), as in
    ``segment_anything.utils.amg.mask_to_rle_pytorch``.
    """
    m = _as_mask(mask)
    h, w = m.shape
    flat = m.ravel(order="F")
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], change, [h * w]])
    counts = np.diff(bounds).tolist()
    if flat[0]:
        counts.insert(0, 0)
    return {"size": [h, w], "counts": counts}


def rle_area(rle: Mapping[str, Any]) -> int:
    """Number of set pixels of a compressed or uncompressed RLE."""
    return int(mask_utils.area(_coco_rle(rle)))


def rle_to_bbox(rle: Mapping[str, Any]) -> list[float]:
    """Tight box ``[x, y, w, h]`` of a compressed or uncompressed RLE (zeros when empty)."""
    return [float(v) for v in mask_utils.toBbox(_coco_rle(rle))]


# ------------------------------------------------------------------------------ polygons


def _prev(ring: np.ndarray) -> np.ndarray:
    return np.concatenate([ring[-1:], ring[:-1]])


def _next(ring: np.ndarray) -> np.ndarray:
    return np.concatenate([ring[1:], ring[:1]])


def _signed_area(ring: np.ndarray) -> float:
    """Shoelace area of an ``N x 2`` ring (positive when clockwise on screen, y down)."""
    x, y = ring[:, 0].astype(np.float64), ring[:, 1].astype(np.float64)
    nx, ny = _next(x), _next(y)
    return 0.5 * float(np.dot(x, ny) - np.dot(y, nx))


def _clean_ring(ring: np.ndarray) -> np.ndarray:
    """Drops repeated consecutive vertices and middle vertices of straight runs."""
    ring = ring[np.any(ring != _prev(ring), axis=1)]
    if len(ring) < 3:
        return ring
    d1, d2 = ring - _prev(ring), _next(ring) - ring
    cross = d1[:, 0] * d2[:, 1] - d1[:, 1] * d2[:, 0]
    dot = (d1 * d2).sum(axis=1)
    return ring[(cross != 0) | (dot <= 0)]


def _nearest_vertices(ring: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """For each ``Q x 2`` integer query point, the index of the nearest vertex of ``ring``.

    One ``cv2.distanceTransformWithLabels`` over the bounding box labels every pixel with
    its nearest vertex (5 x 5 mask: exact up to rare near-ties), so the cost is linear in
    the box area however many holes there are.
    """
    lo = np.minimum(ring.min(axis=0), queries.min(axis=0))
    hi = np.maximum(ring.max(axis=0), queries.max(axis=0))
    w, h = (hi - lo + 1).tolist()
    rx, ry = (ring - lo).T
    seeds = np.ones((h, w), dtype=np.uint8)
    seeds[ry, rx] = 0
    _, labels = cv2.distanceTransformWithLabels(
        seeds, cv2.DIST_L2, cv2.DIST_MASK_5, labelType=cv2.DIST_LABEL_PIXEL
    )
    vertex_of_label = np.zeros(int(labels.max()) + 1, dtype=np.int64)
    vertex_of_label[labels[ry, rx]] = np.arange(len(ring))
    qx, qy = (queries - lo).T
    return vertex_of_label[labels[qy, qx]]


def _bridge_holes(outer: np.ndarray, holes: list[np.ndarray]) -> np.ndarray:
    """Joins each hole into ``outer`` by a bridge walked there and back -> one ring."""
    attach = _nearest_vertices(outer, np.stack([hole[0] for hole in holes])).tolist()
    pieces = []
    start = 0
    for h_idx in sorted(range(len(holes)), key=lambda k: attach[k]):
        i, hole = attach[h_idx], holes[h_idx]
        j = int(((hole - outer[i]) ** 2).sum(axis=1).argmin())
        # outer[..i], hole[j..], hole[..j] (back at hole[j]), then outer[i..] again.
        pieces += [outer[start : i + 1], hole[j:], hole[: j + 1]]
        start = i
    pieces.append(outer[start:])
    return np.concatenate(pieces)


def _simplify(ring: np.ndarray, tolerance: float) -> np.ndarray:
    if tolerance <= 0:
        return ring
    approx = cv2.approxPolyDP(ring.reshape(-1, 1, 2).astype(np.int32), tolerance, True)
    approx = approx.reshape(-1, 2).astype(np.int64)
    # A ring that would collapse is kept as is so that no part or hole disappears.
    return approx if len(approx) >= 3 else ring


def mask_to_polygons(mask: np.ndarray, *, tolerance: float = 0.0) -> list[list[float]]:
    """``H x W`` mask -> COCO polygons ``[[x0, y0, x1, y1, ...], ...]``, one per part.

    Each 8-connected part gives one polygon along its pixel edges; its holes are joined into
    it with zero-width bridges (see the module docstring), and objects inside holes are
    separate parts. Outer rings and holes have opposite orientations, so even-odd and
    non-zero fill rules both reproduce the mask. With ``tolerance == 0`` the polygons
    rasterise (:func:`polygons_to_mask`, pycocotools) back to exactly ``mask``; with
    ``tolerance > 0`` each ring is simplified with ``cv2.approxPolyDP`` (maximum distance
    ``tolerance`` pixels), except rings that would collapse below three vertices, which are
    kept unsimplified. An empty mask gives ``[]``.
    """
    m = _as_mask(mask)
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    # Trace the mask scaled 2x (padded so parts touching the border are closed): contour
    # points are then centres of half-pixels, and (u + 1) // 2 maps each one to the pixel
    # corner it touches, giving the exact edge ("crack") boundary in original coordinates.
    padded = np.pad(m.view(np.uint8), 1)
    up = np.repeat(np.repeat(padded, 2, axis=0), 2, axis=1)
    contours, hierarchy = cv2.findContours(up, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if hierarchy is None:
        return []
    rings = [_clean_ring((c.reshape(-1, 2).astype(np.int64) + 1) // 2 - 1) for c in contours]
    rings = [_simplify(r, tolerance) if len(r) >= 3 else r for r in rings]
    polygons = []
    for idx, (_, _, child, parent) in enumerate(hierarchy[0]):
        if parent != -1:
            continue  # a hole; handled with its outer ring
        outer = rings[idx]
        if len(outer) < 3:
            logger.debug("dropping a degenerate part with %d vertices", len(outer))
            continue
        if _signed_area(outer) < 0:
            outer = outer[::-1]
        holes = []
        while child != -1:
            hole = rings[child]
            if len(hole) >= 3:
                holes.append(hole if _signed_area(hole) < 0 else hole[::-1])
            child = hierarchy[0][child][0]
        ring = _bridge_holes(outer, holes) if holes else outer
        polygons.append(ring.astype(np.float64).ravel().tolist())
    return polygons


def polygons_to_mask(polygons: Sequence[Sequence[float]], height: int, width: int) -> np.ndarray:
    """COCO polygons (flat ``[x0, y0, x1, y1, ...]`` lists) -> ``height x width`` bool mask.

    Rasterised by pycocotools (union of the polygons, crossing parity within each).
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"height and width must be positive, got {height} x {width}")
    polys = [[float(v) for v in p] for p in polygons]
    for k, p in enumerate(polys):
        if len(p) < 6 or len(p) % 2:
            raise ValueError(
                f"polygon {k} has {len(p)} coordinates; expected an even number >= 6 "
                "(at least three x, y vertices)"
            )
    if not polys:
        return np.zeros((height, width), dtype=bool)
    merged = mask_utils.merge(mask_utils.frPyObjects(polys, int(height), int(width)))
    return decode_rle(merged)


# --------------------------------------------------------------------------------- files


def _new_file_mode() -> int:
    """Permission bits a plain ``open(path, "w")`` would give a new file (0o666 & ~umask)."""
    try:  # reading the umask through /proc avoids os.umask(), which changes process state
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o644


@contextlib.contextmanager
def atomic_write(
    path: PathLike, mode: Literal["wb", "w"] = "wb", *, encoding: str = "utf-8"
) -> Iterator[IO[Any]]:
    """Context manager: a file object whose content replaces ``path`` only on success.

    Writes go to a temporary file in the same directory, which is flushed, fsynced and then
    moved onto ``path`` with ``os.replace`` (atomic on POSIX and Windows). If the ``with``
    block raises, the temporary file is removed and ``path`` is untouched. An existing file
    keeps its permission bits; a new one gets the usual ``0o666 & ~umask``.

    Args:
        path: destination file; its directory must exist.
        mode: ``"wb"`` (binary) or ``"w"`` (text, with ``encoding``).
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"mode must be 'wb' or 'w', got {mode!r}")
    target = os.path.abspath(os.fspath(path))
    directory, base = os.path.split(target)
    fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=".tmp", dir=directory)
    try:
        f: IO[Any] = os.fdopen(fd, "wb") if mode == "wb" else os.fdopen(fd, "w", encoding=encoding)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    try:
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        try:
            perms = os.stat(target).st_mode & 0o7777
        except FileNotFoundError:
            perms = _new_file_mode()
        os.chmod(tmp, perms)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def save_mask_png(path: PathLike, mask: np.ndarray) -> None:
    """Writes an ``H x W`` mask as a single-channel 8-bit PNG (0 outside, 255 inside)."""
    img = Image.fromarray(_as_mask(mask).astype(np.uint8) * 255)  # mode L
    with atomic_write(path) as f:
        img.save(f, format="PNG")


# ------------------------------------------------------------------------------ label maps


def label_map(
    masks: np.ndarray | Sequence[np.ndarray], scores: Sequence[float] | np.ndarray | None = None
) -> np.ndarray:
    """``N x H x W`` masks -> ``H x W`` label image: 0 background, ``k`` = ``masks[k - 1]``.

    Where masks overlap, one label wins:
        * with ``scores``: the mask with the higher score;
        * without: the mask with the smaller area, so small objects stay visible on top of
          the large regions that contain them.
    Remaining ties go to the earlier mask.

    Returns:
        ``uint8`` when ``N < 256``, else ``uint16`` (``N`` up to 65535).
    """
    arr = _as_masks(masks)
    n = arr.shape[0]
    if n > 65535:
        raise ValueError(f"at most 65535 masks fit a uint16 label map, got {n}")
    dtype = np.uint8 if n < 256 else np.uint16
    out = np.zeros(arr.shape[1:], dtype=dtype)
    if scores is not None:
        s = np.asarray(scores, dtype=np.float64).reshape(-1)
        if s.shape[0] != n:
            raise ValueError(f"got {s.shape[0]} scores for {n} masks")
        if np.isnan(s).any():
            raise ValueError("scores contain NaN")
        priority = s
    else:
        priority = -arr.reshape(n, arr.shape[1] * arr.shape[2]).sum(axis=1).astype(np.float64)
    # Paint lowest priority first so the winner is painted last; among equals, the earlier
    # mask is painted last.
    order = np.lexsort((-np.arange(n), priority))
    for k in order:
        out[arr[k]] = k + 1
    return out


def save_label_map_png(path: PathLike, labels: np.ndarray) -> None:
    """Writes a label image as PNG: 8-bit gray if all labels < 256, else 16-bit gray."""
    arr = np.asarray(labels)
    if arr.ndim != 2 or arr.size == 0:
        raise ValueError(f"labels must be a non-empty H x W array, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"labels must have an integer dtype, got {arr.dtype}")
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi > 65535:
        raise ValueError(f"labels must be within 0..65535 for PNG, got {lo}..{hi}")
    if hi < 256:
        img = Image.fromarray(arr.astype(np.uint8))  # mode L
    else:
        img = Image.fromarray(np.ascontiguousarray(arr, dtype=np.uint16))  # mode I;16
    with atomic_write(path) as f:
        img.save(f, format="PNG")


# ------------------------------------------------------------------------------- overlays


def palette(n: int) -> np.ndarray:
    """``n x 3`` uint8 RGB colours, deterministic and well separated (golden-ratio hues)."""
    colors = np.empty((n, 3), dtype=np.uint8)
    for k in range(n):
        hue = (0.13 + k * 0.618033988749895) % 1.0
        sat = 0.85 if k % 2 == 0 else 0.65
        val = 0.95 if (k // 2) % 2 == 0 else 0.8
        colors[k] = np.round(np.array(colorsys.hsv_to_rgb(hue, sat, val)) * 255)
    return colors


def overlay(
    image: np.ndarray,
    masks: np.ndarray | Sequence[np.ndarray],
    *,
    colors: Sequence[Sequence[int]] | np.ndarray | None = None,
    alpha: float = 0.5,
    draw_contours: bool = True,
    points: np.ndarray | Sequence[Sequence[float]] | None = None,
    point_labels: np.ndarray | Sequence[int] | None = None,
    boxes: np.ndarray | Sequence[Sequence[float]] | None = None,
) -> np.ndarray:
    """Draws masks and prompts on a copy of an image, for people to look at.

    Args:
        image: ``H x W x 3`` uint8 RGB (gray and RGBA are accepted as by
            :func:`segany.images.validate_image_array`).
        masks: ``N x H x W`` (or a list of ``H x W``) masks; may be empty.
        colors: ``N x 3`` RGB colours (cycled if shorter); default :func:`palette`.
        alpha: fill opacity in ``[0, 1]``.
        draw_contours: draw each mask's outline (inner and outer) in its colour.
        points: ``K x 2`` ``(x, y)`` prompt points.
        point_labels: ``K`` labels, 1 positive (green disc) and 0 negative (red disc);
            default all positive. Labels of -1 (padding) are not drawn.
        boxes: ``B x 4`` ``xyxy`` prompt boxes, drawn in blue.

    Returns:
        ``H x W x 3`` uint8 RGB. Masks are painted largest first, so small masks stay visible
        on top of large ones.
    """
    out = validate_image_array(image).copy()
    h, w = out.shape[:2]
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be within [0, 1], got {alpha}")
    arr = np.zeros((0, h, w), dtype=bool)
    if not (isinstance(masks, (list, tuple)) and len(masks) == 0):
        arr = _as_masks(masks)
    if arr.shape[1:] != (h, w):
        raise ValueError(f"masks are {arr.shape[1:]} but the image is {(h, w)}")
    n = arr.shape[0]
    if colors is None:
        cols = palette(n)
    else:
        cols = np.asarray(colors, dtype=np.int64).reshape(-1, 3)
        if cols.shape[0] == 0 and n:
            raise ValueError("colors is empty")
        if cols.size and (cols.min() < 0 or cols.max() > 255):
            raise ValueError("colors must be RGB values within 0..255")
        cols = cols.astype(np.uint8)
    thickness = max(1, round(min(h, w) / 400))
    areas = arr.reshape(n, h * w).sum(axis=1)
    for k in np.argsort(-areas, kind="stable"):
        m = arr[k]
        color = cols[k % len(cols)]
        blended = out[m].astype(np.float32) * (1.0 - alpha) + color.astype(np.float32) * alpha
        out[m] = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
        if draw_contours and m.any():
            contours, _ = cv2.findContours(
                np.ascontiguousarray(m, dtype=np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE
            )
            cv2.drawContours(out, contours, -1, tuple(int(c) for c in color), thickness)
    if boxes is not None:
        b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        for x0, y0, x1, y1 in np.rint(b).astype(np.int64):
            cv2.rectangle(out, (int(x0), int(y0)), (int(x1), int(y1)), (30, 144, 255), thickness)
    if points is not None:
        p = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        labels = (
            np.ones(len(p), dtype=np.int64)
            if point_labels is None
            else np.asarray(point_labels).reshape(-1).astype(np.int64)
        )
        if len(labels) != len(p):
            raise ValueError(f"got {len(labels)} point_labels for {len(p)} points")
        radius = max(3, round(min(h, w) / 100))
        for (x, y), lab in zip(np.rint(p).astype(np.int64), labels):
            if lab not in (0, 1):
                continue
            fill = (0, 200, 0) if lab == 1 else (220, 0, 0)
            cv2.circle(out, (int(x), int(y)), radius, fill, -1, lineType=cv2.LINE_AA)
            cv2.circle(out, (int(x), int(y)), radius, (255, 255, 255), 1, lineType=cv2.LINE_AA)
    return out


def save_overlay_png(path: PathLike, image: np.ndarray, masks: Any, **kwargs: Any) -> None:
    """:func:`overlay` written as an RGB PNG (atomically). ``kwargs`` go to :func:`overlay`."""
    img = Image.fromarray(overlay(image, masks, **kwargs))  # mode RGB
    with atomic_write(path) as f:
        img.save(f, format="PNG")


# ------------------------------------------------------------------------------ COCO JSON

_COMPUTED_KEYS = frozenset({"id", "image_id", "segmentation", "area", "bbox", "iscrowd"})


def _jsonable(value: Any) -> Any:
    """numpy scalars/arrays (also nested in lists, tuples, dicts) -> plain Python."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def coco_json(
    images: Sequence[Mapping[str, Any]],
    annotations_per_image: Sequence[Sequence[Mapping[str, Any]]],
    *,
    mode: Literal["rle", "polygon"] = "rle",
    categories: Sequence[Mapping[str, Any]] | None = None,
    polygon_tolerance: float = 0.0,
    info: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Builds a COCO instance-segmentation dataset dict (loadable by ``pycocotools.coco.COCO``).

    Args:
        images: one dict per image with ``file_name`` and optionally ``id`` (default: position
            + 1), ``height``/``width`` (default: the size of its first annotation's mask);
            other keys are kept.
        annotations_per_image: for each image, a list of dicts with ``segmentation`` (an
            ``H x W`` mask or an RLE dict, compressed or uncompressed), optional
            ``category_id`` (default 1) and any extra keys (``predicted_iou``,
            ``stability_score``, ``point_coords``, ...), which are carried through with numpy
            values made JSON-serialisable. Input ``area``, ``bbox``, ``id``, ``image_id`` and
            ``iscrowd`` are recomputed.
        mode: ``"rle"`` writes compressed RLE (counts as str); ``"polygon"`` writes polygons from
            :func:`mask_to_polygons` (empty masks have no polygon and are skipped, with a log
            message).
        categories: COCO categories; default ``[{"id": 1, "name": "object"}]``.
        polygon_tolerance: simplification for ``mode="polygon"`` (0 = exact).
        info: the dataset's ``info`` entry; default names segany and the creation time.

    Returns:
        ``{"info", "licenses", "images", "annotations", "categories"}``. Annotation ids run
        from 1; ``area`` and ``bbox`` (``xywh``) are those of the stored segmentation as
        pycocotools rasterises it. ``iscrowd`` is 0 in both modes: each annotation is one
        object (SA-1B also stores single objects as RLE); ``iscrowd=1`` would make COCO
        evaluation ignore them.
    """
    if mode not in ("rle", "polygon"):
        raise ValueError(f"mode must be 'rle' or 'polygon', got {mode!r}")
    if len(images) != len(annotations_per_image):
        raise ValueError(
            f"got {len(images)} images but {len(annotations_per_image)} annotation lists"
        )
    if categories is None:
        cats = [{"id": 1, "name": "object", "supercategory": "object"}]
    else:
        cats = [_jsonable(dict(c)) for c in categories]
        for c in cats:
            if "id" not in c or "name" not in c:
                raise ValueError(f"each category needs 'id' and 'name', got {c}")
    cat_ids: set[Any] = {c["id"] for c in cats}

    out_images: list[dict[str, Any]] = []
    out_anns: list[dict[str, Any]] = []
    seen_ids: set[Any] = set()
    for idx, (img, anns) in enumerate(zip(images, annotations_per_image)):
        entry = _jsonable(dict(img))
        if "file_name" not in entry:
            raise ValueError(f"images[{idx}] has no 'file_name'")
        entry.setdefault("id", idx + 1)
        if entry["id"] in seen_ids:
            raise ValueError(f"duplicate image id {entry['id']!r}")
        seen_ids.add(entry["id"])
        rles = [_annotation_rle(a, idx, k) for k, a in enumerate(anns)]
        if "height" not in entry or "width" not in entry:
            if not rles:
                raise ValueError(
                    f"images[{idx}] needs 'height' and 'width' (it has no annotations to "
                    "take them from)"
                )
            entry.setdefault("height", rles[0]["size"][0])
            entry.setdefault("width", rles[0]["size"][1])
        h, w = int(entry["height"]), int(entry["width"])
        out_images.append(entry)
        for k, (ann, rle) in enumerate(zip(anns, rles)):
            if rle["size"] != [h, w]:
                raise ValueError(
                    f"annotation {k} of images[{idx}] is {rle['size'][0]} x {rle['size'][1]} "
                    f"but the image is {h} x {w}"
                )
            category_id = _jsonable(ann.get("category_id", 1))
            if category_id not in cat_ids:
                raise ValueError(
                    f"annotation {k} of images[{idx}] has category_id {category_id!r}, "
                    f"not one of {sorted(cat_ids, key=str)}"
                )
            if mode == "rle":
                segmentation: Any = {"size": [h, w], "counts": rle["counts"].decode("ascii")}
                stored = rle
            else:
                segmentation = mask_to_polygons(decode_rle(rle), tolerance=polygon_tolerance)
                if not segmentation:
                    logger.info(
                        "skipping empty mask %d of image %r: no polygon", k, entry["file_name"]
                    )
                    continue
                stored = mask_utils.merge(mask_utils.frPyObjects(segmentation, h, w))
            record = {
                "id": len(out_anns) + 1,
                "image_id": entry["id"],
                "category_id": category_id,
                "segmentation": segmentation,
                "area": int(mask_utils.area(stored)),
                "bbox": [float(v) for v in mask_utils.toBbox(stored)],
                "iscrowd": 0,
            }
            for key, value in ann.items():
                if key not in _COMPUTED_KEYS and key != "category_id":
                    record[str(key)] = _jsonable(value)
            out_anns.append(record)

    now = datetime.datetime.now(datetime.timezone.utc)
    return {
        "info": _jsonable(dict(info))
        if info is not None
        else {
            "description": "masks from segany (Segment Anything)",
            "year": now.year,
            "date_created": now.isoformat(timespec="seconds"),
        },
        "licenses": [],
        "images": out_images,
        "annotations": out_anns,
        "categories": cats,
    }


def _annotation_rle(ann: Mapping[str, Any], image_idx: int, k: int) -> dict[str, Any]:
    """The ``segmentation`` of an input annotation as a pycocotools RLE (bytes counts)."""
    if not isinstance(ann, Mapping) or "segmentation" not in ann:
        raise ValueError(f"annotation {k} of images[{image_idx}] needs a 'segmentation'")
    seg = ann["segmentation"]
    if isinstance(seg, Mapping):
        return _coco_rle(seg)
    rle = encode_rle(seg)
    return {"size": rle["size"], "counts": rle["counts"].encode("ascii")}


def save_coco_json(path: PathLike, data: Mapping[str, Any]) -> None:
    """Writes a COCO dict (e.g. from :func:`coco_json`) as JSON, atomically."""
    with atomic_write(path, "w") as f:
        json.dump(_jsonable(dict(data)), f)
