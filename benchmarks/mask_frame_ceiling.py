"""What a model's low-res mask frame allows on val/DAVIS: each ground truth is area-downsampled
to a frame of ``--sides`` (longest side), turned into +-1 logits, upsampled back bilinearly and
thresholded at 0, as the predictor does with perfect low-res logits; prints the mean IoU with
the ground truth and the share of instances that could not reach IoU 0.85 / 0.90 at all.

    .venv/bin/python benchmarks/mask_frame_ceiling.py --sides 128 256 512
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np

from segany.data import DavisDataset, load_sample
from segany.evaluate import mask_iou

DAVIS = Path(__file__).resolve().parents[2] / "shared" / "data" / "val" / "DAVIS"


def frame_ceiling(gt: np.ndarray, ignore: np.ndarray | None, side: int) -> float:
    """IoU of the ground truth after a round trip through a ``side``-pixel frame (area
    downsampling, +-1 logits, bilinear upsampling, threshold 0), as perfect low-res logits."""
    h, w = gt.shape
    scale = side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = cv2.resize(gt.astype(np.float32), size, interpolation=cv2.INTER_AREA)
    up = cv2.resize(small * 2 - 1, (w, h), interpolation=cv2.INTER_LINEAR)
    return mask_iou(up > 0, gt, ignore)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DAVIS)
    ap.add_argument("--sides", type=int, nargs="+", default=[128, 256, 512])
    args = ap.parse_args()
    ious: dict[int, list[float]] = {s: [] for s in args.sides}
    for sample in DavisDataset(args.data):
        _, gt, ignore = load_sample(sample)
        for side in args.sides:
            ious[side].append(frame_ceiling(gt, ignore, side))
    for side, values in ious.items():
        v = np.array(values)
        print(
            f"frame {side}: mean IoU {v.mean():.3f}  below 0.90 {100 * (v < 0.9).mean():.1f} %  "
            f"below 0.85 {100 * (v < 0.85).mean():.1f} %  ({len(v)} instances)"
        )


if __name__ == "__main__":
    main()
