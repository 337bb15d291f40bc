"""Chooses "segment everything" filter thresholds for a model on images held out of training.

SAM's defaults (predicted IoU > 0.88, stability >= 0.95 at offset 1.0) suit SAM's confident
heads; a smaller model predicts lower IoUs and softer logits, and keeps nothing with them.
This script runs the generator once per image and offset with every filter off, then
replays the filters offline for a grid of thresholds (the same filter, then the same box
NMS as the generator) and scores each setting against the ground truth:

* F1 at mask IoU 0.5 between the masks kept and the ground-truth masks (greedy matching by
  predicted IoU), the figure it maximises: the masks a user sees should be objects (with
  ``--f1-tolerance``, among the settings that close to the best F1 the one that keeps the most
  masks: on a dozen images such F1 differences are noise, and a user wants the photo covered);
* COCO mask AP and AR@100 / AR@1000 (pycocotools) for the winner and for SAM's defaults.

The images are the held-out split of a training config (same ``val_fraction`` and
``split_seed`` as the trainer), restricted to sets whose images are annotated completely
(default: COCO_panoptic200, every thing and stuff segment), so a mask that is not in the
ground truth really is a false positive. DAVIS is never used here.

    .venv/bin/python benchmarks/tune_amg_thresholds.py --config configs/segany_lite.json \
        --out artifacts/amg_thresholds.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from pycocotools import mask as mask_utils
from tqdm import tqdm

from segany import AutomaticMaskGenerator, build_model
from segany.automatic import batched_nms
from segany.data import ManifestDataset, MaskDataset
from segany.evaluate_coco import CocoMaskEvaluator, iter_image_targets

sys.path.insert(0, str(Path(__file__).resolve().parent))
from everything_ap import ROOT, held_out_images

TRAIN = ROOT.parent / "shared" / "data" / "train"

IOU_GRID = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.88)
STABILITY_GRID = (0.0, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
OFFSETS = (1.0, 0.5, 0.25)
SAM_DEFAULTS = {
    "pred_iou_thresh": 0.88,
    "stability_score_thresh": 0.95,
    "stability_score_offset": 1.0,
}


def held_out_samples(config: Path, sets: list[str], limit: int | None) -> list:
    """Masks of the images of ``sets`` that the trainer of ``config`` holds out."""
    held = held_out_images(config)
    samples = [
        s
        for name in sets
        for s in ManifestDataset(TRAIN / name)
        if Path(s.image_path).resolve() in held
    ]
    images = sorted({Path(s.image_path).resolve() for s in samples})[:limit]
    samples = [s for s in samples if Path(s.image_path).resolve() in set(images)]
    if not samples:
        raise SystemExit(f"no held-out images of {sets} under {config}")
    return samples


def select(records: list[dict], iou_t: float, stab_t: float, nms: float) -> list[dict]:
    """The generator's filters (predicted IoU >, stability >=) and its box NMS."""
    kept = [r for r in records if r["predicted_iou"] > iou_t and r["stability_score"] >= stab_t]
    if len(kept) < 2:
        return kept
    boxes = torch.tensor([r["bbox"] for r in kept], dtype=torch.float32)
    boxes[:, 2:] += boxes[:, :2]  # xywh -> xyxy
    scores = torch.tensor([r["predicted_iou"] for r in kept])
    keep = batched_nms(boxes, scores, torch.zeros(len(kept)), nms)
    return [kept[int(i)] for i in keep]


def f1_at_half(preds: list[dict], gts: list[dict], crowd: list[bool]) -> tuple[int, int, int]:
    """(true positives, predictions, ground-truth objects), greedy by predicted IoU."""
    objects = [g for g, c in zip(gts, crowd) if not c]
    if not preds or not objects:
        return 0, len(preds), len(objects)
    order = sorted(range(len(preds)), key=lambda i: -preds[i]["predicted_iou"])
    dt = [preds[i]["segmentation"] for i in order]
    ious = mask_utils.iou(dt, objects, [0] * len(objects))
    taken = np.zeros(len(objects), dtype=bool)
    tp = 0
    for row in np.atleast_2d(ious):
        row = np.where(taken, -1.0, row)
        j = int(np.argmax(row))
        if row[j] >= 0.5:
            taken[j] = True
            tp += 1
    return tp, len(preds), len(objects)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--config", default=str(ROOT / "configs" / "segany_lite.json"), help="training config"
    )
    ap.add_argument("--checkpoint", default=None, help="default: the bundled segany-lite")
    ap.add_argument("--sets", default="COCO_panoptic200", help="comma list of train sets")
    ap.add_argument("--limit", type=int, default=None, help="at most this many images")
    ap.add_argument("--points-per-side", type=int, default=32)
    ap.add_argument("--box-nms-thresh", type=float, default=0.7)
    ap.add_argument(
        "--f1-tolerance",
        type=float,
        default=0.0,
        help="choose the setting keeping the most masks among those within this of the best F1",
    )
    ap.add_argument("--out", default=None, help="write the table and the choice as JSON")
    args = ap.parse_args()

    samples = held_out_samples(Path(args.config), args.sets.split(","), args.limit)
    model = build_model(checkpoint=args.checkpoint)  # None: the bundled segany-lite
    targets = list(iter_image_targets(MaskDataset(samples)))
    print(f"{len(targets)} held-out images, {sum(len(t.objects) for t in targets)} objects")

    # every mask with its scores, per offset and image (filters and NMS off)
    raw: dict[float, list[list[dict]]] = {}
    gts, crowds = [], []
    for t in targets:
        gts.append([mask_utils.encode(np.asfortranarray(m.astype(np.uint8))) for m in t.masks])
        crowds.append(t.iscrowd)
    start = time.perf_counter()
    for off in OFFSETS:
        gen = AutomaticMaskGenerator(
            model,
            points_per_side=args.points_per_side,
            pred_iou_thresh=0.0,
            stability_score_thresh=0.0,
            stability_score_offset=off,
            box_nms_thresh=1.0,
            output_mode="coco_rle",
        )
        raw[off] = [gen.generate(t.image) for t in tqdm(targets, desc=f"offset {off}")]
    print(f"generation: {time.perf_counter() - start:.0f} s")

    table = []
    for off, iou_t, stab_t in itertools.product(OFFSETS, IOU_GRID, STABILITY_GRID):
        tp = n_pred = n_gt = 0
        for recs, gt, crowd in zip(raw[off], gts, crowds):
            a, b, c = f1_at_half(select(recs, iou_t, stab_t, args.box_nms_thresh), gt, crowd)
            tp, n_pred, n_gt = tp + a, n_pred + b, n_gt + c
        p = tp / n_pred if n_pred else 0.0
        r = tp / n_gt if n_gt else 0.0
        f1 = 2 * p * r / (p + r) if p + r else 0.0
        table.append(
            {
                "stability_score_offset": off,
                "pred_iou_thresh": iou_t,
                "stability_score_thresh": stab_t,
                "precision": p,
                "recall": r,
                "f1": f1,
                "masks_per_image": n_pred / len(targets),
            }
        )
    top = max(row["f1"] for row in table)
    # within the tolerance of the best F1 (noise on a dozen images), the setting that keeps the
    # most masks: "segment everything" should cover the photo
    near = [row for row in table if row["f1"] >= top - args.f1_tolerance]
    best = max(near, key=lambda row: (row["masks_per_image"], row["f1"]))

    def coco(setting: dict) -> dict:
        off = setting["stability_score_offset"]
        ev = CocoMaskEvaluator()
        for t, recs, gt in zip(targets, raw[off], gts):
            kept = select(
                recs,
                setting["pred_iou_thresh"],
                setting["stability_score_thresh"],
                args.box_nms_thresh,
            )
            ev.add_image(
                t.image.shape[:2],
                gt,
                t.iscrowd,
                [r["segmentation"] for r in kept],
                [r["predicted_iou"] for r in kept],
            )
        return ev.summarize()

    sam_row = next(
        row
        for row in table
        if row["stability_score_offset"] == 1.0
        and row["pred_iou_thresh"] == 0.88
        and row["stability_score_thresh"] == 0.95
    )
    print("\noffset  iou>   stab>=  precision  recall   F1    masks/img")
    for row in sorted(table, key=lambda row: -row["f1"])[:12]:
        print(
            f"{row['stability_score_offset']:5.2f}  {row['pred_iou_thresh']:5.2f}  "
            f"{row['stability_score_thresh']:5.2f}   {row['precision']:8.3f}  "
            f"{row['recall']:6.3f}  {row['f1']:5.3f}  {row['masks_per_image']:7.1f}"
        )
    results = {
        "images": [t.name for t in targets],
        "config": args.config,
        "checkpoint": args.checkpoint or "bundled segany-lite",
        "f1_tolerance": args.f1_tolerance,
        "chosen": {k: best[k] for k in SAM_DEFAULTS},
        "chosen_scores": {**best, "coco": coco(best)},
        "sam_defaults_scores": {**sam_row, "coco": coco({**SAM_DEFAULTS})},
        "table": table,
    }
    for name in ("chosen_scores", "sam_defaults_scores"):
        s = results[name]
        print(
            f"{name:20s} F1 {s['f1']:.3f}  masks/img {s['masks_per_image']:.1f}  "
            f"AP {s['coco']['AP']}  AR@100 {s['coco'].get('AR@100')}  "
            f"AR@1000 {s['coco'].get('AR@1000')}"
        )
    print("chosen:", json.dumps(results["chosen"]))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
        print("wrote", args.out, file=sys.stderr)


if __name__ == "__main__":
    main()
