"""Records the bundled model's figures on the first val/DAVIS instances for tests/test_bundled.py.

Run after replacing ``segany/weights/segany_lite.safetensors``:

    .venv/bin/python benchmarks/record_bundled_check.py
"""

from __future__ import annotations

import json
from pathlib import Path

import segany
from segany.data import DavisDataset
from segany.evaluate import evaluate_interactive

ROOT = Path(__file__).resolve().parents[1]
DAVIS = ROOT.parent / "shared" / "data" / "val" / "DAVIS"
OUT = ROOT / "segany" / "weights" / "segany_lite_check.json"


def main(limit: int = 8, max_clicks: int = 5) -> None:
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


if __name__ == "__main__":
    main()
