"""segany-lite against the issue's targets, with the GrabCut floor, in one run.

Quality on val/DAVIS (never trained or tuned on) under the standard click protocol, and speed
on this machine: encoding a 1024-px photo, decoding one prompt, "segment everything" on a
640-px photo. Prints a table and writes JSON (``--out``). ``--zoom-in`` adds the same protocol
with :class:`segany.zoom.ZoomInPredictor` (clicks after the first and the first click's second
pass on a crop around the object) and ``--flip`` with test-time flips on top, each with
its seconds per prediction; the targets are checked on the plain predictor and on the best row.
``--refine on|off`` sets the Predictor's mask refinement (default auto: on for segany-lite);
``--also-unrefined`` adds a row of the plain predictor with it off.

    .venv/bin/python benchmarks/lite_targets.py --checkpoint artifacts/segany_lite_run/model.safetensors
    .venv/bin/python benchmarks/lite_targets.py --zoom-in --flip --no-grabcut
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from segany import AutomaticMaskGenerator, Predictor, build_model, load_image
from segany.data import DavisDataset
from segany.evaluate import GrabCutPredictor, evaluate_interactive, plot_miou_curve
from segany.refine import REFINE_CHOICES
from segany.zoom import ZoomInPredictor

DAVIS = Path(__file__).resolve().parents[2] / "shared" / "data" / "val" / "DAVIS"


def _photo(path: Path, longest: int) -> np.ndarray:
    image = load_image(path)
    h, w = image.shape[:2]
    s = longest / max(h, w)
    return cv2.resize(image, (round(w * s), round(h * s)), interpolation=cv2.INTER_CUBIC)


def speed(model, photo_path: Path, repeats: int, refine="auto") -> dict[str, float]:
    """Medians on a real photo: encoding at 1024 px (resize included), one click decoded to
    the original size (mask refinement included, as ``refine``), "segment everything" at
    640 px with the default generator settings."""
    photo = _photo(photo_path, 1024)
    pred = Predictor(model, refine=refine)
    enc = []
    for _ in range(repeats):
        t = time.perf_counter()
        pred.set_image(photo)
        enc.append(time.perf_counter() - t)
    h, w = photo.shape[:2]
    dec = []
    for i in range(20 * repeats):
        t = time.perf_counter()
        pred.predict(np.array([[w / 4 + i * 7.0, h / 2.0]]), np.array([1]))
        dec.append(time.perf_counter() - t)
    small = _photo(photo_path, 640)
    gen = AutomaticMaskGenerator(model)
    every, n_masks = [], 0
    for _ in range(max(1, repeats // 2)):
        t = time.perf_counter()
        n_masks = len(gen.generate(small))
        every.append(time.perf_counter() - t)
    return {
        "encode_1024px_s": statistics.median(enc),
        "decode_one_prompt_ms": 1000 * statistics.median(dec),
        "everything_640px_s": statistics.median(every),
        "everything_masks": n_masks,
    }


def _mean_at(per_instance: list[dict], key: str, k: int) -> float:
    if not all(key in r for r in per_instance):
        return float("nan")
    return float(np.mean([r[key][k] for r in per_instance]))


def _summary(per_instance: list[dict], report: dict | None = None) -> dict[str, float]:
    ious = np.array([r["ious"] for r in per_instance])
    box = [r["box_iou"] for r in per_instance if "box_iou" in r]
    return {
        "noc85": float(np.mean([r["noc"]["85"] for r in per_instance])),
        "noc90": float(np.mean([r["noc"]["90"] for r in per_instance])),
        "nof90": int((ious.max(1) < 0.9).sum()),
        "miou@1": float(ious[:, 0].mean()),
        "miou@3": float(ious[:, 2].mean()),
        "miou@5": float(ious[:, 4].mean()),
        "box_miou": float(np.mean(box)) if box else float("nan"),
        # share of the clicks so far the mask follows, after 5 and after the last click
        # (NaN for reports written before the evaluator recorded it)
        "clicks_obeyed@5": _mean_at(per_instance, "clicks_obeyed", 4),
        "clicks_obeyed@last": _mean_at(per_instance, "clicks_obeyed", -1),
        "n": len(per_instance),
        "seconds_per_prediction": (report or {}).get("seconds_per_prediction", float("nan")),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--checkpoint", help="model file (default: the bundled segany-lite)")
    ap.add_argument("--data", default=str(DAVIS))
    ap.add_argument("--limit", type=int, help="first N instances only")
    ap.add_argument("--no-grabcut", action="store_true")
    ap.add_argument(
        "--grabcut-report",
        help="JSON report of benchmarks/grabcut_baseline.py --out to use instead of running it",
    )
    ap.add_argument(
        "--grabcut-limit",
        type=int,
        default=60,
        help="instances for the GrabCut floor (about 20 s each; all 345 take ~2 h)",
    )
    ap.add_argument("--zoom-in", action="store_true", help="add a ZoomInPredictor row")
    ap.add_argument("--flip", action="store_true", help="add a zoom-in + test-time flip row")
    ap.add_argument("--refine", choices=list(REFINE_CHOICES), default="auto")
    ap.add_argument("--also-unrefined", action="store_true", help="add a row with refine off")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="artifacts/lite_targets.json")
    ap.add_argument("--plot", default="artifacts/lite_targets_miou.png")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = build_model(checkpoint=args.checkpoint) if args.checkpoint else build_model()
    ds = DavisDataset(args.data)
    refine = REFINE_CHOICES[args.refine]
    plain = Predictor(model, refine=refine)
    reports = {"segany-lite": evaluate_interactive(plain, ds, limit=args.limit)}
    print(json.dumps({"segany-lite": _summary(reports["segany-lite"]["per_instance"])}))
    if args.also_unrefined:
        row = "segany-lite refine off"
        reports[row] = evaluate_interactive(Predictor(model, refine=False), ds, limit=args.limit)
        print(json.dumps({row: _summary(reports[row]["per_instance"])}))
    if args.zoom_in:
        zoom = ZoomInPredictor(Predictor(model, refine=refine))
        reports["segany-lite +zoom-in"] = evaluate_interactive(zoom, ds, limit=args.limit)
        print(json.dumps({"+zoom-in": _summary(reports["segany-lite +zoom-in"]["per_instance"])}))
    if args.flip:
        zoom = ZoomInPredictor(Predictor(model, refine=refine), flip=True)
        reports["segany-lite +zoom-in +flip"] = evaluate_interactive(zoom, ds, limit=args.limit)
    if args.grabcut_report:
        gc = json.loads(Path(args.grabcut_report).read_text())
        reports[f"GrabCut (first {gc['n_instances']})"] = gc
    elif not args.no_grabcut:
        n = min(x for x in (args.limit, args.grabcut_limit, len(ds)) if x is not None)
        reports[f"GrabCut (first {n})"] = evaluate_interactive(GrabCutPredictor(), ds, limit=n)
    result = {name: _summary(r["per_instance"], r) for name, r in reports.items()}
    grabcut = [v["n"] for k, v in result.items() if k.startswith("GrabCut")]
    if grabcut:  # segany-lite on exactly the instances GrabCut saw
        n = grabcut[0]
        result[f"segany-lite (first {n})"] = _summary(reports["segany-lite"]["per_instance"][:n])
    result["speed"] = speed(model, Path(args.data) / "images" / "001.jpg", args.repeats, refine)
    print(json.dumps(result, indent=2))
    rows = [
        k for k in result if k.startswith("segany-lite") and "(first" not in k and "off" not in k
    ]
    best = min(rows, key=lambda k: result[k]["noc90"])
    targets = {
        "noc90 <= 8": result["segany-lite"]["noc90"] <= 8,
        "miou@1 >= 0.65": result["segany-lite"]["miou@1"] >= 0.65,
        f"noc90 <= 8 ({best})": result[best]["noc90"] <= 8,
        f"miou@1 >= 0.65 ({best})": result[best]["miou@1"] >= 0.65,
        "encode <= 0.4 s": result["speed"]["encode_1024px_s"] <= 0.4,
        "decode <= 20 ms": result["speed"]["decode_one_prompt_ms"] <= 20,
        "everything <= 5 s": result["speed"]["everything_640px_s"] <= 5,
    }
    for k, ok in targets.items():
        print(f"  {'met ' if ok else 'MISSED'}  {k}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(dict(result, targets=targets), indent=2))
    plot_miou_curve(reports, args.plot)


if __name__ == "__main__":
    main()
