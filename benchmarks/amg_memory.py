"""Peak memory of "segment everything" on a large photo (default 4000 x 3000), segany vs the
reference, same random ViT-B weights. Each generator runs in its own child process so that
its peak resident memory (``ru_maxrss``) is its own. ``--which lite,lite-all-frames`` runs
the bundled segany-lite with its own thresholds, its prompt branch made for the kept masks
only (the default) or for every prompt of a batch.

    .venv/bin/python benchmarks/amg_memory.py --size 3000x4000 --points-per-side 16
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def child(which: str, size: str, pps: int, kw: dict) -> None:
    import torch
    from conftest import randomize_, synthetic_image

    from segany import AutomaticMaskGenerator, build_model, build_sam, get_model_spec

    torch.set_grad_enabled(False)
    h, w = (int(v) for v in size.split("x"))
    image = synthetic_image(h, w, seed=4)
    gen: Any
    if which.startswith("lite"):
        # the bundled model with its own thresholds; "lite-all-frames": its prompt branch
        # made for every prompt of a batch rather than for the kept masks only
        lite = build_model().eval()
        lite.fast_high_res_prompt = which == "lite"
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        batch = kw["points_per_batch"]
        gen = AutomaticMaskGenerator(
            lite, points_per_side=pps, points_per_batch=batch, output_mode="coco_rle"
        )
    else:
        ours = randomize_(build_sam(get_model_spec("vit_b").config), 0, 0.02).eval()
        randomize_(ours.prompt_encoder, 1, 0.1)
        randomize_(ours.mask_decoder, 2, 0.1)
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        if which == "reference":
            from segment_anything import SamAutomaticMaskGenerator, sam_model_registry

            ref = sam_model_registry["vit_b"]().eval()
            ref.load_state_dict(ours.state_dict())
            gen = SamAutomaticMaskGenerator(ref, points_per_side=pps, output_mode="coco_rle", **kw)
        else:
            gen = AutomaticMaskGenerator(ours, points_per_side=pps, output_mode="coco_rle", **kw)
    t = time.perf_counter()
    n = len(gen.generate(image))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        json.dumps(
            {
                "which": which,
                "peak_mb": peak / 1024,
                "before_mb": base / 1024,
                "masks": n,
                "seconds": time.perf_counter() - t,
            }
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="3000x4000", help="image HxW")
    ap.add_argument("--points-per-side", type=int, default=16)
    ap.add_argument("--points-per-batch", type=int, default=64)
    ap.add_argument(
        "--pred-iou-thresh",
        type=float,
        default=0.0,
        help="0 (default) keeps every mask to the stability filter, the worst case for memory",
    )
    ap.add_argument("--stability-score-thresh", type=float, default=0.0)
    ap.add_argument(
        "--which",
        default="segany,reference",
        help="comma list of segany, reference (random ViT-B), lite, lite-all-frames (bundled)",
    )
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    kw = {
        "points_per_batch": args.points_per_batch,
        "pred_iou_thresh": args.pred_iou_thresh,
        "stability_score_thresh": args.stability_score_thresh,
    }
    if args.child:
        child(args.child, args.size, args.points_per_side, kw)
        return
    for which in args.which.split(","):
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                which,
                "--size",
                args.size,
                "--points-per-side",
                str(args.points_per_side),
                "--points-per-batch",
                str(args.points_per_batch),
                "--pred-iou-thresh",
                str(args.pred_iou_thresh),
                "--stability-score-thresh",
                str(args.stability_score_thresh),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(
            f"{r['which']:<10} points_per_batch {args.points_per_batch}: peak RSS {r['peak_mb']:8.0f} MB (model + image before: "
            f"{r['before_mb']:.0f} MB), {r['masks']} masks, {r['seconds']:.1f} s"
        )


if __name__ == "__main__":
    main()
