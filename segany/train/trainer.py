"""Training segany models with the SAM recipe, sized for CPUs.

Two modes share the prompt rollout, the losses, the schedule, checkpoints and logging
(:class:`TrainerBase`): :class:`Trainer` trains on cached frozen-encoder features
(``mode: "cached"``), :class:`segany.train.image_trainer.ImageTrainer` runs the image encoder
on augmented images every step (``mode: "images"``; frozen, partly trainable or with LoRA).

One step: a few images, several masks each; the image encoder (or the neck, on cached
features) runs once per image, the prompt encoder + mask decoder once per prompt and click
round. Round 0 is a point (best of
3 candidate masks is trained), a noisy box or a rough mask; then corrective clicks sampled
from the error of the previous prediction, with the previous low-res logits fed back, for a
random number of rounds run without gradient; round 0 and the last round carry the loss
(focal + dice 20:1 and MSE on the IoU head). AdamW with linear warm-up and cosine decay, bf16
autocast, gradient accumulation, checkpoints that resume exactly, a log of loss and
validation figures.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..modeling.config import SamConfig
from ..modeling.sam import Sam
from .cache import FeatureCache
from .lora import set_trainable
from .losses import click_loss, logits_at_clicks, mask_iou, sam_loss
from .prompts import corrective_click, initial_click, noisy_box, noisy_mask_logits

logger = logging.getLogger(__name__)

#: A cached mask's index, or several (their union: merged objects)
MaskId = int | tuple[int, ...]

#: State-dict prefix of a segany-lite model's backbone
BACKBONE = "image_encoder.backbone."


@dataclass
class TrainConfig:
    """Every knob of a run; saved in checkpoints and loadable from JSON."""

    cache_dir: str = "artifacts/cache"
    out_dir: str = "artifacts/run"
    steps: int = 3000
    images_per_step: int = 4
    masks_per_image: int = 8
    grad_accum: int = 1
    lr: float = 4e-4
    weight_decay: float = 0.05
    warmup_steps: int = 150
    min_lr_ratio: float = 0.05
    grad_clip: float = 1.0
    max_click_rounds: int = 8  #: extra rounds after round 0 (uniform 0..max, no grad but last)
    #: loss (and gradient) on every round, not only round 0 and the last: more signal for the
    #: single-mask token that refinement uses, at the cost of a backward pass per round
    loss_every_round: bool = False
    #: with ``loss_every_round``: the weight of round 0's loss (the first point, box or rough
    #: mask, which the first-click and box figures measure), the corrective rounds sharing a
    #: weight of 1 between them; None: every round weighs the same, 2 / (rounds + 1)
    first_round_weight: float | None = None
    prompt_probs: tuple[float, float, float] = (0.55, 0.3, 0.15)  #: point, box, rough mask
    center_click_prob: float = 0.5  #: innermost-error clicks vs uniform error clicks
    min_mask_pixels: int = 16  #: masks smaller than this (at the mask frame) are not sampled
    #: chance of a horizontal flip. Mode "images" mirrors the photo; cached mode mirrors the
    #: cached feature maps, which are not the features of the mirrored photo (the channels are
    #: not mirror-symmetric: relative difference ~1 at stride 4, 0.3-0.6 at stride 32 on COCO
    #: photos, ``benchmarks/cached_flip_check.py``), so there it is a feature-space
    #: augmentation rather than a photo flip
    hflip_prob: float = 0.5
    bf16: bool = True
    seed: int = 0  #: sampling, augmentation and initialisation
    #: the held-out split; separate from ``seed`` so a run continued from another (another
    #: seed) keeps the same held-out images and never trains on them
    split_seed: int = 0
    val_fraction: float = 0.05  #: images held out of the cache for validation
    val_masks: int = 60
    val_every: int = 250
    log_every: int = 20
    checkpoint_every: int = 100
    threads: int = 0  #: torch threads (0: leave as is)
    init_from: str | None = None  #: weights to start from (e.g. the shipped model)
    #: key prefixes ``init_from`` may lack: modules this config's model adds to those weights
    #: (e.g. ``["prompt_encoder.high_res_prompt."]``), which keep their fresh initialisation;
    #: every other key must be in the file (mode "cached" with a segany-lite config dict)
    init_missing: list[str] = field(default_factory=list)
    #: datasets: manifest folders, {"coco": JSON, "images": DIR}, {"images": DIR, "masks": DIR}
    data: list[Any] = field(default_factory=list)
    #: a SamConfig dict or a registered model name ("vit_b", "segany-lite", ...)
    model: dict[str, Any] | str = field(default_factory=dict)
    mode: str = "cached"  #: "cached" (feature cache, frozen backbone) or "images"
    device: str = "cpu"  #: torch device of the model and the losses
    #: cached mode: relative chance of drawing an image of each set (``{"CCP_clothing": 0.25}``;
    #: sets not named weigh 1); None: every image equally likely
    set_weights: dict[str, float] | None = None
    #: weight of the IoU head's MSE beside the focal + dice mask loss (SAM: 1)
    iou_weight: float = 1.0
    #: weight of a ranking term on the IoU head for multimask prompts (``sam_loss``'s
    #: ``rank_weight``; SAM: none)
    iou_rank_weight: float = 0.0
    #: weight of the click term (``losses.click_loss``: each candidate's logit at every click
    #: so far must have the click's sign) added to the loss of each round with a gradient
    click_weight: float = 0.0
    #: parameter groups to train (see ``segany.train.lora.set_trainable``); None: what the mode
    #: trains by default (cached: everything after the backbone; images: neck + decoder). With
    #: cached features the backbone can never train; e.g. ``"mask_decoder.iou_prediction_head.*"``
    #: recalibrates the predicted IoU alone
    trainable: str | list[str] | None = None
    #: cached mode: the backbone blocks after its stride-N feature train too (N one of the
    #: cache's strides but the last, e.g. 8): the cached features up to stride N feed them and
    #: the coarser ones are computed again each step, with gradients (batch norms keep their
    #: running statistics); None: the backbone stays frozen
    train_backbone_after: int | None = None
    #: the learning rate of trainable backbone parameters, as a fraction of ``lr``; 0 with
    #: ``train_backbone_after``: the tail runs from the cache (weights trained by an earlier
    #: stage) but stays frozen, e.g. to train the IoU head alone after such a stage
    backbone_lr_scale: float = 1.0
    #: cached mode: chance that a sampled mask becomes the union of itself and another mask of
    #: the same image (RITM's "merged objects"): one target of several objects, as annotators
    #: select them and as DAVIS's whole-frame masks are; 0 keeps every target one mask
    merge_objects_prob: float = 0.0
    # ---- mode "images" only
    lora: dict[str, Any] | None = None  #: LoRA adapters: {rank, alpha, dropout, targets}
    scale_range: tuple[float, float] = (0.5, 1.5)  #: scale jitter of the longest-side resize
    copy_paste_prob: float = 0.25  #: chance an image gets an object of another batch image

    def __post_init__(self) -> None:
        if self.mode not in ("cached", "images"):
            raise ValueError(f"training mode must be 'cached' or 'images', got {self.mode!r}")
        if self.mode == "cached" and self.lora is not None:
            raise ValueError("'lora' is a setting of mode 'images' (the backbone of cached "
                             "features is frozen; LoRA adapts the backbone)")  # fmt: skip
        if self.set_weights is not None and not all(
            math.isfinite(v) and v >= 0 for v in self.set_weights.values()
        ):
            raise ValueError(f"set_weights must be finite and >= 0, got {self.set_weights}")
        if self.train_backbone_after is not None and self.mode != "cached":
            raise ValueError("'train_backbone_after' is a setting of mode 'cached' (mode "
                             "'images' chooses what trains with 'trainable' or 'lora')")  # fmt: skip
        if not math.isfinite(self.backbone_lr_scale) or self.backbone_lr_scale < 0:
            raise ValueError(f"backbone_lr_scale must be >= 0, got {self.backbone_lr_scale}")
        if self.backbone_lr_scale == 0 and self.train_backbone_after is None:
            raise ValueError("backbone_lr_scale 0 freezes the tail of 'train_backbone_after', "
                             "which is not set (what trains is 'trainable')")  # fmt: skip
        if self.first_round_weight is not None and not self.loss_every_round:
            raise ValueError("'first_round_weight' is a setting of 'loss_every_round' (without "
                             "it round 0 and the last round weigh 1 each)")  # fmt: skip
        for name in ("iou_weight", "iou_rank_weight", "click_weight", "first_round_weight"):
            value = getattr(self, name)
            if value is None:
                continue
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        if not 0 <= self.merge_objects_prob <= 1:
            raise ValueError(f"merge_objects_prob must be in [0, 1], got {self.merge_objects_prob}")
        if self.merge_objects_prob and self.mode != "cached":
            raise ValueError("'merge_objects_prob' is a setting of mode 'cached'")
        if self.init_missing and not self.init_from:
            raise ValueError("'init_missing' names keys missing from 'init_from', which is not set")
        lo, hi = self.scale_range
        if not 0 < lo <= hi:
            raise ValueError(f"scale_range must be 0 < low <= high, got {self.scale_range}")

    @classmethod
    def from_json(cls, path: str | os.PathLike[str]) -> TrainConfig:
        with open(path) as fh:
            data = json.load(fh)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"{path}: unknown training settings {sorted(unknown)}")
        for key in ("prompt_probs", "scale_range"):
            if key in data:
                data[key] = tuple(data[key])
        return cls(**data)


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic train/validation split of image indices."""
    rng = np.random.default_rng(seed + 12345)
    perm = rng.permutation(n)
    n_val = int(round(n * val_fraction))
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


class TrainerBase:
    """What both training modes share: the prompt rollout and its losses, the optimiser and
    schedule, validation, checkpoints that resume exactly, the log and export.

    A subclass sets the trainable parameters before calling ``__init__`` and provides
    ``_train_batch`` (one micro-batch: embeddings repeated per mask, the masks and their
    valid regions in the mask frame), ``_val_batches`` and ``_set_train_mode``.
    """

    def __init__(self, model: Sam, config: TrainConfig, mask_size: int) -> None:
        self.model = model.to(config.device)
        self.cfg = config
        self.device = torch.device(config.device)
        self.mask_size = mask_size  #: side of the square mask frame (losses and clicks)
        self.out = Path(config.out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in named]
        groups: list[dict[str, Any]] = [{"params": self.params}]
        backbone = [p for n, p in named if n.startswith(BACKBONE)]
        if backbone and config.backbone_lr_scale != 1.0:
            ids = {id(p) for p in backbone}
            groups = [
                {"params": [p for p in self.params if id(p) not in ids]},
                {"params": backbone, "lr_scale": config.backbone_lr_scale},
            ]
        self.opt = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
        self.step = 0
        self.rng = np.random.default_rng(config.seed)
        self.log_path = self.out / "log.jsonl"

    # ---------------------------------------------------------------- subclass hooks
    def _set_train_mode(self) -> None:
        raise NotImplementedError

    def _train_batch(
        self,
    ) -> tuple[torch.Tensor, list[torch.Tensor] | None, np.ndarray, np.ndarray]:
        """``(embeddings N x C x h x w, high-res features or None, gts N x F x F bool,
        valid N x F x F bool)`` for ``N`` prompts, ``F = mask_size``."""
        raise NotImplementedError

    def _val_batches(
        self,
    ) -> Iterator[tuple[torch.Tensor, list[torch.Tensor] | None, np.ndarray, np.ndarray]]:
        """Held-out images one by one, as :meth:`_train_batch` without augmentation."""
        raise NotImplementedError

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The tensors a checkpoint needs (the rest comes from the initial weights)."""
        raise NotImplementedError

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    # ---------------------------------------------------------------- model pieces
    def _decode(self, emb, hr, points, boxes, mask_in, multimask: bool):
        return self.model.decode(
            emb, hr, points=points, boxes=boxes, masks=mask_in, multimask_output=multimask
        )

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.bf16)

    def _frame_scale(self) -> float:
        """Model input pixels per mask-frame pixel."""
        return self.model.img_size / self.mask_size

    def _to_input(self, xy: np.ndarray) -> np.ndarray:
        """Mask-frame pixel centres -> model input coordinates (as the predictor passes them)."""
        s = self._frame_scale()
        return xy * s + (s - 1) / 2

    def _upsample(self, low: torch.Tensor) -> torch.Tensor:
        size = self.mask_size
        return F.interpolate(low.float(), (size, size), mode="bilinear", align_corners=False)

    # ---------------------------------------------------------------- one step
    def _rollout(
        self,
        emb,
        hr,
        gts: np.ndarray,
        valid: np.ndarray,
        n_rounds: int,
        train: bool,
        kind: str | None = None,
        center_prob: float | None = None,
    ) -> tuple[torch.Tensor, dict[str, float], list[float]]:
        """Round 0 + ``n_rounds`` corrective rounds; loss on round 0 and the last round (on
        every round with ``loss_every_round``, rescaled to the weight of two rounds, or round 0
        weighing ``first_round_weight`` and the corrective rounds 1 together)."""
        cfg = self.cfg
        dev = self.device
        n = len(gts)
        cp = cfg.center_click_prob if center_prob is None else center_prob
        if kind is None:
            kind = str(self.rng.choice(["point", "box", "mask"], p=list(cfg.prompt_probs)))
        targets = torch.from_numpy(gts.astype(np.float32)).to(dev)
        clicks: list[list[tuple[float, float, int]]] = [[] for _ in range(n)]
        boxes = mask_in = None
        if kind == "point":
            for j in range(n):
                c = initial_click(gts[j], self.rng, cp)
                clicks[j].append((c.x, c.y, 1))
        elif kind == "box":
            b = np.stack([noisy_box(g, self.rng) for g in gts])
            s = self._frame_scale()
            boxes = torch.as_tensor(b * s + (s - 1) / 2, dtype=torch.float).to(dev)
        else:
            low = self.model.prompt_encoder.mask_input_size
            mask_in = torch.from_numpy(
                np.stack([noisy_mask_logits(g, self.rng, low) for g in gts])[:, None]
            ).to(dev)
        total = torch.zeros((), device=dev)
        first = torch.zeros((), device=dev)  # round 0's loss, weighed apart with first_round_weight
        stats: dict[str, float] = {}
        ious: list[float] = []
        prev_low = None
        for r in range(n_rounds + 1):
            points = self._points(clicks, pad=boxes is None)
            multimask = kind == "point" and r == 0
            with_grad = train and (r == 0 or r == n_rounds or cfg.loss_every_round)
            with torch.set_grad_enabled(with_grad), self._autocast():
                low, iou_pred = self._decode(emb, hr, points, boxes, mask_in, multimask)
                logits = self._upsample(low)
                if with_grad:
                    loss, st = sam_loss(
                        logits,
                        iou_pred,
                        targets,
                        best_of_candidates=multimask,
                        iou_weight=cfg.iou_weight,
                        rank_weight=cfg.iou_rank_weight,
                    )
                    if cfg.click_weight > 0 and clicks[0]:
                        xy, lab = self._frame_clicks(clicks)
                        closs = click_loss(logits, xy, lab).mean()
                        loss = loss + cfg.click_weight * closs
                        st["click"] = float(closs.detach())
                    if r == 0:
                        first = loss
                    else:
                        total = total + loss
                    for k, v in st.items():
                        stats[f"r{0 if r == 0 else 'last'}_{k}"] = v
            with torch.no_grad():
                best = (
                    iou_pred.float().argmax(1)
                    if multimask
                    else torch.zeros(n, dtype=torch.long, device=dev)
                )
                rows = torch.arange(n, device=dev)
                prev_low = low[rows, best].detach().float()[:, None]
                chosen = logits[rows, best].detach()
                ious.append(float(mask_iou(chosen, targets).mean()))
                if r == n_rounds:
                    if clicks[0]:
                        stats["click_ok"] = self._clicks_obeyed(chosen, clicks)
                    break
                pred = (chosen > 0).cpu().numpy()
                for j in range(n):
                    nxt = corrective_click(gts[j], pred[j], self.rng, cp, valid[j])
                    if nxt is None:  # perfect: click again on the object centre (harmless)
                        nxt = initial_click(gts[j], self.rng, 1.0)
                    clicks[j].append((nxt.x, nxt.y, int(nxt.positive)))
                mask_in = prev_low
        if train and cfg.loss_every_round and cfg.first_round_weight is not None:
            total = cfg.first_round_weight * first + total / max(n_rounds, 1)
        elif train and cfg.loss_every_round and n_rounds > 1:
            total = (first + total) * (2.0 / (n_rounds + 1))
        else:
            total = first + total
        return total, stats, ious

    def _frame_clicks(self, clicks) -> tuple[torch.Tensor, torch.Tensor]:
        """Clicks as mask-frame pixels ``N x K x 2`` (x, y) and labels ``N x K``."""
        xy = torch.tensor([[c[:2] for c in cl] for cl in clicks], dtype=torch.float)
        lab = torch.tensor([[c[2] for c in cl] for cl in clicks], dtype=torch.long)
        return xy.to(self.device), lab.to(self.device)

    def _clicks_obeyed(self, chosen: torch.Tensor, clicks) -> float:
        """Share of all clicks so far whose pixel the chosen masks (``N x F x F`` logits) put
        on the click's side."""
        xy, lab = self._frame_clicks(clicks)
        at = logits_at_clicks(chosen[:, None], xy)[:, 0]
        return float(((at > 0).long() == lab).float().mean())

    def _points(self, clicks, pad: bool):
        if not clicks[0]:
            return None
        xy = np.array([[c[:2] for c in cl] for cl in clicks], dtype=np.float64)
        lab = np.array([[c[2] for c in cl] for cl in clicks], dtype=np.int64)
        coords = torch.as_tensor(self._to_input(xy), dtype=torch.float).to(self.device)
        return coords, torch.as_tensor(lab, dtype=torch.int).to(self.device)

    def lr_at(self, step: int) -> float:
        cfg = self.cfg
        if step < cfg.warmup_steps:
            return cfg.lr * (step + 1) / cfg.warmup_steps
        t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        cos = 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
        return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cos)

    def train_step(self) -> dict[str, float]:
        cfg = self.cfg
        self._set_train_mode()
        for g in self.opt.param_groups:
            g["lr"] = self.lr_at(self.step) * g.get("lr_scale", 1.0)
        self.opt.zero_grad(set_to_none=True)
        agg: dict[str, float] = {}
        for _ in range(cfg.grad_accum):
            emb, hr, gts, valid = self._train_batch()
            n_rounds = int(self.rng.integers(0, cfg.max_click_rounds + 1))
            loss, stats, _ = self._rollout(emb, hr, gts, valid, n_rounds, train=True)
            (loss / cfg.grad_accum).backward()
            for k, v in stats.items():
                agg[k] = agg.get(k, 0.0) + v / cfg.grad_accum
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
        self.opt.step()
        self.step += 1
        agg["grad_norm"] = float(grad_norm)
        agg["lr"] = self.lr_at(self.step - 1)
        return agg

    @torch.no_grad()
    def validate(self, n_clicks: int = 5) -> dict[str, float]:
        """Held-out images, evaluation-protocol clicks (innermost error point), no flips."""
        self.model.eval()
        state = self.rng.bit_generator.state
        self.rng = np.random.default_rng(999)
        curves, box_ious, obeyed = [], [], []
        for emb, hr, gts, valid in self._val_batches():
            _, st, ious = self._rollout(
                emb, hr, gts, valid, n_clicks - 1, train=False, kind="point", center_prob=1.0
            )
            curves.append(ious)
            obeyed.append(st["click_ok"])
            _, _, bious = self._rollout(emb, hr, gts, valid, 0, train=False, kind="box")
            box_ious.append(bious[0])
        self.rng = np.random.default_rng()
        self.rng.bit_generator.state = state
        if not curves:
            return {}
        arr = np.array(curves)
        out = {f"val_miou@{k + 1}": float(arr[:, k].mean()) for k in range(arr.shape[1])}
        out["val_box_miou"] = float(np.mean(box_ious))
        out[f"val_clicks_obeyed@{n_clicks}"] = float(np.mean(obeyed))
        return out

    # ---------------------------------------------------------------- checkpoints
    def save_checkpoint(self, path: Path | None = None) -> Path:
        path = path or self.out / "checkpoint.pt"
        tmp = path.with_name(path.name + ".tmp")
        ckpt = {
            "step": self.step,
            "model": self.trainable_state(),
            "optimizer": self.opt.state_dict(),
            "rng": self.rng.bit_generator.state,
            "torch_rng": torch.get_rng_state(),
            "config": dataclasses.asdict(self.cfg),
        }
        extra = self._extra_state()
        if extra:
            ckpt["extra"] = extra
        if self.device.type == "cuda":
            ckpt["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        torch.save(ckpt, tmp)
        os.replace(tmp, path)
        return path

    def load_checkpoint(self, path: Path) -> None:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        expected = set(self.trainable_state())
        missing, unexpected = self.model.load_state_dict(ckpt["model"], strict=False)
        bad = sorted(expected - set(ckpt["model"]))
        if bad or unexpected:
            raise ValueError(f"checkpoint {path} does not match the model: {bad} {unexpected}")
        self.opt.load_state_dict(ckpt["optimizer"])
        self.step = int(ckpt["step"])
        self.rng.bit_generator.state = ckpt["rng"]
        torch.set_rng_state(ckpt["torch_rng"])
        if "cuda_rng" in ckpt and self.device.type == "cuda":
            torch.cuda.set_rng_state(ckpt["cuda_rng"], self.device)
        self._load_extra_state(ckpt.get("extra", {}))

    def export_state(self) -> dict[str, torch.Tensor]:
        """The whole model's weights under the official names (LoRA adapters merged)."""
        from .lora import lora_modules, merged_state_dict

        if lora_modules(self.model):
            return merged_state_dict(self.model)
        return self.model.state_dict()

    def export(self, path: str | os.PathLike[str]) -> Path:
        """Writes the whole model (backbone included, adapters merged) as ``.safetensors`` with
        its config, so ``segany.build_model(checkpoint=path)`` loads it strictly."""
        from ..checkpoint import save_safetensors

        out = Path(path)
        save_safetensors(
            self.export_state(),
            out,
            config=self.model.config,
            extra_metadata={"train_step": str(self.step)},
        )
        return out

    def fit(self, progress: bool = True, stop_at: int | None = None) -> None:
        """Trains to ``cfg.steps`` (resuming from the run folder's checkpoint if there is one).

        ``stop_at`` ends this call early at that step with a checkpoint written, for runs split
        over several sessions; the schedule still follows ``cfg.steps``.
        """
        from tqdm import tqdm

        cfg = self.cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        ckpt = self.out / "checkpoint.pt"
        if ckpt.exists():
            self.load_checkpoint(ckpt)
            logger.info("resumed from %s at step %d", ckpt, self.step)
        bar = tqdm(total=cfg.steps, initial=self.step, desc="training", disable=not progress)
        window: list[dict[str, float]] = []
        t0 = time.time()
        end = cfg.steps if stop_at is None else min(cfg.steps, stop_at)
        while self.step < end:
            stats = self.train_step()
            window.append(stats)
            bar.update(1)
            validating = self.step % cfg.val_every == 0 or self.step == cfg.steps
            if self.step % cfg.log_every == 0 or validating:
                mean = {k: float(np.mean([w[k] for w in window if k in w])) for k in window[-1]}
                mean.update(step=self.step, seconds=time.time() - t0)
                if validating:  # also where val_every is not a multiple of log_every
                    mean.update(self.validate())
                with open(self.log_path, "a") as fh:
                    fh.write(json.dumps(mean) + "\n")
                bar.set_postfix(
                    loss=f"{mean['r0_loss']:.3f}",
                    iou=f"{mean.get('rlast_iou', mean['r0_iou']):.3f}",
                )
                window = []
            if self.step % cfg.checkpoint_every == 0 or self.step == end:
                self.save_checkpoint()
        bar.close()


class Trainer(TrainerBase):
    """Trains the neck, prompt encoder and mask decoder of ``model`` on a feature cache."""

    def __init__(self, model: Sam, config: TrainConfig, cache: FeatureCache) -> None:
        if config.mode != "cached":
            raise ValueError(f"Trainer trains on a feature cache; mode is {config.mode!r}")
        enc = model.image_encoder
        if not hasattr(enc, "forward_features"):
            raise ValueError("cached-feature training needs an encoder with forward_features")
        if config.trainable is not None:
            names = set_trainable(model, config.trainable)
            bad = [n for n in names if n.startswith(BACKBONE)]
            if bad:
                raise ValueError(
                    f"trainable selects backbone parameters ({bad[0]}, ...): cached features "
                    "come from a frozen backbone; train it with mode 'images'"
                )
        for p in enc.backbone.parameters():
            p.requires_grad_(False)
        #: (stride, its position in the cache) where the trainable backbone tail starts
        self._tail: tuple[int, int] | None = None
        tail: range = range(0)
        if config.train_backbone_after is not None:
            stride = config.train_backbone_after
            if stride not in cache.strides[:-1] or not hasattr(enc.backbone, "forward_from"):
                raise ValueError(
                    f"train_backbone_after must be one of the cache's strides but the last "
                    f"{cache.strides[:-1]} and the backbone must run from it, got {stride}"
                )
            self._tail = (stride, cache.strides.index(stride))
            tail = enc.backbone.tail_blocks(stride)
            for n in tail:
                enc.backbone._blocks[n].requires_grad_(config.backbone_lr_scale > 0)
        #: the backbone's keys run from the cache rather than cached (``_blocks.N.`` of the
        #: tail; they train unless backbone_lr_scale is 0), without the prefix
        self._tail_keys = tuple(f"_blocks.{n}." for n in tail)
        _check_cached_backbone(enc.backbone, cache, self._tail_keys)
        super().__init__(model, config, cache.mask_size)
        self.cache = cache
        self.train_idx, self.val_idx = split_indices(
            len(cache), config.val_fraction, config.split_seed
        )
        self.usable = self._usable_masks()
        if config.set_weights:
            sets = {rec.get("set") for rec in cache.images}
            unknown = sorted(set(config.set_weights) - sets)
            if unknown:
                raise ValueError(f"set_weights names sets not in the cache: {unknown}")

    # ---------------------------------------------------------------- data
    def _usable_masks(self) -> dict[int, list[int]]:
        """Per image, the masks big enough to sample (mask areas read once from the cache)."""
        usable: dict[int, list[int]] = {}
        bits = self.cache.mask_bits
        counts = np.unpackbits(bits, axis=-1).reshape(len(bits), -1).sum(1)
        for i, rec in enumerate(self.cache.images):
            ids = range(rec["first_mask"], rec["first_mask"] + rec["n_masks"])
            good = [m for m in ids if counts[m] >= self.cfg.min_mask_pixels]
            if good:
                usable[i] = good
        return usable

    def _sample_batch(self, pool: np.ndarray) -> tuple[list[int], list[list[MaskId]], list[bool]]:
        pool = np.array([i for i in pool if int(i) in self.usable])
        weights, p = self.cfg.set_weights, None
        if weights is not None:
            w = np.array([weights.get(self.cache.images[int(i)].get("set", ""), 1.0) for i in pool])
            if np.count_nonzero(w) < self.cfg.images_per_step:
                raise ValueError("set_weights leave fewer images than images_per_step")
            p = w / w.sum()
        pick = self.rng.choice(pool, self.cfg.images_per_step, replace=False, p=p)
        imgs = [int(i) for i in pick]
        flips = [bool(self.rng.random() < self.cfg.hflip_prob) for _ in imgs]
        mask_ids: list[list[MaskId]] = []
        for i in imgs:
            cand = self.usable[i]
            replace = len(cand) < self.cfg.masks_per_image
            pick = self.rng.choice(len(cand), self.cfg.masks_per_image, replace=replace)
            ids: list[MaskId] = [cand[int(k)] for k in pick]
            if self.cfg.merge_objects_prob > 0 and len(cand) > 1:
                for j, k in enumerate(pick):
                    if self.rng.random() < self.cfg.merge_objects_prob:
                        other = (int(k) + 1 + int(self.rng.integers(len(cand) - 1))) % len(cand)
                        ids[j] = (cand[int(k)], cand[other])
            mask_ids.append(ids)
        return imgs, mask_ids, flips

    def _mask(self, m: MaskId) -> np.ndarray:
        """A cached mask, or the union of several (merged objects)."""
        if isinstance(m, int):
            return self.cache.mask(m)
        return np.logical_or.reduce([self.cache.mask(k) for k in m])

    def _load(self, imgs: list[int], mask_ids: list[list[MaskId]], flips: list[bool]):
        feats = self.cache.features(imgs)
        gts = []
        for b, (i, ids) in enumerate(zip(imgs, mask_ids)):
            h, w = self.cache.images[i]["input_hw"]
            for m in ids:
                g = self._mask(m)
                if flips[b]:
                    vw = max(1, round(w / 2))
                    g[:, :vw] = g[:, :vw][:, ::-1]
                gts.append(g)
            if flips[b]:
                for f, s in zip(feats, self.cache.strides):
                    vw = max(1, math.ceil(w / s))
                    f[b, :, :, :vw] = f[b, :, :, :vw].flip(-1)
        valid = []
        for i, ids in zip(imgs, mask_ids):
            h, w = self.cache.images[i]["input_hw"]
            v = np.zeros((self.cache.mask_size,) * 2, dtype=bool)
            v[: max(1, round(h / 2)), : max(1, round(w / 2))] = True
            valid.extend([v] * len(ids))
        return feats, np.stack(gts), np.stack(valid)

    def _embed(self, feats: list[torch.Tensor], per_image: int):
        feats = [f.to(self.device) for f in feats]
        if self._tail is not None:
            stride, k = self._tail
            backbone = self.model.image_encoder.backbone
            feats = feats[: k + 1] + backbone.forward_from(feats[k], stride)
        emb, hr = self.model.image_encoder.forward_features(feats)
        rep = lambda t: t.repeat_interleave(per_image, dim=0)  # noqa: E731
        return rep(emb), [rep(h) for h in hr]

    # ---------------------------------------------------------------- hooks
    def _set_train_mode(self) -> None:
        self.model.train()
        self.model.image_encoder.backbone.eval()

    def _train_batch(self):
        imgs, mask_ids, flips = self._sample_batch(self.train_idx)
        feats, gts, valid = self._load(imgs, mask_ids, flips)
        with self._autocast():
            emb, hr = self._embed(feats, self.cfg.masks_per_image)
        return emb, hr, gts, valid

    def _val_batches(self):
        pool = [int(i) for i in self.val_idx if int(i) in self.usable]
        per_img = max(1, math.ceil(self.cfg.val_masks / max(1, len(pool))))
        done = 0
        for i in pool:
            ids = self.usable[i][:per_img]
            feats, gts, valid = self._load([i], [ids], [False])
            with self._autocast():
                emb, hr = self._embed(feats, len(ids))
            yield emb, hr, gts, valid
            done += len(ids)
            if done >= self.cfg.val_masks:
                break

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {
            k: v
            for k, v in self.model.state_dict().items()
            if not k.startswith(BACKBONE) or k.removeprefix(BACKBONE).startswith(self._tail_keys)
        }


def _check_cached_backbone(
    backbone: torch.nn.Module, cache: FeatureCache, trained: tuple[str, ...]
) -> None:
    """Raises when the part of ``backbone`` whose outputs come from ``cache`` is not the
    pretrained backbone the cache was made with (e.g. weights whose late blocks were trained
    with ``train_backbone_after``, then trained again without it: the cached coarse features
    would no longer be the model's). ``trained``: prefixes of the backbone's own keys that
    train, which are not compared."""
    from ..modeling.efficientnet import load_pretrained_backbone

    name = cache.index.get("backbone")
    if not isinstance(name, str) or not hasattr(backbone, "tail_blocks"):
        return
    reference = load_pretrained_backbone(name).state_dict()
    ours = backbone.state_dict()
    for key, value in reference.items():
        if key.startswith(trained) or key not in ours:
            continue
        if ours[key].shape != value.shape or not torch.equal(ours[key].float(), value.float()):
            raise ValueError(
                f"the model's backbone differs from the pretrained {name} the feature cache "
                f"{cache.folder} was made with (first at {key}): its cached features are not "
                "this model's; keep train_backbone_after as the weights were trained with, or "
                "train with mode 'images'"
            )


def build_training_model(config: TrainConfig) -> Sam:
    """The model to train, in the state training starts from.

    ``config.model`` is a SamConfig dict or a registered name; ``config.init_from`` a weights
    file (an official SAM ``.pth``, an exported ``.safetensors``), loaded strictly; without a
    ``model`` the architecture comes from that file (embedded config or tensor shapes).

    - A segany-lite config dict: pretrained EfficientNet backbone, fresh neck and decoder, then
      ``init_from`` if given.
    - Otherwise, with ``init_from`` (or the bundled weights of a registered name): those
      weights, no random initialisation; without weights: a random model (for a lite encoder,
      with the pretrained backbone).
    """
    from ..modeling.config import LiteEncoderConfig, build_sam
    from ..modeling.efficientnet import load_pretrained_backbone

    if isinstance(config.model, dict) and config.model:
        sam_cfg: SamConfig | None = SamConfig.from_dict(config.model)
    elif isinstance(config.model, str):
        from ..registry import get_model_spec

        sam_cfg = get_model_spec(config.model).config
    else:
        sam_cfg = None
    if sam_cfg is None and not config.init_from:
        raise ValueError(
            "the training config needs a 'model' (a SamConfig dict or a registered model name) "
            "or 'init_from' (a weights file)"
        )
    if (
        isinstance(config.model, dict)
        and sam_cfg is not None
        and isinstance(sam_cfg.image_encoder, LiteEncoderConfig)
    ):
        torch.manual_seed(config.seed)
        model = build_sam(sam_cfg)
        enc_cfg = sam_cfg.image_encoder
        if isinstance(enc_cfg, LiteEncoderConfig):
            pretrained = load_pretrained_backbone(enc_cfg.backbone)
            model.image_encoder.backbone.load_state_dict(pretrained.state_dict())
        if config.init_from:
            from ..checkpoint import load_state_dict_strict, read_state_dict

            state, _ = read_state_dict(config.init_from)
            load_state_dict_strict(model, state, config.init_from, config.init_missing)
        return model
    return _build_from_weights(config, sam_cfg)


def _build_from_weights(config: TrainConfig, sam_cfg: SamConfig | None) -> Sam:
    from ..build import instantiate
    from ..checkpoint import config_from_metadata, infer_config, read_state_dict
    from ..modeling.config import LiteEncoderConfig, build_sam
    from ..modeling.efficientnet import load_pretrained_backbone
    from ..registry import bundled_weights_path, get_model_spec

    if config.init_missing:
        raise ValueError("'init_missing' needs a segany-lite config dict as 'model' (the model "
                         "is then built from it and 'init_from' loaded into it)")  # fmt: skip
    weights: str | Path | None = config.init_from
    if weights is None and isinstance(config.model, str):
        weights = bundled_weights_path(config.model)
        spec = get_model_spec(config.model)
        if weights is None and spec.url:
            raise ValueError(
                f"model {spec.name!r} has no bundled weights: set 'init_from' to the official "
                f"checkpoint ({spec.checkpoint_file} from {spec.url})"
            )
    if weights:
        source = str(weights)
        state, metadata = read_state_dict(source)
        if sam_cfg is None:
            sam_cfg = config_from_metadata(metadata, source) or infer_config(state, source)
        model = instantiate(sam_cfg, state, source)
    else:
        assert sam_cfg is not None
        logger.warning("no weights to start from: training a randomly initialised model")
        torch.manual_seed(config.seed)
        model = build_sam(sam_cfg)
        if isinstance(sam_cfg.image_encoder, LiteEncoderConfig):
            pretrained = load_pretrained_backbone(sam_cfg.image_encoder.backbone)
            model.image_encoder.backbone.load_state_dict(pretrained.state_dict())
    torch.manual_seed(config.seed)  # adapters and dropout start from the seed
    return model.train()
