"""Pictures for the docs: the bundled model on a few val/DAVIS photos (never trained on).

For each image: one click at the protocol's first click (the interior point farthest from the
object's boundary) with the best of the three candidates, the ground-truth box as a prompt, and
"segment everything" with the default generator settings. Writes side-by-side PNGs to
``docs/`` (``--out``).

    .venv/bin/python benchmarks/docs_figures.py --images 003 027 101 240
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from segany import AutomaticMaskGenerator, Predictor, build_model, load_image
from segany.data import load_mask
from segany.evaluate import next_click
from segany.masks import atomic_write, overlay

DAVIS = Path(__file__).resolve().parents[2] / "shared" / "data" / "val" / "DAVIS"


def _label(panel: np.ndarray, text: str) -> np.ndarray:
    import cv2

    out = panel.copy()
    cv2.rectangle(out, (0, 0), (12 + 11 * len(text), 30), (0, 0, 0), -1)
    cv2.putText(out, text, (6, 21), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (255, 255, 255), 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", help="model file (default: the bundled segany-lite)")
    ap.add_argument("--data", type=Path, default=DAVIS)
    ap.add_argument("--images", nargs="+", default=["003", "027", "101", "240"])
    ap.add_argument("--out", type=Path, default=Path("docs"))
    # default: the model's own filter thresholds (segany-lite's are calibrated on held-out
    # training images; SAM's 0.88 / 0.95 / 1.0 keep no mask with it)
    ap.add_argument("--pred-iou-thresh", type=float)
    ap.add_argument("--stability-score-thresh", type=float)
    ap.add_argument("--stability-score-offset", type=float)
    args = ap.parse_args()
    model = build_model(checkpoint=args.checkpoint) if args.checkpoint else build_model()
    predictor = Predictor(model)
    generator = AutomaticMaskGenerator(
        model,
        pred_iou_thresh=args.pred_iou_thresh,
        stability_score_thresh=args.stability_score_thresh,
        stability_score_offset=args.stability_score_offset,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    for stem in args.images:
        image = load_image(args.data / "images" / f"{stem}.jpg")
        gt = load_mask(args.data / "masks" / f"{stem}.png")
        predictor.set_image(image)
        y, x, _ = next_click(gt, np.zeros_like(gt), None, np.zeros_like(gt))
        masks, scores, _ = predictor.predict(np.array([[x, y]]), np.array([1]))
        best = int(np.argmax(scores))
        ys, xs = np.nonzero(gt)
        box = np.array([xs.min(), ys.min(), xs.max(), ys.max()])
        box_mask, _, _ = predictor.predict(box=box, multimask_output=False)
        records = generator.generate(image)
        panels = [
            _label(overlay(image, masks[best][None], points=[[x, y]]), "1 click"),
            _label(overlay(image, box_mask, boxes=[box]), "box"),
            _label(
                overlay(image, [r["segmentation"] for r in records], draw_contours=False),
                f"everything: {len(records)} masks",
            ),
        ]
        sheet = np.concatenate(panels, axis=1)
        from PIL import Image

        path = args.out / f"davis_{stem}.png"
        with atomic_write(path) as fh:
            Image.fromarray(sheet).save(fh, format="PNG", optimize=True)
        print(f"wrote {path}: 1-click score {scores[best]:.2f}, {len(records)} masks")


if __name__ == "__main__":
    main()
