"""Reduced precision on the bundled model: bf16 (or fp16) image encoding against fp32.

The speed issue's bar: masks with IoU >= 0.97 against fp32 and NoC unchanged within 0.1 on the
bundled model's evaluation (val/DAVIS, the standard click protocol). This runs the protocol
twice on the same instances, fp32 and the reduced precision (``segany.optimize``), and
compares the first-click masks of the two directly (same click: the first click depends only
on the ground truth): the candidates each ranks first, and the same-index candidates (the
masks themselves, whatever the ranking). ``--first-click-only`` skips the two protocol runs;
``--noise-floor`` adds a third, fp32 on the photos changed by +-1 grey level (invisible),
which shows how far NoC moves for any small change.
Also prints the encoding time of both.

    .venv/bin/python benchmarks/precision_check.py --precision bf16 --out artifacts/bf16.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import segany
from segany import Predictor, build_model
from segany.data import DavisDataset
from segany.evaluate import evaluate_interactive, mask_iou, next_click
from segany.optimize import precision_supported

DAVIS = Path(__file__).resolve().parents[2] / "shared" / "data" / "val" / "DAVIS"


def first_click_ious(
    a: Predictor, b: Predictor, ds: DavisDataset, limit: int | None
) -> tuple[list[float], list[float], float]:
    """Instance by instance: IoU between the two predictors' best first-click masks, and the
    lowest IoU between their same-index candidates (the masks themselves, whichever is
    ranked first); and the share of instances where the two rank different candidates first."""
    best, same, switched = [], [], 0
    n = len(ds) if limit is None else min(limit, len(ds))
    for i in range(n):
        image, gt, ignore = ds.load(i)
        y, x, _ = next_click(gt, np.zeros_like(gt), ignore, np.zeros_like(gt))
        out = []
        for p in (a, b):
            p.set_image(image)
            out.append(p.predict(np.array([[x, y]], dtype=np.float32), np.array([1]))[:2])
        (ma, sa), (mb, sb) = out
        ia, ib = int(np.argmax(sa)), int(np.argmax(sb))
        best.append(mask_iou(ma[ia], mb[ib]))
        same.append(min(mask_iou(u, v) for u, v in zip(ma, mb)))
        switched += ia != ib
    return best, same, switched / max(1, n)


class NoisyInput(Predictor):
    """fp32 on the photo plus integer noise in {-1, 0, 1} per pixel and channel (fixed per
    photo): an invisible change, to size what any small perturbation does to the protocol."""

    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        rng = np.random.default_rng(int(image.sum()) % 2**32)
        noise = rng.integers(-1, 2, image.shape)
        noisy = np.clip(image.astype(np.int16) + noise, 0, 255).astype(np.uint8)
        super().set_image(noisy, image_format)


def encode_seconds(p: Predictor, image: np.ndarray, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        p.set_image(image)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", help="model file (default: the bundled segany-lite)")
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp16"])
    ap.add_argument("--data", default=str(DAVIS))
    ap.add_argument("--limit", type=int, help="first N instances only")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None)
    ap.add_argument("--first-click-only", action="store_true", help="skip the protocol runs")
    ap.add_argument(
        "--noise-floor",
        action="store_true",
        help="also run fp32 on the photos +-1 grey level: how far NoC moves for any tiny change",
    )
    args = ap.parse_args()
    if not precision_supported(args.precision, torch.device("cpu")):
        raise SystemExit(f"{args.precision} is not supported natively on this CPU")

    def load():
        return build_model(checkpoint=args.checkpoint) if args.checkpoint else build_model()

    fp32 = load()
    low = segany.optimize(load(), precision=args.precision)
    ds = DavisDataset(args.data)
    reports = {}
    if not args.first_click_only:
        reports = {
            name: evaluate_interactive(Predictor(m), ds, limit=args.limit, box=False)
            for name, m in (("fp32", fp32), (args.precision, low))
        }
        if args.noise_floor:
            noisy = NoisyInput(fp32)
            reports["fp32 +-1 noise"] = evaluate_interactive(noisy, ds, limit=args.limit, box=False)
    ious, same, switched = first_click_ious(Predictor(fp32), Predictor(low), ds, args.limit)
    image = ds.load(0)[0]
    result: dict[str, Any] = {"instances": len(ious)}
    if reports:
        result["noc"] = {k: r["noc"] for k, r in reports.items()}
        result["miou@1"] = {k: r["miou_at"][0] for k, r in reports.items()}
        result["miou@5"] = {k: r["miou_at"][4] for k, r in reports.items()}
    result |= {
        "first_click_mask_iou_vs_fp32": {
            "min": float(np.min(ious)),
            "mean": float(np.mean(ious)),
            "share_below_0.97": float(np.mean(np.array(ious) < 0.97)),
            "same_candidate_mean": float(np.mean(same)),
            "same_candidate_share_below_0.97": float(np.mean(np.array(same) < 0.97)),
            "ranked_first_switched": switched,
        },
        "encode_s": {
            "fp32": encode_seconds(Predictor(fp32), image, args.repeats),
            args.precision: encode_seconds(Predictor(low), image, args.repeats),
        },
    }
    if reports:
        d90 = abs(result["noc"][args.precision]["90"] - result["noc"]["fp32"]["90"])
        d85 = abs(result["noc"][args.precision]["85"] - result["noc"]["fp32"]["85"])
        result["noc_within_0.1"] = bool(d90 <= 0.1 and d85 <= 0.1)
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
