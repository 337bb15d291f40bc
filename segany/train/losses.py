"""Losses of the SAM recipe: focal + dice on mask logits, MSE on the IoU head."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sigmoid_focal_loss(
    logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0
) -> torch.Tensor:
    """Per-mask focal loss, averaged over pixels: ``N x H x W`` -> ``N``.

    ``targets`` are in [0, 1] (soft targets allowed); ``alpha < 0`` disables class weighting.
    """
    prob = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss.flatten(1).mean(1)


def dice_loss(logits: torch.Tensor, targets: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Per-mask soft dice loss ``1 - (2|P.T| + eps) / (|P| + |T| + eps)``: ``N x H x W`` -> ``N``."""
    prob = torch.sigmoid(logits).flatten(1)
    t = targets.flatten(1)
    num = 2 * (prob * t).sum(1) + eps
    den = prob.sum(1) + t.sum(1) + eps
    return 1 - num / den


def mask_iou(logits: torch.Tensor, targets: torch.Tensor, threshold: float = 0.0) -> torch.Tensor:
    """IoU of ``logits > threshold`` with ``targets > 0.5``: ``N x H x W`` -> ``N`` (empty/empty = 1)."""
    pred = (logits > threshold).flatten(1)
    gt = (targets > 0.5).flatten(1)
    inter = (pred & gt).sum(1).float()
    union = (pred | gt).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def logits_at_clicks(logits: torch.Tensor, xy: torch.Tensor) -> torch.Tensor:
    """Each candidate's logit at each click: ``N x M x H x W`` logits, click pixels ``xy``
    ``N x K x 2`` (x, y; rounded to the nearest pixel, clamped to the frame) -> ``N x M x K``."""
    n, m, h, w = logits.shape
    x = xy[..., 0].round().long().clamp(0, w - 1)
    y = xy[..., 1].round().long().clamp(0, h - 1)
    idx = (y * w + x)[:, None, :].expand(n, m, xy.shape[1])
    return logits.flatten(2).gather(2, idx)


def click_loss(logits: torch.Tensor, xy: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-prompt agreement of the masks with their clicks: ``N x M x H x W`` logits, click
    pixels ``xy`` ``N x K x 2`` (x, y; rounded to the nearest pixel, clamped to the frame) and
    ``labels`` ``N x K`` (1 positive, 0 negative) -> ``N``: the binary cross-entropy of each
    candidate's logit at each click, averaged over clicks and candidates.

    The mask loss weighs a click by the pixels around it, so a model can leave a corrective
    click unanswered when its error region is small; this term asks every click to be obeyed.
    """
    at = logits_at_clicks(logits.float(), xy)  # N x M x K
    target = labels.float()[:, None, :].expand_as(at)
    ce = F.binary_cross_entropy_with_logits(at, target, reduction="none")
    return ce.flatten(1).mean(1)


def sam_loss(
    logits: torch.Tensor,
    iou_pred: torch.Tensor,
    targets: torch.Tensor,
    *,
    focal_weight: float = 20.0,
    dice_weight: float = 1.0,
    iou_weight: float = 1.0,
    best_of_candidates: bool = False,
    rank_weight: float = 0.0,
    rank_temperature: float = 0.05,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The SAM loss for ``N`` prompts with ``M`` candidate masks each.

    ``logits`` ``N x M x H x W``, ``iou_pred`` ``N x M``, ``targets`` ``N x H x W``. With
    ``best_of_candidates`` (ambiguous prompts) only the candidate with the lowest mask loss
    gets the mask loss; the IoU head is trained on every candidate against its actual IoU.
    ``rank_weight`` adds a ranking term for several candidates: the cross-entropy between
    ``softmax(iou_pred / T)`` and ``softmax(actual_iou / T)`` (soft, so near-ties ask for no
    order), which the MSE alone barely enforces when the predictions sit close together.
    """
    n, m = logits.shape[:2]
    flat = logits.float().flatten(0, 1)
    tgt = targets.float()[:, None].expand(n, m, *targets.shape[-2:]).flatten(0, 1)
    focal = sigmoid_focal_loss(flat, tgt).view(n, m)
    dice = dice_loss(flat, tgt).view(n, m)
    mask_loss = focal_weight * focal + dice_weight * dice
    if best_of_candidates and m > 1:
        best = mask_loss.argmin(dim=1)
    else:
        best = torch.zeros(n, dtype=torch.long, device=logits.device)
    rows = torch.arange(n, device=logits.device)
    with torch.no_grad():
        actual_iou = mask_iou(flat, tgt).view(n, m)
    iou_loss = F.mse_loss(iou_pred.float(), actual_iou, reduction="none").mean(1)
    total = (mask_loss[rows, best] + iou_weight * iou_loss).mean()
    rank = None
    if rank_weight > 0 and m > 1:
        target = torch.softmax(actual_iou / rank_temperature, dim=1)
        logp = torch.log_softmax(iou_pred.float() / rank_temperature, dim=1)
        rank = -(target * logp).sum(1).mean()
        total = total + rank_weight * rank
    stats = {
        "loss": float(total.detach()),
        "focal": float(focal[rows, best].mean().detach()),
        "dice": float(dice[rows, best].mean().detach()),
        "iou_mse": float(iou_loss.mean().detach()),
        "iou": float(actual_iou[rows, best].mean()),
    }
    if rank is not None:
        stats["rank"] = float(rank.detach())
    return total, stats
