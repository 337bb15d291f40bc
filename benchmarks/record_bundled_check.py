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

import segany
from segany.data import DavisDataset
from segany.evaluate import evaluate_interactive

ROOT = Path(__file__).resolve().parents[1]
DAVIS = ROOT.parent / "shared" / "data" / "val" / "DAVIS"
OUT = ROOT / "segany" / "weights" / "segany_lite_check.json"


def main(limit: int = 8, max_clicks: int = 5, scenes: int = 6) -> None:
    predictor = segany.Predictor(segany.build_model())
    report = evaluate_interactive(
        predictor,
        DavisDataset(DAVIS),
        limit=limit,
        max_clicks=max_clicks,
        progress=False,
    )
    rec = {"limit": limit, "max_clicks": max_clicks, "noc90": report["noc"]["90"]}
    rec.update({f"miou@{k + 1}": v for k, v in enumerate(report["miou_at"])})
    OUT.write_text(json.dumps(rec, indent=2) + "\n")
    print(json.dumps(rec, indent=2))
    sys.path.insert(0, str(ROOT / "tests"))
    from test_bundled import scene_ious  # exactly what the test predicts

    ious = [scene_ious(predictor, seed) for seed in range(scenes)]
    print("sanity scenes, 1 click / box IoU: " + ", ".join(f"{a:.2f}/{b:.2f}" for a, b in ious))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenes", type=int, default=6, help="sanity-scene seeds to print")
    main(scenes=ap.parse_args().scenes)
