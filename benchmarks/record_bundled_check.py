"""Records the bundled model's figures on the first val/DAVIS instances for tests/test_bundled.py.

Run after replacing ``segany/weights/segany_lite.safetensors``:

    .venv/bin/python benchmarks/record_bundled_check.py

It also prints the 1-click and box IoUs of the test's synthetic sanity scenes (a flat ellipse
on texture, ``tests/test_bundled.py``) for seeds 0 to ``--scenes`` - 1 (the test checks 0-2
against its ``OBVIOUS_IOU``; the model card lists 0-5).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

import segany
from segany.data import DavisDataset
from segany.evaluate import evaluate_interactive

ROOT = Path(__file__).resolve().parents[1]
DAVIS = ROOT.parent / "shared" / "data" / "val" / "DAVIS"
OUT = ROOT / "segany" / "weights" / "segany_lite_check.json"


def scene_ious(model: segany.Sam, seeds: range) -> list[tuple[float, float]]:
    """``(1-click IoU, box IoU)`` per seed, exactly as ``tests/test_bundled.py`` predicts them."""
    sys.path.insert(0, str(ROOT / "tests"))
    from test_bundled import _scene

    out = []
    predictor = segany.Predictor(model)
    for seed in seeds:
        image, gt = _scene(seed)
        predictor.set_image(image)
        ys, xs = np.nonzero(gt)
        masks, scores, _ = predictor.predict(np.array([[xs.mean(), ys.mean()]]), np.array([1]))
        best = masks[int(np.argmax(scores))]
        box = np.array([xs.min(), ys.min(), xs.max(), ys.max()])
        m = predictor.predict(box=box, multimask_output=False)[0][0]
        out.append(
            (float((best & gt).sum() / (best | gt).sum()), float((m & gt).sum() / (m | gt).sum()))
        )
    return out


def main(limit: int = 8, max_clicks: int = 5, scenes: int = 6) -> None:
    report = evaluate_interactive(
        segany.Predictor(segany.build_model()),
        DavisDataset(DAVIS),
        limit=limit,
        max_clicks=max_clicks,
        progress=False,
    )
    rec = {"limit": limit, "max_clicks": max_clicks, "noc90": report["noc"]["90"]}
    rec.update({f"miou@{k + 1}": v for k, v in enumerate(report["miou_at"])})
    OUT.write_text(json.dumps(rec, indent=2) + "\n")
    print(json.dumps(rec, indent=2))
    ious = scene_ious(segany.build_model(), range(scenes))
    print("sanity scenes, 1 click / box IoU: " + ", ".join(f"{a:.2f}/{b:.2f}" for a, b in ious))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenes", type=int, default=6, help="sanity-scene seeds to print")
    main(scenes=ap.parse_args().scenes)
