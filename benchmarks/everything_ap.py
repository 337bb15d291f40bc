"""COCO mask AP / AR of "segment everything" and of GT-box prompts on held-out training images.

By default the images are those of ``--data`` (COCO_panoptic200: every COCO panoptic segment,
things and stuff, crowd regions flagged) that the trainer holds out for validation: the
trainer splits the images of its config's ``data`` folders with
``segany.train.trainer.split_indices(n, val_fraction, split_seed)``, in the order of the feature
cache's ``index.json`` (or, without a cache, of the manifests). ``--split all`` takes every
image; ``--limit N`` the first N of the selection. Nothing here is trained or tuned on.

Evaluation: :mod:`segany.evaluate_coco` (pycocotools COCOeval, segm, class-agnostic). Prints
one line per task and writes the JSON reports (``--out``).

    .venv/bin/python benchmarks/everything_ap.py                        # the bundled model
    .venv/bin/python benchmarks/everything_ap.py --checkpoint run/model.safetensors --limit 20
    .venv/bin/python benchmarks/everything_ap.py --task box --baseline grabcut   # a floor
    .venv/bin/python benchmarks/everything_ap.py --oracle    # GT as predictions: AP must be 1
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from segany import CheckpointError, build_model
from segany.data import ManifestDataset, MaskDataset
from segany.evaluate import GrabCutPredictor, save_report
from segany.evaluate_coco import (
    ImageTargets,
    evaluate_box_prompted,
    evaluate_everything,
    iter_image_targets,
    summary_line,
)

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "train" / "COCO_panoptic200"
CONFIG = ROOT / "configs" / "segany_lite.json"


def held_out_images(config_path: Path) -> set[Path]:
    """Image files the trainer of ``config_path`` holds out for validation."""
    from segany.train.trainer import split_indices

    cfg = json.loads(config_path.read_text())
    val_fraction = float(cfg.get("val_fraction", 0.05))
    seed = int(cfg.get("split_seed", 0))  # the held-out split's seed (not the sampling seed)
    index = ROOT / cfg.get("cache_dir", "") / "index.json"
    if cfg.get("cache_dir") and index.is_file():
        paths = [ROOT / img["path"] for img in json.loads(index.read_text())["images"]]
        source = str(index)
    else:  # the order the cache (or the image trainer) gives them: the trainer's records
        from segany.train.datasets import records_from_datasets

        cwd = os.getcwd()
        os.chdir(ROOT)  # the config's data paths are relative to the repository root
        try:
            paths = [ROOT / r.image for r in records_from_datasets(cfg.get("data", []))]
        finally:
            os.chdir(cwd)
        source = f"records of {config_path}"
    _, val_idx = split_indices(len(paths), val_fraction, seed)
    held = {paths[i].resolve() for i in val_idx}
    logging.info("%d of %d images held out (%s)", len(held), len(paths), source)
    return held


def select(args: argparse.Namespace) -> MaskDataset:
    ds = ManifestDataset(args.data)
    samples = list(ds)
    if args.split == "holdout":
        held = held_out_images(Path(args.config))
        samples = [s for s in samples if Path(s.image_path).resolve() in held]
        if not samples:
            sys.exit(f"no image of {args.data} is held out by {args.config}; use --split all")
    if args.things_only:
        samples = [s for s in samples if s.meta.get("isthing", 1) and s.meta.get("kind") != "stuff"]
    return MaskDataset(samples, check_files=False)


class OracleGenerator:
    """The ground truth as "generated" masks (a check of the data path: AP must be 1)."""

    def __init__(self, targets: list[ImageTargets]) -> None:
        self.by_image = {t.image.tobytes(): t for t in targets}

    def generate(self, image: np.ndarray) -> list[dict[str, Any]]:
        t = self.by_image[image.tobytes()]
        return [
            {"segmentation": t.masks[k], "predicted_iou": 1.0, "stability_score": 1.0}
            for k in t.objects
        ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", help="registered model name (default: the bundled segany-lite)")
    ap.add_argument("--checkpoint", help="weights file (.safetensors / official .pth)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--data", default=str(DATA), help="a manifest folder")
    ap.add_argument("--split", choices=["holdout", "all"], default="holdout")
    ap.add_argument("--config", default=str(CONFIG), help="training config of the hold-out")
    ap.add_argument("--things-only", action="store_true", help="drop stuff masks from the GT")
    ap.add_argument("--limit", type=int, help="first N selected images only")
    ap.add_argument("--task", choices=["everything", "box", "both"], default="both")
    ap.add_argument("--baseline", choices=["grabcut"], help="box task: a classical predictor")
    ap.add_argument("--oracle", action="store_true", help="GT as predictions (expects AP 1)")
    ap.add_argument("--points-per-side", type=int, default=32)
    ap.add_argument("--points-per-batch", type=int, default=64)
    ap.add_argument("--pred-iou-thresh", type=float, help="default: the model's own")
    ap.add_argument("--stability-score-thresh", type=float, help="default: the model's own")
    ap.add_argument("--stability-score-offset", type=float, help="default: the model's own")
    ap.add_argument("--box-nms-thresh", type=float, default=0.7)
    ap.add_argument("--crop-n-layers", type=int, default=0)
    ap.add_argument("--min-mask-region-area", type=int, default=0)
    ap.add_argument("--score", default="predicted_iou")
    ap.add_argument("--multimask", action="store_true", help="box: best of 3 candidates")
    ap.add_argument("--overlays", help="folder for GT | prediction PNGs")
    ap.add_argument("--n-overlays", type=int, default=6)
    ap.add_argument("--out", default="artifacts/everything_ap.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)

    dataset = select(args)
    n_images = len({s.image_path for s in dataset})
    print(f"data: {args.data} ({args.split}): {n_images} images, {len(dataset)} masks")
    model = None
    if not args.oracle and args.baseline is None:
        try:
            model = build_model(args.model, args.checkpoint, device=args.device)
        except CheckpointError as exc:
            sys.exit(f"{exc}\n(no bundled model yet? pass --checkpoint PATH)")
    name = (
        "oracle"
        if args.oracle
        else args.baseline
        or args.model
        or (Path(args.checkpoint).stem if args.checkpoint else "segany-lite")
    )
    tasks = ["everything", "box"] if args.task == "both" else [args.task]
    if args.baseline and "everything" in tasks:
        tasks.remove("everything")
        print("GrabCut has no 'segment everything' mode: box task only")
    common: dict[str, Any] = {"limit": args.limit, "n_overlays": args.n_overlays}
    results: dict[str, Any] = {"name": name, "data": args.data, "split": args.split}
    for task in tasks:
        overlays = Path(args.overlays) / task if args.overlays else None
        start = time.perf_counter()
        if task == "everything":
            if args.oracle:
                generator: Any = OracleGenerator(list(iter_image_targets(dataset, args.limit)))
            else:
                from segany import AutomaticMaskGenerator

                generator = AutomaticMaskGenerator(
                    model,
                    points_per_side=args.points_per_side,
                    points_per_batch=args.points_per_batch,
                    pred_iou_thresh=args.pred_iou_thresh,
                    stability_score_thresh=args.stability_score_thresh,
                    stability_score_offset=args.stability_score_offset,
                    box_nms_thresh=args.box_nms_thresh,
                    crop_n_layers=args.crop_n_layers,
                    min_mask_region_area=args.min_mask_region_area,
                    output_mode="coco_rle",
                )
            report = evaluate_everything(
                generator, dataset, score=args.score, overlays=overlays, **common
            )
        else:
            if args.baseline == "grabcut":
                predictor: Any = GrabCutPredictor()
            elif args.oracle:
                predictor = _BoxOracle(list(iter_image_targets(dataset, args.limit)))
            else:
                from segany import Predictor

                predictor = Predictor(model)
            report = evaluate_box_prompted(
                predictor, dataset, multimask=args.multimask, overlays=overlays, **common
            )
        report["wall_seconds"] = time.perf_counter() - start
        results[task] = report
        print(f"{name} {task}: {summary_line(report)}  [{report['wall_seconds']:.1f} s]")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    save_report(args.out, results)
    print(f"wrote {args.out}")


class _BoxOracle:
    """Returns the ground-truth mask whose tight box is the prompt."""

    def __init__(self, targets: list[ImageTargets]) -> None:
        self.tables: dict[bytes, dict[tuple[int, ...], np.ndarray]] = {}
        for t in targets:
            table = {}
            for k in t.objects:
                m = t.masks[k] if t.ignore is None else t.masks[k] & ~t.ignore
                ys, xs = np.nonzero(m)
                table[(xs.min(), ys.min(), xs.max(), ys.max())] = t.masks[k]
            self.tables[t.image.tobytes()] = table

    def set_image(self, image: np.ndarray) -> None:
        self.table = self.tables[image.tobytes()]

    def predict(self, box=None, multimask_output=False, return_logits=False, **kwargs):
        mask = self.table[tuple(int(v) for v in box)]
        return mask[None], np.ones(1, np.float32), np.zeros((1, 256, 256), np.float32)


if __name__ == "__main__":
    main()
