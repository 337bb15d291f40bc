"""What the decoder's low-rank image tokens (``MaskDecoder.low_rank``) buy on ViT-B, one process.

The same random ViT-B weights three ways: the reference ``SamPredictor``, segany with the
low-rank path (the default) and segany with it off (the dense fast path). Prints medians:

* one click at the original size, the three alternating call by call, then in turns of 5;
* 1, 2 and 4 clicks, low-rank against dense only (no reference between the calls);
* 64 boxes in one batch and "segment everything" (``--points-per-side``), low-rank against
  dense;
* the first click after ``set_image`` (which now makes the image's decoder products) against
  the second, on fresh images.

    .venv/bin/python benchmarks/decode_low_rank.py
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from speed import measure, random_boxes, random_vit_b, report

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from conftest import synthetic_image

from segany import AutomaticMaskGenerator, Predictor, build_sam, get_model_spec


def clicks(n: int, w: int, h: int) -> dict[str, np.ndarray]:
    """``n`` positive clicks in a row across the image's middle."""
    xy = np.array([[w / 2 + 10 * i, h / 2] for i in range(n)])
    return dict(point_coords=xy, point_labels=np.ones(n, dtype=int))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=40)
    ap.add_argument("--size", default="480x640", help="image HxW")
    ap.add_argument("--points-per-side", type=int, default=16)
    args = ap.parse_args()
    from segment_anything import SamPredictor, sam_model_registry

    from segany.optimize import set_threads

    print(f"torch {torch.__version__}, threads {set_threads(None)}")
    torch.set_grad_enabled(False)
    ours = random_vit_b()
    ref = sam_model_registry["vit_b"]().eval()
    ref.load_state_dict(ours.state_dict(), strict=True)
    dense = build_sam(get_model_spec("vit_b").config).eval()
    dense.load_state_dict(ours.state_dict())
    dense.mask_decoder.low_rank = False
    h, w = (int(v) for v in args.size.split("x"))
    image = synthetic_image(h, w, seed=4)
    pr, pl, pd = SamPredictor(ref), Predictor(ours), Predictor(dense)
    for p in (pr, pl, pd):
        p.set_image(image)

    kw = clicks(1, w, h)
    one = {
        "reference": lambda: pr.predict(**kw),
        "segany low-rank": lambda: pl.predict(**kw),
        "segany dense": lambda: pd.predict(**kw),
    }
    for fn in one.values():
        fn()
    report("one click, calls alternating (ms)", measure(one, args.repeats), "reference", 1e3, "ms")
    res = measure(one, max(1, args.repeats // 5), block=5)
    report("one click, turns of 5 calls (ms)", res, "reference", 1e3, "ms")

    for n in (1, 2, 4):
        kn = clicks(n, w, h)
        res = measure(
            {
                "segany dense": lambda kn=kn: pd.predict(**kn),
                "segany low-rank": lambda kn=kn: pl.predict(**kn),
            },
            args.repeats,
        )
        report(f"{n} click(s), no reference between (ms)", res, "segany dense", 1e3, "ms")

    boxes = torch.as_tensor(pl.transform.apply_boxes(random_boxes(h, w), (h, w)), dtype=torch.float)
    res = measure(
        {
            "segany dense": lambda: pd.predict_torch(None, None, boxes=boxes),
            "segany low-rank": lambda: pl.predict_torch(None, None, boxes=boxes),
        },
        6,
    )
    report("64 boxes in one batch (s)", res, "segany dense", 1, "s ")
    pps = args.points_per_side
    gens = {
        "segany dense": AutomaticMaskGenerator(dense, points_per_side=pps),
        "segany low-rank": AutomaticMaskGenerator(ours, points_per_side=pps),
    }
    res = measure({k: (lambda g=g: g.generate(image)) for k, g in gens.items()}, 2)
    report(f"segment everything, {pps} x {pps} points (s)", res, "segany dense", 1, "s ")

    first, second = [], []
    for seed in range(5, 10):
        pl.set_image(synthetic_image(h, w, seed=seed))
        for times in (first, second):
            t = time.perf_counter()
            pl.predict(**kw)
            times.append(time.perf_counter() - t)
    print(
        f"\n## first click after set_image: {statistics.median(first) * 1e3:.1f} ms, "
        f"second {statistics.median(second) * 1e3:.1f} ms (medians of 5 images)"
    )


if __name__ == "__main__":
    main()
