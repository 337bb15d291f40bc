"""Interactive segmentation evaluation: the click protocol of RITM / f-BRS / SimpleClick / FocSAM.

Any object with the :class:`segany.Predictor` (``SamPredictor``) interface can be evaluated::

    predictor.set_image(image)                        # H x W x 3 uint8 RGB
    masks, scores, low_res = predictor.predict(
        point_coords=...,      # N x 2 float, (x, y) pixels
        point_labels=...,      # N, 1 positive / 0 negative
        box=...,               # 4, x0 y0 x1 y1, or None
        mask_input=...,        # 1 x 256 x 256 low-res logits of a previous call, or None
        multimask_output=...,  # C = 3 masks if True, else C = 1
        return_logits=True,    # masks are C x H x W logits (0 = probability 0.5)
    )                          # scores C, low_res C x 256 x 256

Protocol (shared/data/PUBLISHED_NUMBERS.md, "Protocol"), per instance:

1. ``set_image`` once.
2. Click 1 is placed by :func:`next_click` on the empty prediction (the object's "centre").
   It is predicted with ``multimask_output=True`` and the candidate with the highest predicted
   score is kept (SAM's protocol; ``first_click_multimask=False`` asks for one mask instead).
3. Every later click is placed by :func:`next_click` on the current prediction and predicted
   with *all* clicks so far, ``multimask_output=False`` and (``feed_back_logits=True``) the
   previous low-res logits as ``mask_input``.
4. A pixel is object when ``sigmoid(logit) > prob_threshold`` (0.49, RITM's ``--thresh``).
   Predictors that return ``bool`` masks are taken as they are. IoU is computed over the
   non-ignore pixels; an empty prediction of an empty target has IoU 1.
5. ``max_clicks`` (20) clicks are always given, so that mIoU after k clicks is defined for every
   k. If a prediction leaves no unclicked error pixel (a perfect mask), no click can be placed:
   the remaining IoUs repeat the last one.
6. NoC@t is the 1-based index of the first click with IoU >= t, or ``max_clicks`` if none.
   NoF@t counts the instances that never reach t. (RITM's code counts ``NoC == max_clicks``,
   which also counts an instance that reaches t exactly at the last click; here such an
   instance is not a failure, as the protocol text defines it.)

A separate one-box run gives each instance's IoU for the tight box of its mask, predicted
with ``multimask_output=False``: ``x0, y0, x1, y1`` = min column, min row, max column, max row,
all *inclusive* pixel indices. That is SAM's own convention (its automatic generator computes
boxes this way and its prompt encoder adds 0.5 to reach pixel centres).

:class:`GrabCutPredictor` is the classical baseline with the same interface.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

__all__ = [
    "GrabCutPredictor",
    "InteractivePredictor",
    "evaluate_interactive",
    "mask_iou",
    "next_click",
    "noc",
    "plot_miou_curve",
    "save_report",
]

LOW_RES = 256  # side of SAM's low-res logits (the 1024 input / 4)


class InteractivePredictor(Protocol):
    """What :func:`evaluate_interactive` needs: ``SamPredictor``'s ``set_image`` and ``predict``."""

    def set_image(self, image: np.ndarray) -> None: ...

    def predict(
        self,
        point_coords: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
        mask_input: np.ndarray | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...


# --------------------------------------------------------------------------- clicks and IoU
def _as_bool_2d(arr: Any, name: str) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be an H x W array, got shape {arr.shape}")
    return arr.astype(bool, copy=False)


def _padded_distance(region: np.ndarray) -> np.ndarray:
    """Exact L2 distance of each region pixel to the nearest non-region pixel, the image border
    counting as non-region (the region is padded by one background pixel)."""
    padded = np.pad(region.astype(np.uint8), 1)
    return cv2.distanceTransform(padded, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)[1:-1, 1:-1]


def next_click(
    gt: np.ndarray,
    pred: np.ndarray,
    ignore: np.ndarray | None = None,
    clicked: np.ndarray | Iterable[tuple[int, int]] | None = None,
) -> tuple[int, int, bool] | None:
    """The next click of the standard protocol (RITM's clicker).

    FN = gt & ~pred and FP = ~gt & pred, without ignore pixels. Each is padded by one pixel
    (so the image border counts as its boundary) and given its exact L2 distance transform,
    which is zeroed at already-clicked pixels. If max dist(FN) > max dist(FP) the click is
    positive at FN's argmax, else negative at FP's argmax; ties go to the first pixel in
    row-major order.

    Args:
        gt: ``H x W`` ground truth (non-zero = object).
        pred: ``H x W`` current prediction (non-zero = object).
        ignore: ``H x W`` pixels that never get a click, or ``None``.
        clicked: pixels clicked so far, as an ``H x W`` bool array or ``(y, x)`` int pairs.

    Returns:
        ``(y, x, is_positive)`` (row, column), or ``None`` when no unclicked error pixel is left.
    """
    gt = _as_bool_2d(gt, "gt")
    pred = _as_bool_2d(pred, "pred")
    if pred.shape != gt.shape:
        raise ValueError(f"pred has shape {pred.shape} but gt has {gt.shape}; expected the same")
    fn = gt & ~pred
    fp = ~gt & pred
    if ignore is not None:
        ignore = _as_bool_2d(ignore, "ignore")
        if ignore.shape != gt.shape:
            raise ValueError(f"ignore has shape {ignore.shape} but gt has {gt.shape}")
        fn &= ~ignore
        fp &= ~ignore
    fn_dt = _padded_distance(fn)
    fp_dt = _padded_distance(fp)
    if clicked is not None:
        if isinstance(clicked, np.ndarray) and clicked.dtype == bool:
            if clicked.shape != gt.shape:
                raise ValueError(f"clicked has shape {clicked.shape} but gt has {gt.shape}")
            done = clicked
        else:
            done = np.zeros(gt.shape, dtype=bool)
            for y, x in clicked:
                done[int(y), int(x)] = True
        fn_dt[done] = 0.0
        fp_dt[done] = 0.0
    fn_max, fp_max = float(fn_dt.max()), float(fp_dt.max())
    if fn_max == 0.0 and fp_max == 0.0:
        return None
    is_positive = fn_max > fp_max
    dt = fn_dt if is_positive else fp_dt
    y, x = divmod(int(np.argmax(dt)), gt.shape[1])  # argmax: first maximum in row-major order
    return y, x, bool(is_positive)


def mask_iou(pred: np.ndarray, gt: np.ndarray, ignore: np.ndarray | None = None) -> float:
    """IoU of two ``H x W`` masks over the non-ignore pixels; 1.0 when both are empty there."""
    pred, gt = np.asarray(pred, dtype=bool), np.asarray(gt, dtype=bool)
    inter, union = pred & gt, pred | gt
    if ignore is not None:
        valid = ~np.asarray(ignore, dtype=bool)
        inter, union = inter & valid, union & valid
    n_union = int(union.sum())
    return 1.0 if n_union == 0 else int(inter.sum()) / n_union


def noc(ious: Sequence[float], threshold: float, max_clicks: int) -> int:
    """1-based index of the first IoU >= ``threshold``, or ``max_clicks`` if there is none."""
    for k, iou in enumerate(ious[:max_clicks], 1):
        if iou >= threshold:
            return k
    return max_clicks


def _threshold_key(t: float) -> str:
    return f"{t * 100:g}"  # 0.85 -> "85", 0.875 -> "87.5"


def _gt_box(gt: np.ndarray) -> np.ndarray:
    """Tight box ``x0, y0, x1, y1`` with inclusive max column / row (SAM's convention)."""
    ys, xs = np.nonzero(gt)
    return np.array([xs.min(), ys.min(), xs.max(), ys.max()], dtype=np.float32)


# --------------------------------------------------------------------------- instances
def _iter_instances(
    data: Any, limit: int | None
) -> Iterator[tuple[str, np.ndarray, np.ndarray, np.ndarray | None]]:
    """``(name, image, gt, ignore)`` from a dataset with ``load``, MaskSamples or tuples."""
    loader = getattr(data, "load", None)
    for i, item in enumerate(data):
        if limit is not None and i >= limit:
            return
        if callable(loader) and not isinstance(item, (tuple, list)):
            name = str(getattr(item, "name", i))
            image, gt, ignore = loader(item)
        elif isinstance(item, (tuple, list)) and len(item) in (3, 4):
            name, image, gt = str(item[0]), item[1], item[2]
            ignore = item[3] if len(item) == 4 else None
        else:
            from .data import MaskSample, load_sample

            if not isinstance(item, MaskSample):
                raise ValueError(
                    "dataset_or_samples must be a dataset with load(sample), MaskSamples, or "
                    f"(name, image, gt[, ignore]) tuples; item {i} is {type(item).__name__}"
                )
            name = item.name
            image, gt, ignore = load_sample(item)
        yield name, image, gt, ignore


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, possibly on an accelerator
        x = x.detach().float().cpu().numpy()
    return np.asarray(x)


class _Runner:
    """Calls the predictor, checks its outputs and times it."""

    def __init__(self, predictor: InteractivePredictor, logit_threshold: float) -> None:
        self.predictor = predictor
        self.logit_threshold = logit_threshold
        self.seconds = 0.0
        self.calls = 0

    def __call__(
        self, hw: tuple[int, int], **kwargs: Any
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        start = time.perf_counter()
        masks, scores, low_res = self.predictor.predict(return_logits=True, **kwargs)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        masks, scores, low_res = _to_numpy(masks), _to_numpy(scores), _to_numpy(low_res)
        if masks.ndim != 3 or masks.shape[1:] != hw:
            raise ValueError(
                f"predictor returned masks of shape {masks.shape}; expected C x {hw[0]} x {hw[1]}"
            )
        binary = masks if masks.dtype == bool else masks > self.logit_threshold
        return binary, scores.reshape(-1), low_res

    @property
    def seconds_per_prediction(self) -> float:
        return self.seconds / self.calls if self.calls else 0.0


def evaluate_interactive(
    predictor: InteractivePredictor,
    dataset_or_samples: Iterable[Any],
    *,
    max_clicks: int = 20,
    thresholds: Sequence[float] = (0.85, 0.90),
    prob_threshold: float = 0.49,
    first_click_multimask: bool = True,
    feed_back_logits: bool = True,
    box: bool = True,
    limit: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Runs the click protocol (module docstring) on every instance and summarises it.

    Args:
        predictor: has ``set_image(image)`` and ``predict(...)`` as ``SamPredictor``.
        dataset_or_samples: a dataset of :mod:`segany.data` (anything iterable with a
            ``load(sample)`` method), a sequence of :class:`segany.data.MaskSample`, or of
            ``(name, image, gt)`` / ``(name, image, gt, ignore)`` tuples with an ``H x W x 3``
            uint8 image and ``H x W`` masks.
        max_clicks: clicks per instance (20 in the literature).
        thresholds: IoU thresholds of NoC / NoF.
        prob_threshold: a pixel is object when ``sigmoid(logit) > prob_threshold``.
        first_click_multimask: predict click 1 with three candidates and keep the one with the
            highest score (SAM protocol); ``False``: one mask.
        feed_back_logits: pass the previous low-res logits as ``mask_input`` from click 2 on.
        box: also run the one-box prompt (``box_miou``, ``per_instance[i]["box_iou"]``).
        limit: evaluate only the first ``limit`` instances.
        progress: show a tqdm progress bar.

    Returns:
        A JSON-serialisable dict: ``noc`` and ``nof`` (keyed ``"85"``, ``"90"``, ...),
        ``miou_at`` (mean IoU after 1..max_clicks clicks), ``clicks_obeyed_at`` (mean share
        of the clicks so far whose pixel the mask puts on the click's side, after 1..max_clicks
        clicks: how far the model follows corrections), ``box_miou`` (``None`` without
        ``box``), ``n_instances``, ``per_instance`` (``name``, ``ious``, ``noc``, ``clicks`` as
        ``[y, x, positive]``, ``box_iou``, ``clicks_obeyed``), ``seconds_per_prediction``,
        ``seconds_per_image`` (``set_image``), ``predictor`` (class name) and ``settings``.

    Raises:
        ValueError: bad arguments, an instance with an empty ground truth, or a predictor whose
            outputs do not have the documented shapes.
    """
    if isinstance(max_clicks, bool) or not isinstance(max_clicks, int) or max_clicks < 1:
        raise ValueError(f"max_clicks must be a positive int, got {max_clicks!r}")
    thresholds = tuple(float(t) for t in thresholds)
    if not thresholds or not all(0.0 < t <= 1.0 for t in thresholds):
        raise ValueError(f"thresholds must be IoUs in (0, 1], got {thresholds}")
    if not 0.0 < prob_threshold < 1.0:
        raise ValueError(f"prob_threshold must be in (0, 1), got {prob_threshold}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit must be a non-negative int or None, got {limit!r}")

    run = _Runner(predictor, math.log(prob_threshold / (1.0 - prob_threshold)))
    total = None
    if hasattr(dataset_or_samples, "__len__"):
        n = len(dataset_or_samples)  # type: ignore[arg-type]
        total = n if limit is None else min(n, limit)
    per_instance: list[dict[str, Any]] = []
    image_seconds = 0.0
    bar = tqdm(
        _iter_instances(dataset_or_samples, limit),
        total=total,
        disable=not progress,
        desc="evaluate",
        unit="inst",
    )
    for name, image, gt, ignore in bar:
        gt = _as_bool_2d(gt, f"gt of {name}")
        image = np.asarray(image)
        hw = gt.shape
        if image.shape[:2] != hw:
            raise ValueError(f"{name}: image is {image.shape[:2]} but gt is {hw}")
        if ignore is not None:
            ignore = _as_bool_2d(ignore, f"ignore of {name}")
            if ignore.shape != hw:
                raise ValueError(f"{name}: ignore is {ignore.shape} but gt is {hw}")
        target = gt if ignore is None else gt & ~ignore
        if not target.any():
            raise ValueError(f"{name}: ground truth is empty (outside ignore pixels)")

        start = time.perf_counter()
        predictor.set_image(image)
        image_seconds += time.perf_counter() - start

        record: dict[str, Any] = {"name": name}
        if box:
            masks, _, _ = run(hw, box=_gt_box(target), multimask_output=False)
            record["box_iou"] = mask_iou(masks[0], gt, ignore)

        ious: list[float] = []
        obeyed: list[float] = []
        clicks: list[list[int]] = []
        clicked = np.zeros(hw, dtype=bool)
        pred = np.zeros(hw, dtype=bool)
        prev_low: np.ndarray | None = None
        for k in range(max_clicks):
            click = next_click(gt, pred, ignore, clicked)
            if click is None:  # perfect prediction: nothing left to click
                ious.extend([ious[-1]] * (max_clicks - k))
                obeyed.extend([obeyed[-1]] * (max_clicks - k))
                break
            y, x, positive = click
            clicked[y, x] = True
            clicks.append([y, x, int(positive)])
            coords = np.array([[c[1], c[0]] for c in clicks], dtype=np.float32)
            labels = np.array([c[2] for c in clicks], dtype=np.int64)
            multimask = k == 0 and first_click_multimask
            mask_input = prev_low[None] if feed_back_logits and prev_low is not None else None
            masks, scores, low_res = run(
                hw,
                point_coords=coords,
                point_labels=labels,
                mask_input=mask_input,
                multimask_output=multimask,
            )
            best = int(np.argmax(scores)) if multimask and len(scores) == len(masks) else 0
            pred = masks[best]
            prev_low = low_res.reshape(-1, *low_res.shape[-2:])[best]
            ious.append(mask_iou(pred, gt, ignore))
            obeyed.append(float(np.mean([pred[cy, cx] == bool(cp) for cy, cx, cp in clicks])))
        record["ious"] = ious
        record["clicks_obeyed"] = obeyed
        record["noc"] = {_threshold_key(t): noc(ious, t, max_clicks) for t in thresholds}
        record["clicks"] = clicks
        per_instance.append(record)
        bar.set_postfix(iou1=f"{ious[0]:.3f}", last=f"{ious[-1]:.3f}")
    bar.close()

    n = len(per_instance)
    if n == 0:
        raise ValueError("no instances to evaluate (empty dataset or limit=0)")
    report: dict[str, Any] = {
        "predictor": type(predictor).__name__,
        "predictor_settings": getattr(predictor, "settings", None),
        "n_instances": n,
        "noc": {
            _threshold_key(t): float(np.mean([r["noc"][_threshold_key(t)] for r in per_instance]))
            for t in thresholds
        },
        "nof": {
            _threshold_key(t): int(sum(max(r["ious"]) < t for r in per_instance))
            for t in thresholds
        },
        "miou_at": [float(v) for v in np.mean([r["ious"] for r in per_instance], axis=0)],
        "clicks_obeyed_at": [
            float(v) for v in np.mean([r["clicks_obeyed"] for r in per_instance], axis=0)
        ],
        "box_miou": float(np.mean([r["box_iou"] for r in per_instance])) if box else None,
        "seconds_per_prediction": run.seconds_per_prediction,
        "seconds_per_image": image_seconds / n,
        "settings": {
            "max_clicks": max_clicks,
            "thresholds": list(thresholds),
            "prob_threshold": prob_threshold,
            "first_click_multimask": first_click_multimask,
            "feed_back_logits": feed_back_logits,
            "box": box,
            "box_convention": "x0, y0, x1, y1 = min col, min row, max col, max row (inclusive)",
            "limit": limit,
        },
        "per_instance": per_instance,
    }
    logger.info(
        "%s on %d instances: NoC %s, NoF %s, mIoU@1 %.4f",
        report["predictor"],
        n,
        report["noc"],
        report["nof"],
        report["miou_at"][0],
    )
    return report


# --------------------------------------------------------------------------- reports
def save_report(path: str | Path, report: Mapping[str, Any]) -> None:
    """Writes a report as indented JSON, atomically (temporary file + ``os.replace``)."""
    from .masks import atomic_write

    text = json.dumps(report, indent=2, default=_json_default)
    with atomic_write(path, "w") as f:
        f.write(text + "\n")


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def plot_miou_curve(
    reports: Mapping[str, Mapping[str, Any]], path: str | Path, *, title: str | None = None
) -> None:
    """Saves a PNG of mean IoU against the number of clicks, one line per report.

    Args:
        reports: ``{method name: report of evaluate_interactive}``.
        path: the PNG to write (atomically).
        title: the plot title (default: ``"mIoU vs clicks"``).

    Raises:
        ImportError: matplotlib is not installed.
    """
    if not reports:
        raise ValueError("reports is empty; expected {name: report}")
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError("plot_miou_curve needs matplotlib: pip install matplotlib") from exc
    from .masks import atomic_write

    # A bare Figure with the Agg canvas: no pyplot, so no global state or GUI backend.
    fig = Figure(figsize=(6.4, 4.4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for name, report in reports.items():
        curve = report.get("miou_at")
        if not curve:
            raise ValueError(f"report {name!r} has no 'miou_at' curve")
        label = name
        noc90 = report.get("noc", {}).get("90")
        if noc90 is not None:
            label = f"{name} (NoC@90 {noc90:.2f})"
        ax.plot(range(1, len(curve) + 1), curve, marker="o", markersize=3, label=label)
    ax.set_xlabel("clicks")
    ax.set_ylabel("mean IoU")
    ax.set_ylim(0.0, 1.0)
    ax.grid(True, alpha=0.3)
    ax.set_title(title or "mIoU vs clicks")
    ax.legend(loc="lower right")
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png")


# --------------------------------------------------------------------------- GrabCut baseline
def _to_low_res(logits: np.ndarray, pad: float) -> np.ndarray:
    """``H x W`` logits -> ``256 x 256``: longest side resized to 256, padded bottom/right with
    ``pad`` (SAM's low-res layout)."""
    h, w = logits.shape
    scale = LOW_RES / max(h, w)
    nh, nw = max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5))
    small = cv2.resize(logits.astype(np.float32), (nw, nh), interpolation=cv2.INTER_LINEAR)
    out = np.full((LOW_RES, LOW_RES), pad, dtype=np.float32)
    out[:nh, :nw] = small
    return out


def _from_low_res(low: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Inverse of :func:`_to_low_res`: crop the valid area and resize to ``H x W``."""
    h, w = hw
    scale = LOW_RES / max(h, w)
    nh, nw = max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5))
    crop = np.ascontiguousarray(low[:nh, :nw], dtype=np.float32)
    return cv2.resize(crop, (w, h), interpolation=cv2.INTER_LINEAR)


class GrabCutPredictor:
    """GrabCut (OpenCV) seeded by clicks, with ``SamPredictor``'s ``set_image`` / ``predict``.

    The ``cv2.grabCut`` label map (``GC_INIT_WITH_MASK``) is built as follows:

    * with ``from_previous`` and a **previous prediction** (``mask_input``: the low-res logits
      this predictor returned, or any SAM-style ``1 x 256 x 256`` logits, upsampled to the
      image; when they are exactly the ones this predictor returned last, its full-resolution
      mask is used instead of the upsampled one): its object pixels are probably-foreground,
      the rest probably-background;
    * otherwise (the default: every click round starts again from all the clicks so far):
      everything probably-background, except disks of radius ``init_radius`` (default
      ``0.1 * min(H, W)``) around positive clicks, probably-foreground;
    * a ``box``: definite background outside it; inside it the previous prediction if given,
      else probably-foreground;
    * **seeds**: disks of radius ``seed_radius`` (5 px) around the clicks, definite foreground
      for positive and definite background for negative clicks, drawn in click order.

    Starting from the previous mask lets GrabCut's colour models drift with its own errors:
    on the first 8 DAVIS instances, 10 clicks (``benchmarks/grabcut_baseline.py --limit 8
    --max-clicks 10``, with and without ``--from-previous``), mIoU fell from 0.544 after one
    click to 0.471 after three and 0.523 after ten; started afresh each round it rises to
    0.584 and 0.634.

    Then ``iterations`` (5) rounds of GrabCut. OpenCV's random generator is seeded with
    ``rng_seed`` before each call (its GMM initialisation uses k-means), so results repeat.
    If all pixels fall into one class, GrabCut cannot fit two colour models and the label map
    is returned as it is.

    ``predict`` returns masks as ``+logit`` / ``-logit`` (``+-10``) logits when
    ``return_logits`` (else bool), ``1 x H x W`` or three identical copies with
    ``multimask_output``, scores of ones, and ``C x 256 x 256`` low-res logits in SAM's layout.
    """

    def __init__(
        self,
        *,
        iterations: int = 5,
        seed_radius: int = 5,
        init_radius: float | None = None,
        logit: float = 10.0,
        rng_seed: int = 0,
        from_previous: bool = False,
    ) -> None:
        if iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {iterations}")
        if seed_radius < 0:
            raise ValueError(f"seed_radius must be >= 0, got {seed_radius}")
        if init_radius is not None and init_radius <= 0:
            raise ValueError(f"init_radius must be > 0 or None, got {init_radius}")
        self.iterations = iterations
        self.seed_radius = seed_radius
        self.init_radius = init_radius
        self.logit = float(logit)
        self.rng_seed = rng_seed
        self.from_previous = from_previous
        self._image: np.ndarray | None = None
        self._last_low: np.ndarray | None = None
        self._last_mask: np.ndarray | None = None

    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        """Keeps the ``H x W x 3`` uint8 image (colour order does not matter to GrabCut)."""
        from .images import validate_image_array

        self._image = np.ascontiguousarray(validate_image_array(image))
        self._last_low = None
        self._last_mask = None

    def reset_image(self) -> None:
        self._image = None
        self._last_low = None
        self._last_mask = None

    def _previous(self, mask_input: Any, hw: tuple[int, int]) -> np.ndarray | None:
        if mask_input is None:
            return None
        low = np.asarray(mask_input, dtype=np.float32)
        if low.shape not in ((LOW_RES, LOW_RES), (1, LOW_RES, LOW_RES)):
            raise ValueError(f"mask_input must be 1 x 256 x 256 logits, got shape {low.shape}")
        low = low.reshape(LOW_RES, LOW_RES)
        if not self.from_previous:
            return None  # checked above, not used
        if self._last_low is not None and np.array_equal(low, self._last_low):
            return self._last_mask
        return _from_low_res(low, hw) > 0

    def predict(
        self,
        point_coords: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
        mask_input: np.ndarray | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(masks C x H x W, scores C, low_res C x 256 x 256)``; C = 3 if multimask_output.

        Args (image pixels): ``point_coords`` N x 2 (x, y); ``point_labels`` N (1 positive,
        0 negative, -1 ignored); ``box`` 4 xyxy; ``mask_input`` 1 x 256 x 256 logits.
        """
        if self._image is None:
            raise RuntimeError("call set_image(image) before predict")
        image = self._image
        h, w = image.shape[:2]
        if point_coords is None:
            coords = np.zeros((0, 2), dtype=np.float64)
            labels = np.zeros((0,), dtype=np.int64)
        else:
            coords = np.asarray(point_coords, dtype=np.float64).reshape(-1, 2)
            if point_labels is None:
                raise ValueError("point_labels are required with point_coords")
            labels = np.asarray(point_labels).reshape(-1).astype(np.int64)
            if len(labels) != len(coords):
                raise ValueError(f"{len(coords)} points but {len(labels)} labels")
        if box is None and len(coords) == 0 and mask_input is None:
            raise ValueError("give point_coords, a box or mask_input")

        gc = np.full((h, w), cv2.GC_PR_BGD, dtype=np.uint8)
        previous = self._previous(mask_input, (h, w))
        if previous is not None:
            gc[previous] = cv2.GC_PR_FGD
        elif box is None:
            radius = self.init_radius or 0.1 * min(h, w)
            for (x, y), label in zip(coords, labels):
                if label == 1:
                    cv2.circle(gc, (round(x), round(y)), round(radius), cv2.GC_PR_FGD, -1)
        if box is not None:
            x0, y0, x1, y1 = (round(float(v)) for v in np.asarray(box).reshape(-1)[:4])
            x0, x1 = max(0, min(x0, x1)), min(w - 1, max(x0, x1))
            y0, y1 = max(0, min(y0, y1)), min(h - 1, max(y0, y1))
            inside = np.zeros((h, w), dtype=bool)
            inside[y0 : y1 + 1, x0 : x1 + 1] = True
            if previous is None:
                gc[inside] = cv2.GC_PR_FGD
            gc[~inside] = cv2.GC_BGD
        for (x, y), label in zip(coords, labels):
            if label in (0, 1):
                value = cv2.GC_FGD if label == 1 else cv2.GC_BGD
                cv2.circle(gc, (round(x), round(y)), self.seed_radius, value, -1)

        is_fg = (gc == cv2.GC_FGD) | (gc == cv2.GC_PR_FGD)
        if is_fg.any() and not is_fg.all():
            bgd_model = np.zeros((1, 65), dtype=np.float64)
            fgd_model = np.zeros((1, 65), dtype=np.float64)
            cv2.setRNGSeed(self.rng_seed)
            try:
                cv2.grabCut(
                    image,
                    gc,
                    (0, 0, 0, 0),
                    bgd_model,
                    fgd_model,
                    self.iterations,
                    cv2.GC_INIT_WITH_MASK,
                )
            except cv2.error as exc:  # e.g. too few samples for a colour model
                logger.warning("grabCut failed (%s); returning the seed labels", exc)
            is_fg = (gc == cv2.GC_FGD) | (gc == cv2.GC_PR_FGD)

        logits = np.where(is_fg, self.logit, -self.logit).astype(np.float32)
        low = _to_low_res(logits, -self.logit)
        self._last_low, self._last_mask = low, is_fg
        n = 3 if multimask_output else 1
        masks = (
            np.repeat(logits[None], n, axis=0) if return_logits else np.repeat(is_fg[None], n, 0)
        )
        scores = np.ones(n, dtype=np.float32)
        return masks, scores, np.repeat(low[None], n, axis=0)
