"""Frozen-encoder feature cache: run the backbone once per image, train the rest many times.

Images come as :class:`ImageRecord` lists, e.g. from the training config's ``data`` entries
(manifest folders, COCO JSON, image/mask folders) via :func:`records_from_datasets`.

Layout of a cache folder (resumable: images already written are skipped on a rerun)::

    index.json           settings, per-image records, per-mask records
    feat_s{4,8,16,32}.npy  N x C x h x w float16 backbone features (np.lib.format memmaps)
    masks.npy            M x S x S/8 uint8: masks in the padded input frame at S = img_size/2,
                         bit-packed along rows (np.packbits)
    done.npy             N bool: images whose features are written
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from ..images import load_image
from ..transforms import ResizeLongestSide
from .datasets import ImageRecord, load_record_masks, mask_source, records_from_datasets

__all__ = ["FeatureCache", "ImageRecord", "build_cache", "records_from_datasets"]

logger = logging.getLogger(__name__)


class FeatureCache:
    """Read access to a cache folder (features as float32 tensors, masks as bool arrays)."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        with open(self.folder / "index.json") as fh:
            self.index: dict[str, Any] = json.load(fh)
        self.images: list[dict[str, Any]] = self.index["images"]
        self.masks: list[dict[str, Any]] = self.index["masks"]
        self.strides: list[int] = self.index["strides"]
        self.feats = [np.load(self.folder / f"feat_s{s}.npy", mmap_mode="r") for s in self.strides]
        self.mask_bits = np.load(self.folder / "masks.npy", mmap_mode="r")
        done = np.load(self.folder / "done.npy")
        if not done.all():
            raise ValueError(
                f"feature cache {self.folder} is incomplete ({int(done.sum())}/{len(done)} "
                "images); rerun the cache command to finish it"
            )
        self.mask_size: int = self.index["mask_size"]

    def __len__(self) -> int:
        return len(self.images)

    def features(self, idx: list[int]) -> list[torch.Tensor]:
        return [torch.from_numpy(np.asarray(f[idx], dtype=np.float32)) for f in self.feats]

    def mask(self, mask_idx: int) -> np.ndarray:
        return np.unpackbits(self.mask_bits[mask_idx], axis=-1)[:, : self.mask_size].astype(bool)


def build_cache(
    records: list[ImageRecord],
    folder: str | os.PathLike[str],
    *,
    backbone: str = "lite0",
    img_size: int = 512,
    batch_size: int = 4,
    progress: bool = True,
) -> Path:
    """Writes (or completes) a feature cache for ``records`` with the pretrained backbone."""
    from tqdm import tqdm

    from ..modeling.efficientnet import load_pretrained_backbone

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    net = load_pretrained_backbone(backbone).eval()
    strides = list(net.feature_strides)
    mask_size = img_size // 2
    transform = ResizeLongestSide(img_size)
    index_path = out / "index.json"
    settings = {
        "backbone": backbone,
        "img_size": img_size,
        "mask_size": mask_size,
        "strides": strides,
        "n_images": len(records),
    }
    if index_path.exists():
        with open(index_path) as fh:
            old = json.load(fh)
        if {k: old.get(k) for k in settings} != settings:
            raise ValueError(f"{out} holds a cache made with other settings: {old}")
        index = old
    else:
        index = dict(settings, images=[], masks=[])
        for i, rec in enumerate(records):
            first = len(index["masks"])
            for sample in rec.masks:
                index["masks"].append({"image": i, "path": mask_source(sample)})
            index["images"].append(
                {
                    "id": rec.image_id,
                    "set": rec.set_name,
                    "path": str(rec.image),
                    "first_mask": first,
                    "n_masks": len(rec.masks),
                }
            )
        with open(index_path, "w") as fh:
            json.dump(index, fh)
    n, m = len(records), len(index["masks"])
    with torch.no_grad():
        probe = net(torch.zeros(1, 3, img_size, img_size))
    feats = []
    for s, f in zip(strides, probe):
        feat_path = out / f"feat_s{s}.npy"
        shape = (n, *(int(d) for d in f.shape[1:]))
        if feat_path.exists():
            feats.append(np.load(feat_path, mmap_mode="r+"))
        else:
            feats.append(np.lib.format.open_memmap(feat_path, "w+", np.float16, shape))
    mask_path = out / "masks.npy"
    masks = (
        np.load(mask_path, mmap_mode="r+")
        if mask_path.exists()
        else np.lib.format.open_memmap(mask_path, "w+", np.uint8, (m, mask_size, mask_size // 8))
    )
    done_path = out / "done.npy"
    done = np.load(done_path) if done_path.exists() else np.zeros(n, dtype=bool)
    todo = [i for i in range(n) if not done[i]]
    mean = torch.tensor(net.pixel_mean).view(1, 3, 1, 1)
    std = torch.tensor(net.pixel_std).view(1, 3, 1, 1)
    bar = tqdm(total=len(todo), desc="caching features", unit="img", disable=not progress)
    for start in range(0, len(todo), batch_size):
        chunk = todo[start : start + batch_size]
        batch = torch.zeros(len(chunk), 3, img_size, img_size)
        for j, i in enumerate(chunk):
            image = load_image(records[i].image)
            resized = transform.apply_image(image)
            h, w = resized.shape[:2]
            t = torch.as_tensor(resized).permute(2, 0, 1).float()
            batch[j, :, :h, :w] = (t - mean[0]) / std[0]
            index["images"][i].update(orig_hw=list(image.shape[:2]), input_hw=[h, w])
            rec = index["images"][i]
            gts = load_record_masks(records[i], image.shape[:2])
            for k in range(rec["n_masks"]):
                masks[rec["first_mask"] + k] = _mask_bits(gts[k], (h, w), mask_size)
        with torch.no_grad():
            out_feats = net(batch)
        for f_arr, f in zip(feats, out_feats):
            f_arr[chunk] = f.numpy().astype(np.float16)
        done[chunk] = True
        if (start // batch_size) % 25 == 0 or start + batch_size >= len(todo):
            for f_arr in feats:
                f_arr.flush()
            masks.flush()
            np.save(done_path, done)
            with open(index_path, "w") as fh:
                json.dump(index, fh)
        bar.update(len(chunk))
    bar.close()
    return out


def _mask_bits(mask: np.ndarray, input_hw: tuple[int, int], size: int) -> np.ndarray:
    """``H x W`` bool mask -> ``size x size/8`` packed bits in the padded input frame at half
    resolution (area-resized, kept where at least half covered)."""
    h, w = max(1, round(input_hw[0] / 2)), max(1, round(input_hw[1] / 2))
    soft = cv2.resize(mask.astype(np.float32), (w, h), interpolation=cv2.INTER_AREA)
    frame = np.zeros((size, size), dtype=bool)
    frame[:h, :w] = soft >= 0.5
    return np.packbits(frame, axis=-1)
