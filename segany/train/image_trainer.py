"""Raw-image training (``mode: "images"``): the image encoder runs on augmented images each step.

For any registered model (official SAM ViT-B/L/H, segany-lite, custom configs). Which
parameters learn is the config's ``trainable`` (default: the encoder's neck + prompt encoder +
mask decoder) plus LoRA adapters when the config has a ``lora`` section; when nothing in the
image encoder learns it runs without gradient; when it does, ViT attention takes its reference
path (the explicit attention matrix autograd needs). BatchNorm statistics of the encoder stay
frozen (batches of a few images would only add noise to them).

A micro-batch: ``images_per_step`` training images, each loaded with all its masks, flipped,
scale-jittered and cropped/padded into the model input frame (:mod:`segany.train.augment`);
then, with ``copy_paste_prob``, an object of another image of the batch is pasted on it (a new
mask that occludes the ones under it). ``masks_per_image`` masks of each image (at least
``min_mask_pixels`` in the mask frame) are prompted as in the cached mode.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..images import ImageLoadError, load_image
from ..modeling.image_encoder import Attention as VitAttention
from ..modeling.sam import Sam
from .augment import FrameSample, copy_paste, downsample_masks, to_frame
from .augment import hflip as flip_lr
from .datasets import ImageRecord, load_record_masks, records_from_datasets
from .lora import LoRAConfig, add_lora, lora_modules, save_lora, set_trainable
from .trainer import TrainConfig, TrainerBase, split_indices

logger = logging.getLogger(__name__)

#: ``trainable`` when the config does not say: what the cached mode trains.
DEFAULT_TRAINABLE = ("neck", "decoder")


class ImageTrainer(TrainerBase):
    """Trains ``model`` on images and masks (``config.data`` unless ``records`` are given)."""

    def __init__(
        self, model: Sam, config: TrainConfig, records: list[ImageRecord] | None = None
    ) -> None:
        if config.mode != "images":
            raise ValueError(f"ImageTrainer trains on images; mode is {config.mode!r}")
        self.lora_config = LoRAConfig.from_dict(config.lora) if config.lora is not None else None
        if self.lora_config is not None and not lora_modules(model):
            names = add_lora(model, self.lora_config)
            logger.info("LoRA adapters on %d layers", len(names))
        if config.trainable is None:
            groups = list(DEFAULT_TRAINABLE)
        elif isinstance(config.trainable, str):
            groups = config.trainable.split("+")
        else:
            groups = [g for item in config.trainable for g in item.split("+")]
        if self.lora_config is not None and "lora" not in groups:
            groups.append("lora")
        trainable = set_trainable(model, groups)
        super().__init__(model, config, model.img_size // 2)
        self.trainable_names = trainable
        self.encoder_trainable = any(p.requires_grad for p in model.image_encoder.parameters())
        n_train = sum(p.numel() for p in self.params)
        logger.info(
            "training %d of %d parameters (%s)",
            n_train,
            sum(p.numel() for p in model.parameters()),
            "+".join(groups),
        )
        self.records = records if records is not None else records_from_datasets(config.data)
        if not self.records:
            raise ValueError("no training images: the config's 'data' lists no dataset")
        self.train_idx, self.val_idx = split_indices(
            len(self.records), config.val_fraction, config.split_seed
        )
        if len(self.train_idx) < config.images_per_step:
            raise ValueError(
                f"{len(self.train_idx)} training images but images_per_step is "
                f"{config.images_per_step}"
            )
        self.unusable: set[int] = set()  #: images without a big-enough mask (found lazily)
        mean = torch.as_tensor(model.pixel_mean, dtype=torch.float32).reshape(3, 1, 1)
        std = torch.as_tensor(model.pixel_std, dtype=torch.float32).reshape(3, 1, 1)
        self._mean, self._std = mean.cpu(), std.cpu()

    # ---------------------------------------------------------------- data
    def _load(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        rec = self.records[i]
        try:
            image = load_image(rec.image)
        except ImageLoadError as exc:
            raise ValueError(f"{rec.image}: cannot load the image: {exc.reason}") from exc
        return image, load_record_masks(rec, image.shape[:2])

    def _mask_frame(self, sample: FrameSample) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(masks, valid) in the mask frame and the indices of the big-enough masks."""
        factor = self.model.img_size // self.mask_size
        masks = downsample_masks(sample.masks, factor)
        valid = downsample_masks(sample.valid[None], factor)[0]
        areas = masks.reshape(len(masks), -1).sum(1)
        return masks, valid, np.flatnonzero(areas >= self.cfg.min_mask_pixels)

    def _prepare(self, i: int, augment: bool) -> FrameSample | None:
        """Image ``i`` in the input frame (flip, scale jitter, crop when ``augment``); falls
        back to the plain resize (flip kept) when jitter leaves no usable mask; None when even
        that has none."""
        cfg = self.cfg
        image, masks = self._load(i)
        size = self.model.img_size
        if augment:
            if self.rng.random() < cfg.hflip_prob:
                image, masks = flip_lr(image, masks)
            lo, hi = cfg.scale_range
            scale = float(self.rng.uniform(lo, hi)) if hi > lo else float(lo)
            offset = (float(self.rng.random()), float(self.rng.random()))
            if scale != 1.0:
                sample = to_frame(image, masks, size, scale=scale, offset=offset)
                if len(self._mask_frame(sample)[2]):
                    return sample
        sample = to_frame(image, masks, size)
        return sample if len(self._mask_frame(sample)[2]) else None

    def _sample_images(self) -> list[FrameSample]:
        cfg = self.cfg
        while True:
            pool = [int(i) for i in self.train_idx if int(i) not in self.unusable]
            if len(pool) < cfg.images_per_step:
                raise ValueError(
                    f"only {len(pool)} training images have a mask of at least "
                    f"{cfg.min_mask_pixels} pixels (mask frame); images_per_step is "
                    f"{cfg.images_per_step}"
                )
            picked = [int(i) for i in self.rng.choice(pool, cfg.images_per_step, replace=False)]
            items = []
            for i in picked:
                item = self._prepare(i, augment=True)
                if item is None:
                    logger.warning(
                        "%s: no mask big enough to train on, skipped", self.records[i].image
                    )
                    self.unusable.add(i)
                    break
                items.append(item)
            else:
                return items

    def _copy_paste(self, items: list[FrameSample]) -> list[FrameSample]:
        cfg = self.cfg
        if len(items) < 2 or cfg.copy_paste_prob <= 0:
            return items
        factor2 = (self.model.img_size // self.mask_size) ** 2
        min_area = cfg.min_mask_pixels * factor2  # in input-frame pixels
        out = list(items)
        for b in range(len(items)):
            if self.rng.random() >= cfg.copy_paste_prob:
                continue
            src = items[(b + 1 + int(self.rng.integers(len(items) - 1))) % len(items)]
            areas = src.masks.reshape(len(src.masks), -1).sum(1)
            objs = np.flatnonzero(areas >= min_area)
            if not len(objs):
                continue
            obj = int(objs[int(self.rng.integers(len(objs)))])
            pasted = copy_paste(items[b], src, obj, min_area=min_area)
            if len(self._mask_frame(pasted)[2]):
                out[b] = pasted
        return out

    def _pixels(self, items: list[FrameSample]) -> torch.Tensor:
        """``B x 3 x S x S`` normalised model input, zeros outside the valid region."""
        x = torch.from_numpy(np.stack([it.image for it in items])).permute(0, 3, 1, 2).float()
        x = (x - self._mean) / self._std
        valid = torch.from_numpy(np.stack([it.valid for it in items]))[:, None]
        return (x * valid).to(self.device)

    @contextmanager
    def _reference_attention(self, enabled: bool) -> Iterator[None]:
        """ViT attention on its reference path (explicit attention matrix, which autograd
        handles) while ``enabled``; the fused inference path is restored afterwards."""
        mods = [
            m
            for m in self.model.image_encoder.modules()
            if enabled and isinstance(m, VitAttention) and m.fused
        ]
        for m in mods:
            m.fused = False
        try:
            yield
        finally:
            for m in mods:
                m.fused = True

    def _encode(self, x: torch.Tensor, per_image: int):
        grad = self.encoder_trainable and torch.is_grad_enabled()
        with torch.set_grad_enabled(grad), self._autocast(), self._reference_attention(grad):
            emb, hr = self.model.encode_image(x)
        rep = lambda t: t.repeat_interleave(per_image, dim=0)  # noqa: E731
        return rep(emb), None if hr is None else [rep(h) for h in hr]

    # ---------------------------------------------------------------- hooks
    def _set_train_mode(self) -> None:
        """Train mode, except frozen encoder parts (no dropout / drop-path there) and every
        BatchNorm (statistics stay as loaded)."""
        self.model.train()
        enc = self.model.image_encoder
        for child in [enc, *enc.children()]:
            if not any(p.requires_grad for p in child.parameters()):
                child.eval()
        for m in enc.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()

    def _train_batch(self):
        cfg = self.cfg
        items = self._copy_paste(self._sample_images())
        gts, valid = [], []
        for it in items:
            masks, v, usable = self._mask_frame(it)
            replace = len(usable) < cfg.masks_per_image
            pick = self.rng.choice(len(usable), cfg.masks_per_image, replace=replace)
            gts.extend(masks[usable[int(k)]] for k in pick)
            valid.extend([v] * cfg.masks_per_image)
        emb, hr = self._encode(self._pixels(items), cfg.masks_per_image)
        return emb, hr, np.stack(gts), np.stack(valid)

    def _val_batches(self):
        pool = [int(i) for i in self.val_idx if int(i) not in self.unusable]
        per_img = max(1, math.ceil(self.cfg.val_masks / max(1, len(pool))))
        done = 0
        for i in pool:
            item = self._prepare(i, augment=False)
            if item is None:
                self.unusable.add(i)
                continue
            masks, v, usable = self._mask_frame(item)
            ids = usable[:per_img]
            emb, hr = self._encode(self._pixels([item]), len(ids))
            yield emb, hr, masks[ids], np.stack([v] * len(ids))
            done += len(ids)
            if done >= self.cfg.val_masks:
                break

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Trainable parameters (adapters included) and buffers; frozen weights come from
        the initial model."""
        keep = set(self.trainable_names) | {n for n, _ in self.model.named_buffers()}
        return {k: v for k, v in self.model.state_dict().items() if k in keep}

    def _extra_state(self) -> dict[str, Any]:
        return {"unusable": sorted(self.unusable)}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.unusable = {int(i) for i in state.get("unusable", [])}

    def export(self, path: str | os.PathLike[str]) -> Path:
        """The merged model (see :meth:`TrainerBase.export`) and, with LoRA, the adapters
        alone as ``lora.safetensors`` beside it."""
        out = super().export(path)
        if self.lora_config is not None:
            save_lora(self.model, out.with_name("lora.safetensors"), self.lora_config)
        return out
