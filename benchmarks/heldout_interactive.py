"""The click protocol on images held out of training: how checkpoints are chosen.

DAVIS is for reporting only, so candidate weights are compared here: the standard interactive
protocol (``segany.evaluate.evaluate_interactive``: farthest-point clicks on the error, logits
fed back) on masks of the images the trainer holds out (``val_fraction`` / ``split_seed`` of
the config), every set of ``../shared/data/train``, an evenly spaced subset of ``--masks``.
First, the first-click IoU of the candidate the IoU head ranks first against the best one
(oracle), the largest and the smallest: what the candidate ranking costs. ``--davis N``
prints the same on the first N val/DAVIS instances (reported, never used to choose).
``--zoom-in`` / ``--flip`` add rows with :class:`segany.zoom.ZoomInPredictor` (zoom-in, then
zoom-in with test-time flips), the settings of ``segany eval --zoom-in [--flip]`` unless
``--expansion``, ``--min-crop`` or ``--zoom-boxes`` change them; ``--img-size`` runs the
weights at another input size (segany-lite: no weight depends on it); ``--sets`` keeps some
sets only (e.g. the whole-object ones, COCO_MVal,PennFudanPed,WeizmannHorse); ``--refine
off`` turns the Predictor's mask refinement off (default auto: on for segany-lite),
``--refine-radius`` / ``--refine-eps`` / ``--keep-clicks`` / ``--refine-fit-scale`` set it (how its defaults were
chosen).

    .venv/bin/python benchmarks/heldout_interactive.py \
        stage2=old.safetensors stage3=artifacts/segany_lite_stage3/model.safetensors
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
from everything_ap import ROOT, held_out_images

from segany import Predictor, build_model
from segany.build import instantiate
from segany.data import DavisDataset, ManifestDataset, MaskDataset, load_sample
from segany.evaluate import evaluate_interactive, mask_iou, next_click
from segany.modeling.sam import Sam
from segany.refine import REFINE_CHOICES, GuidedRefiner
from segany.zoom import ZoomInPredictor

DAVIS = ROOT.parent / "shared" / "data" / "val" / "DAVIS"


def first_click_ranking(predictor: Predictor, samples) -> dict[str, float]:
    """Mean first-click IoU of the candidate the IoU head ranks first, of the best candidate
    (oracle), of the largest, of the smallest and of each output index always taken
    (``index0``...): how much the ranking loses, and to which fixed choice."""
    got: dict[str, list[float]] = {"ranked": [], "oracle": [], "largest": [], "smallest": []}
    for s in samples:
        image, gt, ignore = load_sample(s)
        predictor.set_image(image)
        click = next_click(gt, np.zeros_like(gt, dtype=bool), ignore)
        if click is None:
            continue
        y, x, _ = click
        masks, scores, _ = predictor.predict(np.array([[x, y]]), np.array([1]))
        ious = [mask_iou(m, gt, ignore) for m in masks]
        areas = [int(m.sum()) for m in masks]
        got["ranked"].append(ious[int(np.argmax(scores))])
        got["oracle"].append(max(ious))
        got["largest"].append(ious[int(np.argmax(areas))])
        got["smallest"].append(ious[int(np.argmin(areas))])
        for i, v in enumerate(ious):
            got.setdefault(f"index{i}", []).append(v)
    return {k: float(np.mean(v)) for k, v in got.items()}


def at_input_size(model: Sam, size: int | None) -> Sam:
    """``model`` with its encoder run at ``size`` px (None: as trained). Every weight of a
    convolutional encoder and of the decoder is independent of the grid, so the same weights
    load; what changes is the scale the features see."""
    if size is None or size == model.img_size:
        return model
    cfg = model.config
    if cfg.image_encoder.kind != "efficientnet_lite":
        raise SystemExit("--img-size needs a convolutional (segany-lite) encoder")
    cfg = dataclasses.replace(
        cfg, image_encoder=dataclasses.replace(cfg.image_encoder, img_size=size)
    )
    return instantiate(cfg, model.state_dict(), f"{cfg.image_encoder.kind} at {size} px")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", help="NAME=weights.safetensors")
    ap.add_argument("--config", default=str(ROOT / "configs" / "segany_lite.json"))
    ap.add_argument("--masks", type=int, default=300)
    ap.add_argument("--clicks", type=int, default=10)
    ap.add_argument("--out", default=None)
    ap.add_argument("--davis", type=int, default=0, help="first-click ranking on N DAVIS too")
    ap.add_argument("--sets", help="comma list of train sets to keep (default: all)")
    ap.add_argument("--zoom-in", action="store_true", help="add a ZoomInPredictor row")
    ap.add_argument("--flip", action="store_true", help="add a zoom-in + flip row")
    ap.add_argument(
        "--refine", choices=list(REFINE_CHOICES), default="auto", help="Predictor mask refinement"
    )
    ap.add_argument("--refine-radius", type=float, help="refinement window, mask cells")
    ap.add_argument("--refine-eps", type=float, help="refinement regulariser")
    ap.add_argument("--keep-clicks", action="store_true", help="refinement keeps the clicks")
    ap.add_argument("--refine-fit-scale", type=int, help="refinement fitted at 1/N (1: full res)")
    ap.add_argument("--expansion", type=float, default=2.0, help="zoom-in crop growth")
    ap.add_argument("--min-crop", type=float, default=0.3, help="zoom-in shortest crop side")
    ap.add_argument("--zoom-boxes", action="store_true", help="zoom-in: boxes on a crop too")
    ap.add_argument("--no-plain", action="store_true", help="skip the plain predictor's row")
    ap.add_argument(
        "--img-size", type=int, help="run the weights at this input size (no retraining)"
    )
    args = ap.parse_args()
    keep = set(args.sets.split(",")) if args.sets else None
    refine: object = REFINE_CHOICES[args.refine]
    given = {
        "radius": args.refine_radius,
        "eps": args.refine_eps,
        "keep_clicks": args.keep_clicks or None,
        "fit_scale": args.refine_fit_scale,
    }
    if any(v is not None for v in given.values()):
        refine = GuidedRefiner(**{k: v for k, v in given.items() if v is not None})
    held = held_out_images(Path(args.config))
    train = ROOT.parent / "shared" / "data" / "train"
    samples = [
        s
        for d in sorted(train.iterdir())
        if (d / "manifest.jsonl").is_file() and (keep is None or d.name in keep)
        for s in ManifestDataset(d)
        if Path(s.image_path).resolve() in held
    ]
    samples = samples[:: max(1, len(samples) // args.masks)][: args.masks]
    print(f"{len(samples)} held-out masks")
    ds = MaskDataset(samples, check_files=False)
    results = {}
    for name, weights in (m.split("=", 1) for m in args.models):
        predictor = Predictor(
            at_input_size(build_model(checkpoint=weights), args.img_size), refine=refine
        )
        rank = first_click_ranking(predictor, samples)
        print(
            f"{name}: first click, candidate " + "  ".join(f"{k} {v:.3f}" for k, v in rank.items())
        )
        if args.davis:
            davis = list(DavisDataset(DAVIS))[: args.davis]
            d_rank = first_click_ranking(predictor, davis)
            print(
                f"{name}: DAVIS first {len(davis)}, first click, candidate "
                + "  ".join(f"{k} {v:.3f}" for k, v in d_rank.items())
            )
        rows: list[tuple[str, object]] = [] if args.no_plain else [(name, predictor)]
        zoom = dict(expansion=args.expansion, min_crop=args.min_crop, zoom_boxes=args.zoom_boxes)
        if args.zoom_in:
            rows.append((f"{name} +zoom-in", ZoomInPredictor(predictor, **zoom)))
        if args.flip:
            flipped = ZoomInPredictor(Predictor(predictor.model, refine=refine), flip=True, **zoom)
            rows.append((f"{name} +zoom-in +flip", flipped))
        for row, pred in rows:
            r = evaluate_interactive(pred, ds, max_clicks=args.clicks)
            results[row] = {
                "first_click": rank,
                "noc85": r["noc"]["85"],
                "noc90": r["noc"]["90"],
                "miou_at": r["miou_at"],
                "box_miou": r["box_miou"],
                "clicks_obeyed_at": r["clicks_obeyed_at"],
                "seconds_per_prediction": r["seconds_per_prediction"],
            }
            miou = " / ".join(f"{v:.3f}" for v in r["miou_at"][:5])
            at = min(5, args.clicks)  # clicks obeyed after 5, or after all when fewer
            print(
                f"{row}: NoC@85 {r['noc']['85']:.2f}  NoC@90 {r['noc']['90']:.2f}  "
                f"mIoU@1-5 {miou}  @{args.clicks} {r['miou_at'][-1]:.3f}  "
                f"box {r['box_miou']:.3f}  clicks obeyed @{at} {r['clicks_obeyed_at'][at - 1]:.2f} "
                f"@{args.clicks} {r['clicks_obeyed_at'][-1]:.2f}  {1000 * r['seconds_per_prediction']:.0f} ms/prediction"
            )
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
