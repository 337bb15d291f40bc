"""segany-lite against the issue's targets, with the GrabCut floor, in one run.

Quality on val/DAVIS (never trained or tuned on) under the standard click protocol, and speed
on this machine: encoding a 1024-px photo, decoding one prompt, "segment everything" on a
640-px photo. Prints a table and writes JSON (``--out``).

    .venv/bin/python benchmarks/lite_targets.py --checkpoint artifacts/segany_lite_run/model.safetensors
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from segany import AutomaticMaskGenerator, Predictor, build_model
from segany.data import DavisDataset
from segany.evaluate import GrabCutPredictor, evaluate_interactive, plot_miou_curve

DAVIS = Path(__file__).resolve().parents[2] / "shared" / "data" / "val" / "DAVIS"


def speed(model, repeats: int) -> dict[str, float]:
    rng = np.random.default_rng(0)
    photo = rng.integers(0, 255, (768, 1024, 3), dtype=np.uint8)
    pred = Predictor(model)
    enc = []
    for _ in range(repeats):
        t = time.perf_counter()
        pred.set_image(photo)
        enc.append(time.perf_counter() - t)
    dec = []
    for i in range(20 * repeats):
        t = time.perf_counter()
        pred.predict(np.array([[100.0 + i, 200.0]]), np.array([1]))
        dec.append(time.perf_counter() - t)
    small = rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)
    gen = AutomaticMaskGenerator(model)
    t = time.perf_counter()
    gen.generate(small)
    everything = time.perf_counter() - t
    return {
        "encode_1024px_s": statistics.median(enc),
        "decode_one_prompt_ms": 1000 * statistics.median(dec),
        "everything_640px_s": everything,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--checkpoint", help="model file (default: the bundled segany-lite)")
    ap.add_argument("--data", default=str(DAVIS))
    ap.add_argument("--limit", type=int, help="first N instances only")
    ap.add_argument("--no-grabcut", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="artifacts/lite_targets.json")
    ap.add_argument("--plot", default="artifacts/lite_targets_miou.png")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = build_model(checkpoint=args.checkpoint) if args.checkpoint else build_model()
    ds = DavisDataset(args.data)
    reports = {"segany-lite": evaluate_interactive(Predictor(model), ds, limit=args.limit)}
    if not args.no_grabcut:
        reports["GrabCut"] = evaluate_interactive(GrabCutPredictor(), ds, limit=args.limit)
    result = {name: {"noc85": r["noc"]["85"], "noc90": r["noc"]["90"],
                     "nof90": r["nof"]["90"], "miou@1": r["miou_at"][0],
                     "miou@3": r["miou_at"][2], "miou@5": r["miou_at"][4],
                     "box_miou": r["box_miou"], "n": r["n_instances"]}
              for name, r in reports.items()}
    result["speed"] = speed(model, args.repeats)
    print(json.dumps(result, indent=2))
    targets = {"noc90 <= 8": result["segany-lite"]["noc90"] <= 8,
               "miou@1 >= 0.65": result["segany-lite"]["miou@1"] >= 0.65,
               "encode <= 0.4 s": result["speed"]["encode_1024px_s"] <= 0.4,
               "decode <= 20 ms": result["speed"]["decode_one_prompt_ms"] <= 20,
               "everything <= 5 s": result["speed"]["everything_640px_s"] <= 5}
    for k, ok in targets.items():
        print(f"  {'met ' if ok else 'MISSED'}  {k}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(dict(result, targets=targets), indent=2))
    plot_miou_curve(reports, args.plot)


if __name__ == "__main__":
    main()
