"""Where NoC@90 is lost on val/DAVIS: the click protocol's failures by kind of instance.

Runs the standard protocol (``segany.evaluate.evaluate_interactive``, 20 clicks) with a model
(default: the bundled segany-lite) and splits the instances into terciles of object area and
of outline complexity (outer contour length / sqrt(area)), and into one-part / multi-part
(more than one connected part above 5 % of the object). For each group it prints the share
that never reaches IoU 0.90, the mean best IoU, the mean first-click IoU, and the share a
perfect low-res mask could not bring to 0.90 at the model's mask frame (``--frame``, longest
side; 160 for the 640-px segany-lite) and at 256: what training can fix against what needs a
finer output. ``--img-size`` runs segany-lite weights at another input size, untrained
(then pass ``--frame`` = size / 4).

    .venv/bin/python benchmarks/davis_failures.py [--checkpoint FILE] [--img-size N] [--out F]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import torch
from heldout_interactive import at_input_size
from mask_frame_ceiling import frame_ceiling

from segany import Predictor, build_model
from segany.data import DavisDataset, load_sample
from segany.evaluate import evaluate_interactive

DAVIS = Path(__file__).resolve().parents[2] / "shared" / "data" / "val" / "DAVIS"


def shape_figures(gt: np.ndarray) -> tuple[float, int, float]:
    """(area share of the image, parts above 5 % of the object, outline complexity)."""
    m = gt.astype(np.uint8)
    _, _, stats, _ = cv2.connectedComponentsWithStats(m)
    parts = int((stats[1:, cv2.CC_STAT_AREA] > 0.05 * m.sum()).sum())
    contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    outline = sum(cv2.arcLength(c, True) for c in contours)
    return float(gt.mean()), parts, float(outline / np.sqrt(max(1, m.sum())))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", help="model file (default: the bundled segany-lite)")
    ap.add_argument("--data", default=str(DAVIS))
    ap.add_argument("--frame", type=int, default=160, help="the model's mask frame (longest side)")
    ap.add_argument("--limit", type=int, help="first N instances only")
    ap.add_argument(
        "--img-size", type=int, help="run segany-lite weights at this input size (no retraining)"
    )
    ap.add_argument("--out", help="per-instance JSON")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    model = build_model(checkpoint=args.checkpoint) if args.checkpoint else build_model()
    model = at_input_size(model, args.img_size)
    ds = DavisDataset(args.data)
    report = evaluate_interactive(Predictor(model), ds, limit=args.limit, box=False)
    rows = []
    for sample, inst in zip(ds, report["per_instance"]):
        _, gt, ignore = load_sample(sample)
        area, parts, complexity = shape_figures(gt)
        ious = inst["ious"]
        rows.append(
            {
                "name": inst["name"],
                "area": area,
                "parts": parts,
                "complexity": complexity,
                "iou1": float(ious[0]),
                "best": float(max(ious)),
                "failed90": bool(max(ious) < 0.9),
                "ceiling": {s: frame_ceiling(gt, ignore, s) for s in sorted({args.frame, 256})},
            }
        )
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))

    def group(name: str, keep: Callable[[dict], bool]) -> None:
        sel = [r for r in rows if keep(r)]
        if not sel:
            return
        ceilings = "  ".join(
            f"frame {s} cannot {np.mean([r['ceiling'][s] < 0.9 for r in sel]):.2f}"
            for s in sorted({args.frame, 256})
        )
        print(
            f"{name:<22} n={len(sel):3d}  failed@90 {np.mean([r['failed90'] for r in sel]):.2f}"
            f"  best {np.mean([r['best'] for r in sel]):.3f}"
            f"  first click {np.mean([r['iou1'] for r in sel]):.3f}  {ceilings}"
        )

    print(f"NoC@90 {report['noc']['90']:.2f} on {len(rows)} instances")
    group("all", lambda r: True)
    group("one part", lambda r: r["parts"] <= 1)
    group("several parts", lambda r: r["parts"] > 1)
    for key, labels in (("area", ("small", "medium", "large")),
                        ("complexity", ("simple outline", "medium outline", "complex outline"))):  # fmt: skip
        lo, hi = np.quantile([r[key] for r in rows], [1 / 3, 2 / 3])
        group(labels[0], lambda r, k=key, lo=lo: r[k] < lo)
        group(labels[1], lambda r, k=key, lo=lo, hi=hi: lo <= r[k] < hi)
        group(labels[2], lambda r, k=key, hi=hi: r[k] >= hi)


if __name__ == "__main__":
    main()
