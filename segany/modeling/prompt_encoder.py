"""SAM's prompt encoder: points, boxes and a low-resolution mask -> sparse + dense embeddings."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .common import LayerNorm2d, tracing


class PromptEncoder(nn.Module):
    """Encodes prompts for the mask decoder.

    Points are ``B x N x 2`` (x, y) in the model's input frame with labels ``B x N``
    (1 positive, 0 negative, -1 padding); boxes ``B x 4`` xyxy; masks ``B x 1 x 4h x 4w``
    logits where ``h x w`` is ``image_embedding_size``.
    """

    def __init__(
        self,
        *,
        embed_dim: int,
        image_embedding_size: tuple[int, int],
        input_image_size: tuple[int, int],
        mask_in_chans: int,
        activation: type[nn.Module] = nn.GELU,
        high_res_prompt: bool = False,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.input_image_size = input_image_size
        self.image_embedding_size = image_embedding_size
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2)
        # 0 negative point, 1 positive point, 2 box top-left, 3 box bottom-right.
        self.num_point_embeddings = 4
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(4))
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.mask_input_size = (4 * image_embedding_size[0], 4 * image_embedding_size[1])
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans // 4),
            activation(),
            nn.Conv2d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans),
            activation(),
            nn.Conv2d(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)
        #: segany-lite only (None for the SAM checkpoints): the clicks and the mask input at the
        #: mask frame, for the decoder's stride-4 features (:meth:`high_res_embedding`)
        self.high_res_prompt = HighResPrompt(embed_dim // 8) if high_res_prompt else None

    def get_dense_pe(self) -> torch.Tensor:
        """``1 x embed_dim x h x w`` positional encoding of the embedding grid (channels-last
        strides). Computed once and reused until the frequencies, device or dtype change."""
        if tracing():
            return self.pe_layer(self.image_embedding_size).unsqueeze(0)
        buf = self.pe_layer.positional_encoding_gaussian_matrix
        key = (buf.data_ptr(), buf._version, buf.device, buf.dtype, self.image_embedding_size)
        cached = self.__dict__.get("_dense_pe")
        if cached is None or cached[0] != key:
            pe = self.pe_layer(self.image_embedding_size).unsqueeze(0)
            self.__dict__["_dense_pe"] = (key, pe)
            return pe
        return cached[1]

    def _embed_points(self, points: torch.Tensor, labels: torch.Tensor, pad: bool) -> torch.Tensor:
        points = points + 0.5  # pixel centres
        if pad:
            # A padding point keeps the token count the same as with a box.
            points = torch.cat([points, points.new_zeros(points.shape[0], 1, 2)], dim=1)
            labels = torch.cat([labels, -labels.new_ones(labels.shape[0], 1)], dim=1)
        emb = self.pe_layer.forward_with_coords(points, self.input_image_size)
        labels = labels[..., None]
        emb = torch.where(labels == -1, torch.zeros_like(emb), emb)
        emb = emb + (labels == -1) * self.not_a_point_embed.weight
        emb = emb + (labels == 0) * self._point_weight(0)
        emb = emb + (labels == 1) * self._point_weight(1)
        return emb

    def _point_weight(self, i: int) -> torch.Tensor:
        """``1 x embed_dim`` weight of point embedding ``i`` (0 neg, 1 pos, 2/3 box corners)."""
        emb: nn.Embedding = self.point_embeddings[i]  # type: ignore[assignment]
        return emb.weight

    def _embed_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        boxes = boxes + 0.5
        corners = boxes.reshape(-1, 2, 2)
        emb = self.pe_layer.forward_with_coords(corners, self.input_image_size)
        corner_embed = torch.stack([self._point_weight(2)[0], self._point_weight(3)[0]])
        return emb + corner_embed

    def _embed_masks(self, masks: torch.Tensor) -> torch.Tensor:
        return self.mask_downscaling(masks)

    @staticmethod
    def _batch_size(
        points: tuple[torch.Tensor, torch.Tensor] | None,
        boxes: torch.Tensor | None,
        masks: torch.Tensor | None,
    ) -> int:
        if points is not None:
            return points[0].shape[0]
        if boxes is not None:
            return boxes.shape[0]
        if masks is not None:
            return masks.shape[0]
        return 1

    def forward(
        self,
        points: tuple[torch.Tensor, torch.Tensor] | None,
        boxes: torch.Tensor | None,
        masks: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns sparse ``B x T x embed_dim`` and dense ``B x embed_dim x h x w`` embeddings."""
        bs = self._batch_size(points, boxes, masks)
        weight = self._point_weight(0)
        parts = [weight.new_empty((bs, 0, self.embed_dim))]
        if points is not None:
            coords, labels = points
            parts.append(self._embed_points(coords, labels, pad=boxes is None))
        if boxes is not None:
            parts.append(self._embed_boxes(boxes))
        sparse = torch.cat(parts, dim=1)
        if masks is not None:
            dense = self._embed_masks(masks)
        else:
            dense = self.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(
                bs, -1, self.image_embedding_size[0], self.image_embedding_size[1]
            )
        return sparse, dense

    def high_res_embedding(
        self,
        points: tuple[torch.Tensor, torch.Tensor] | None,
        masks: torch.Tensor | None,
        batch_size: int,
        base: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """``B x embed_dim/8 x 4h x 4w`` for the decoder's stride-4 features, plus ``base``
        (the encoder's, ``1|B x embed_dim/8 x 4h x 4w``) when given; None without a
        :class:`HighResPrompt`. ``points`` and ``masks`` as :meth:`forward` takes them."""
        if self.high_res_prompt is None:
            return None
        coords, labels = points if points is not None else (None, None)
        has_mask = None if masks is None else masks.new_ones(masks.shape[0], 1, 1, 1)
        return self.high_res_prompt(
            coords, labels, masks, has_mask, self.mask_input_size, batch_size, base
        )


class HighResPrompt(nn.Module):
    """The prompt at the decoder's finest resolution (segany-lite's dense prompt branch).

    SAM's decoder sees clicks only as tokens and the previous mask only downscaled to the
    embedding grid (``h x w``), so a correction near a boundary, and the boundary detail of the
    mask fed back, must be recovered from the image features every round. This branch draws
    the positive and negative clicks as disks (``radius`` mask-frame pixels) and takes the mask
    input at full mask-frame resolution (``4h x 4w``), with a channel that says whether there
    is one, and turns them, through two 3x3 convolutions, into ``out_chans`` features added to
    the decoder's stride-4 features before its last activation. The last convolution starts at
    zero, so a model gains the branch without changing its outputs until it is trained (as
    early fusion of click maps and the previous mask does in RITM and FocalClick).
    """

    def __init__(self, out_chans: int, hidden: int = 16, radius: float = 3.0) -> None:
        super().__init__()
        self.radius = radius
        self.conv1 = nn.Conv2d(4, hidden, kernel_size=3, padding=1)
        self.act = nn.GELU()
        self.conv2 = nn.Conv2d(hidden, out_chans, kernel_size=3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        if self.conv2.bias is not None:
            nn.init.zeros_(self.conv2.bias)

    def click_maps(
        self,
        coords: torch.Tensor,
        labels: torch.Tensor,
        size: tuple[int, int],
        origin: torch.Tensor | None = None,
        frame: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """``B x 2 x H x W`` disks (positive, negative) for points ``B x N x 2`` (x, y) in the
        model's input frame (``4`` input pixels per mask-frame pixel); labels other than 0 and
        1 (padding, box corners) draw nothing. The ``H x W`` = ``size`` grid is the mask frame,
        or with ``origin`` (``B x 2`` integer (row, column) of each item's top-left pixel) a
        window of it per item, zero outside the ``frame`` (H, W) it belongs to."""
        h, w = size
        scale = 4.0  # input pixels per mask-frame pixel
        u = (coords[..., 0] + 0.5) / scale - 0.5  # B x N, mask-frame pixel centres
        v = (coords[..., 1] + 0.5) / scale - 0.5
        ys = torch.arange(h, device=coords.device).view(1, h)  # 1|B x H
        xs = torch.arange(w, device=coords.device).view(1, w)
        if origin is not None:
            ys, xs = ys + origin[:, :1], xs + origin[:, 1:]
        dy = (ys.to(coords.dtype)[:, None, :, None] - v[..., None, None]) ** 2  # B x N x H x 1
        dx = (xs.to(coords.dtype)[:, None, None, :] - u[..., None, None]) ** 2  # B x N x 1 x W
        inside = (dy + dx) <= self.radius**2  # B x N x H x W
        if frame is not None:
            rows = (ys >= 0) & (ys < frame[0])
            cols = (xs >= 0) & (xs < frame[1])
            inside = inside & rows[:, None, :, None] & cols[:, None, None, :]
        lab = labels[..., None, None]
        pos = (inside & (lab == 1)).any(dim=1)
        neg = (inside & (lab == 0)).any(dim=1)
        return torch.stack([pos, neg], dim=1).to(coords.dtype)

    def forward(
        self,
        coords: torch.Tensor | None,
        labels: torch.Tensor | None,
        masks: torch.Tensor | None,
        has_mask: torch.Tensor | None,
        size: tuple[int, int],
        batch_size: int,
        base: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Points ``B x N x 2`` and labels ``B x N`` (or None), mask logits ``B x 1 x H x W``
        and ``has_mask`` ``B x 1 x 1 x 1`` (1 where ``masks`` is a real input, 0 where it is a
        placeholder; None with ``masks``) -> ``B x out_chans x H x W`` for ``size`` (H, W),
        plus ``base`` (``1|B x out_chans x H x W``) when given."""
        if (
            masks is None
            and coords is not None
            and labels is not None
            and coords.shape[1] == 1
            and not torch.is_grad_enabled()
            and not tracing()
        ):
            return self._one_click(coords, labels, size, base)
        weight = self.conv1.weight
        h, w = size
        if coords is not None and labels is not None:
            clicks = self.click_maps(coords.to(weight.dtype), labels, size)
        else:
            clicks = weight.new_zeros(batch_size, 2, h, w)
        if masks is None or has_mask is None:
            mask = flag = weight.new_zeros(batch_size, 1, h, w)
        else:
            # logits squashed to (-1, 1): fed-back logits reach +-20 and more
            mask = torch.tanh(masks.to(weight.dtype) * 0.25) * has_mask
            flag = has_mask.expand(-1, 1, h, w)
        x = torch.cat([t.expand(batch_size, -1, h, w) for t in (flag, mask, clicks)], dim=1)
        out = self.conv2(self.act(self.conv1(x)))
        return out if base is None else base + out

    def _one_click(
        self,
        coords: torch.Tensor,
        labels: torch.Tensor,
        size: tuple[int, int],
        base: torch.Tensor | None,
    ) -> torch.Tensor:
        """:meth:`forward` for prompts of one click and no mask input (a first click; every
        prompt of "segment everything"), at inference, without convolving whole frames.

        The input is zero but for the click's disk, so the output is the branch's response to
        an empty input (computed once per frame size) except within 2 pixels of the disk (two
        3x3 convolutions). That part is computed on a window around each click: the disk drawn
        there (zero outside the frame, as the frame's zero padding), the first convolution
        without padding, its activations zeroed outside the frame (the second convolution's
        padding), the second without padding. Same values as the whole frame's.
        """
        h, w = size
        weight = self.conv1.weight
        b = coords.shape[0]
        reach = int(math.floor(self.radius + 0.5)) + 2  # output pixels a click can change
        side = 2 * reach + 1
        u = (coords[:, 0, 0].to(weight.dtype) + 0.5) / 4.0 - 0.5
        v = (coords[:, 0, 1].to(weight.dtype) + 0.5) / 4.0 - 0.5
        centre = torch.stack([v, u], dim=1).round().long()  # B x 2 (row, column)
        origin = centre - (reach + 2)  # the input window: 2 more pixels per side
        disks = self.click_maps(coords.to(weight.dtype), labels, (side + 4,) * 2, origin, size)
        x = torch.cat([disks.new_zeros(b, 2, side + 4, side + 4), disks], dim=1)
        a = self.act(F.conv2d(x, weight, self.conv1.bias))  # B x hidden x side+2 x side+2
        r = torch.arange(side + 2, device=coords.device)
        rows = ((origin[:, :1] + 1 + r) >= 0) & ((origin[:, :1] + 1 + r) < h)  # B x side+2
        cols = ((origin[:, 1:] + 1 + r) >= 0) & ((origin[:, 1:] + 1 + r) < w)
        a = a * (rows[:, None, :, None] & cols[:, None, None, :]).to(a.dtype)
        near = F.conv2d(a, self.conv2.weight, self.conv2.bias)  # B x C x side x side
        empty = self._empty_response(size, base)
        out = empty.expand(b, -1, -1, -1).clone()
        for i, (y0, x0) in enumerate((origin + 2).tolist()):  # top-left of ``near``
            ys, xs = max(0, y0), max(0, x0)
            ye, xe = min(h, y0 + side), min(w, x0 + side)
            if ys < ye and xs < xe:
                win = near[i, :, ys - y0 : ye - y0, xs - x0 : xe - x0]
                if base is not None:
                    win = base[i if len(base) > 1 else 0, :, ys:ye, xs:xe] + win
                out[i, :, ys:ye, xs:xe] = win
        return out

    def _empty_response(
        self, size: tuple[int, int], base: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``1|B x out_chans x H x W``: the branch's output for an all-zero input (no mask, no
        click), plus ``base`` when given; kept for the next call until a weight, the size, the
        dtype or ``base`` changes (inference only)."""
        params = (self.conv1.weight, self.conv1.bias, self.conv2.weight, self.conv2.bias)
        key: tuple[Any, ...] = (
            size,
            *((t.data_ptr(), t._version, t.dtype) for t in params if t is not None),
        )
        key += (None,) if base is None else (base._version,)
        cached = self.__dict__.get("_empty")  # (key, base itself: compared by identity, value)
        if cached is None or cached[0] != key or cached[1] is not base:
            x = self.conv1.weight.new_zeros(1, 4, *size)
            value = self.conv2(self.act(self.conv1(x)))
            value = value if base is None else base + value
            self.__dict__["_empty"] = cached = (key, base, value)
        return cached[2]


class PositionEmbeddingRandom(nn.Module):
    """Positional encoding with random spatial frequencies (Tancik et al., 2020)."""

    def __init__(self, num_pos_feats: int = 64, scale: float | None = None) -> None:
        super().__init__()
        if scale is None or scale <= 0.0:
            scale = 1.0
        self.register_buffer(
            "positional_encoding_gaussian_matrix", scale * torch.randn((2, num_pos_feats))
        )

    positional_encoding_gaussian_matrix: torch.Tensor

    def _pe_encoding(self, coords: torch.Tensor) -> torch.Tensor:
        """``... x 2`` coordinates in [0, 1] -> ``... x 2*num_pos_feats``."""
        coords = 2 * coords - 1
        coords = coords @ self.positional_encoding_gaussian_matrix
        coords = 2 * math.pi * coords
        return torch.cat([torch.sin(coords), torch.cos(coords)], dim=-1)

    def forward(self, size: tuple[int, int]) -> torch.Tensor:
        """``C x h x w`` encoding of a grid's cell centres."""
        h, w = size
        device = self.positional_encoding_gaussian_matrix.device
        grid = torch.ones((h, w), device=device, dtype=torch.float32)
        y_embed = (grid.cumsum(dim=0) - 0.5) / h
        x_embed = (grid.cumsum(dim=1) - 0.5) / w
        pe = self._pe_encoding(torch.stack([x_embed, y_embed], dim=-1))
        return pe.permute(2, 0, 1)

    def forward_with_coords(
        self, coords_input: torch.Tensor, image_size: tuple[int, int]
    ) -> torch.Tensor:
        """``B x N x 2`` pixel coordinates (x, y) in an ``image_size`` (h, w) frame."""
        coords = coords_input.clone()
        coords[:, :, 0] = coords[:, :, 0] / image_size[1]
        coords[:, :, 1] = coords[:, :, 1] / image_size[0]
        return self._pe_encoding(coords.to(torch.float))
