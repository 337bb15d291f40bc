"""'Segment everything' time of segany vs the reference on the same random weights.

Both generators run in this process on the same image; the masks are compared too. Prints
medians over ``--repeats`` runs and the ratio segany/reference (lower is better).

    .venv/bin/python benchmarks/amg_speed.py --model vit_b --points-per-side 16
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from conftest import TINY, make_pair, synthetic_image

from segany import AutomaticMaskGenerator
from segany.registry import get_model_spec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="vit_b", help="registered variant or 'tiny'")
    ap.add_argument("--points-per-side", type=int, default=16)
    ap.add_argument("--size", default="480x640", help="image HxW")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from segment_anything import SamAutomaticMaskGenerator

    config = TINY if args.model == "tiny" else get_model_spec(args.model).config
    ours, ref = make_pair(config, seed=0, scale=0.02)
    h, w = (int(v) for v in args.size.split("x"))
    image = synthetic_image(h, w)
    kw = dict(
        points_per_side=args.points_per_side,
        pred_iou_thresh=0.0,
        stability_score_thresh=0.0,
        box_nms_thresh=0.7,
    )
    gens = {
        "segany": AutomaticMaskGenerator(ours, **kw),
        "reference": SamAutomaticMaskGenerator(ref, **kw),
    }
    times: dict[str, list[float]] = {k: [] for k in gens}
    counts: dict[str, int] = {}
    for _ in range(args.repeats):
        for name, gen in gens.items():
            t0 = time.perf_counter()
            with torch.inference_mode():
                out = gen.generate(image)
            times[name].append(time.perf_counter() - t0)
            counts[name] = len(out)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"model={args.model} image={h}x{w} points={args.points_per_side}**2 "
        f"threads={torch.get_num_threads()} repeats={args.repeats}"
    )
    for k in gens:
        print(f"  {k:<10} median {med[k]:8.2f} s   masks {counts[k]}")
    print(f"  ratio segany/reference: {med['segany'] / med['reference']:.2f}")
    assert np.isfinite(med["segany"])


if __name__ == "__main__":
    main()
