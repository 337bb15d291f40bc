"""What the cached-mode horizontal flip (``TrainConfig.hflip_prob``) gives the model.

With cached features the trainer mirrors the feature maps, not the photo. This prints

1. for a few training photos, the relative difference (Frobenius norm, image region only)
   between the mirrored features of the photo and the features of the mirrored photo, per
   stride: zero would mean the flip is a true photo flip;
2. for a checkpoint, the IoU per round (a box or a click, then corrective clicks) on masks of
   the held-out images with the real cached features and with the mirrored ones (and mirrored
   masks): how differently the model treats the two.

    .venv/bin/python benchmarks/cached_flip_check.py --config configs/segany_lite_stage9.json \
        --checkpoint artifacts/segany_lite_stage9/model.safetensors
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from segany import load_image
from segany.modeling.efficientnet import load_pretrained_backbone
from segany.train.cache import FeatureCache
from segany.train.trainer import TrainConfig, Trainer, build_training_model
from segany.transforms import ResizeLongestSide

ROOT = Path(__file__).resolve().parents[1]


def feature_differences(photos: list[Path], backbone: str, img_size: int) -> None:
    net = load_pretrained_backbone(backbone).eval()
    resize = ResizeLongestSide(img_size)
    for path in photos:
        im = resize.apply_image(load_image(path))
        h, w = im.shape[:2]
        batch = np.zeros((2, img_size, img_size, 3), np.uint8)
        batch[0, :h, :w] = im
        batch[1, :h, :w] = im[:, ::-1]
        x = net.normalize(torch.from_numpy(batch).permute(0, 3, 1, 2).float())
        with torch.no_grad():
            feats = net(x)
        rel = []
        for s, f in zip(net.feature_strides, feats):
            hh, vw = -(-h // s), -(-w // s)
            mirrored = f[0, :, :hh, :vw].flip(-1)
            real = f[1, :, :hh, :vw]
            rel.append(float((mirrored - real).norm() / real.norm()))
        cells = "  ".join(f"s{s} {r:.2f}" for s, r in zip(net.feature_strides, rel))
        print(f"{path.name} {h}x{w}: mirrored features vs features of the mirrored photo: {cells}")


def model_ious(config: Path, checkpoint: str | None, n_images: int, rounds: int) -> None:
    cfg = TrainConfig.from_json(config)
    cfg.init_from = checkpoint or cfg.init_from
    with tempfile.TemporaryDirectory() as out:
        cfg.out_dir = out
        trainer = Trainer(build_training_model(cfg), cfg, FeatureCache(ROOT / cfg.cache_dir))
        trainer.model.eval()
        pool = [int(i) for i in trainer.val_idx if int(i) in trainer.usable][:n_images]
        got: dict[tuple[bool, str], list[list[float]]] = {}
        with torch.no_grad():
            for i in pool:
                ids = trainer.usable[i][:3]
                for flip in (False, True):
                    feats, gts, valid = trainer._load([i], [ids], [flip])
                    emb, hr = trainer._embed(feats, len(ids))
                    for kind in ("box", "point"):
                        trainer.rng = np.random.default_rng(i)  # same clicks both ways
                        _, _, ious = trainer._rollout(
                            emb, hr, gts, valid, rounds, train=False, kind=kind, center_prob=1.0
                        )
                        got.setdefault((flip, kind), []).append(ious)
    print(f"{len(pool)} held-out images, up to 3 masks each, mean IoU per round:")
    for (flip, kind), rows in got.items():
        per_round = " / ".join(f"{v:.3f}" for v in np.mean(rows, axis=0))
        print(f"  {'mirrored' if flip else 'real'} features, {kind} first: {per_round}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "segany_lite_stage9.json"))
    ap.add_argument("--checkpoint", help="weights to check (default: the config's init_from)")
    ap.add_argument("--photos", type=int, default=4, help="COCO_MVal photos for part 1")
    ap.add_argument("--images", type=int, default=100, help="held-out images for part 2")
    ap.add_argument("--rounds", type=int, default=2, help="corrective rounds")
    args = ap.parse_args()
    cfg = TrainConfig.from_json(args.config)
    enc = cfg.model.get("image_encoder", {}) if isinstance(cfg.model, dict) else {}
    photos = sorted((ROOT.parent / "shared/data/train/COCO_MVal/images").iterdir())
    feature_differences(
        photos[: args.photos], enc.get("backbone", "lite0"), enc.get("img_size", 512)
    )
    model_ious(Path(args.config), args.checkpoint, args.images, args.rounds)


if __name__ == "__main__":
    main()
