"""The composed SAM model: image encoder + prompt encoder + mask decoder."""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .mask_decoder import MaskDecoder
from .prompt_encoder import PromptEncoder


class Sam(nn.Module):
    """Weights only; image state lives in :class:`segany.Predictor`.

    ``pixel_mean``/``pixel_std`` are non-persistent buffers (absent from official checkpoints).
    """

    mask_threshold: float = 0.0
    image_format: str = "RGB"
    config: Any = None  #: the SamConfig it was built from (set by ``build_sam``)
    #: Upscale only the part of the low-res masks that survives the crop (same values).
    fast_postprocess: bool = True
    #: With ``iou_floor`` ("segment everything"): make the high-res prompt branch's frames
    #: only for the prompts whose masks get upscaled (same values).
    fast_high_res_prompt: bool = True
    image_encoder: Any  # ViT or lite encoder: both expose ``img_size``

    def __init__(
        self,
        *,
        image_encoder: nn.Module,
        prompt_encoder: PromptEncoder,
        mask_decoder: MaskDecoder,
        pixel_mean: tuple[float, float, float] = (123.675, 116.28, 103.53),
        pixel_std: tuple[float, float, float] = (58.395, 57.12, 57.375),
    ) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)

    pixel_mean: torch.Tensor
    pixel_std: torch.Tensor

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @property
    def img_size(self) -> int:
        """Side of the square model input (the longest image side is resized to it)."""
        return int(self.image_encoder.img_size)

    def encode_image(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """Normalised padded images -> (embedding ``B x C x h x w``, high-res features or None).

        ViT encoders return only the embedding; encoders made for decoders with
        ``use_high_res_features`` also return ``[B x C/8 x 4h x 4w, B x C/4 x 2h x 2w]``.
        """
        dtype = self.encoder_dtype
        out = self.image_encoder(x.to(dtype))
        if isinstance(out, tuple):
            emb, high_res = out[0], list(out[1])
        else:
            emb, high_res = out, None
        if dtype != x.dtype:  # a reduced-precision encoder feeds the float32 decoder
            emb = emb.to(x.dtype)
            high_res = None if high_res is None else [f.to(x.dtype) for f in high_res]
        return emb, high_res

    @property
    def encoder_dtype(self) -> torch.dtype:
        """Floating dtype of the image encoder's weights (see ``segany.optimize``)."""
        for p in self.image_encoder.parameters():
            if p.is_floating_point():
                return p.dtype
        return torch.float32

    @torch.no_grad()
    def prepare_decoder(self, image_embeddings: torch.Tensor) -> None:
        """Makes the mask decoder's products of one image (``1 x C x h x w``) that every
        prompt without a mask input on it shares (kept by the decoder until another image
        comes), so that the first click costs what the later ones do. Optional: the decoder
        makes them at its first prompt otherwise."""
        if isinstance(self.mask_decoder, MaskDecoder):
            _, dense = self.prompt_encoder(points=None, boxes=None, masks=None)
            # one click: the mask tokens, the point and its padding point
            tokens = self.mask_decoder.num_mask_tokens + 1 + 2
            self.mask_decoder.prepare(
                image_embeddings, self.prompt_encoder.get_dense_pe(), dense, tokens
            )

    def decode(
        self,
        image_embeddings: torch.Tensor,
        high_res_features: list[torch.Tensor] | None,
        *,
        points: tuple[torch.Tensor, torch.Tensor] | None,
        boxes: torch.Tensor | None,
        masks: torch.Tensor | None,
        multimask_output: bool,
        iou_floor: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt encoder + mask decoder on one image's encoding (``1 x C x h x w`` and its
        high-res features, or a batch of B, one per prompt): low-res logits ``B x M x 4h x 4w``
        and IoU predictions ``B x M``. Prompts as :class:`PromptEncoder` takes them;
        ``iou_floor`` as :class:`MaskDecoder` takes it (ignored by other decoders)."""
        pe = self.prompt_encoder
        sparse, dense = pe(points=points, boxes=boxes, masks=masks)
        extra: dict[str, Any] = {}
        floor = iou_floor is not None and isinstance(self.mask_decoder, MaskDecoder)
        if floor:
            extra["iou_floor"] = iou_floor  # a stand-in decoder need not know it
        if high_res_features is not None:
            b = sparse.shape[0]
            lazy = floor and self.fast_high_res_prompt and pe.high_res_prompt is not None
            if lazy and not torch.is_grad_enabled():
                # The prompt's share of the stride-4 features (B frames) is made for the
                # prompts whose masks get upscaled only ("segment everything" keeps few).
                extra["high_res_rows"] = functools.partial(
                    _high_res_rows, pe, high_res_features, points, masks, b
                )
            else:
                s0 = pe.high_res_embedding(points, masks, b, high_res_features[0])
                if s0 is not None:  # the stride-4 features with the prompt's share
                    high_res_features = [s0, *high_res_features[1:]]
            extra["high_res_features"] = high_res_features
        return self.mask_decoder(
            image_embeddings=image_embeddings,
            image_pe=pe.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask_output,
            **extra,
        )

    @torch.no_grad()
    def forward(
        self, batched_input: list[dict[str, Any]], multimask_output: bool
    ) -> list[dict[str, torch.Tensor]]:
        """End-to-end prediction with the same input/output records as the reference ``Sam``.

        Each input dict holds ``image`` (3 x H x W, already resized), ``original_size`` (H, W)
        and optionally ``point_coords`` (B x N x 2), ``point_labels`` (B x N), ``boxes``
        (B x 4), ``mask_inputs`` (B x 1 x 256 x 256).
        """
        images = torch.stack([self.preprocess(x["image"]) for x in batched_input], dim=0)
        embeddings, high_res = self.encode_image(images)
        outputs = []
        for i, (record, emb) in enumerate(zip(batched_input, embeddings)):
            points = None
            if "point_coords" in record:
                points = (record["point_coords"], record["point_labels"])
            low_res, iou = self.decode(
                emb.unsqueeze(0),
                None if high_res is None else [f[i : i + 1] for f in high_res],
                points=points,
                boxes=record.get("boxes"),
                masks=record.get("mask_inputs"),
                multimask_output=multimask_output,
            )
            masks = self.postprocess_masks(
                low_res,
                input_size=record["image"].shape[-2:],
                original_size=record["original_size"],
                threshold=self.mask_threshold,
            )
            outputs.append(
                {
                    "masks": masks,
                    "iou_predictions": iou,
                    "low_res_logits": low_res,
                }
            )
        return outputs

    def postprocess_masks(
        self,
        masks: torch.Tensor,
        input_size: tuple[int, ...] | torch.Size,
        original_size: tuple[int, ...] | torch.Size,
        threshold: float | None = None,
    ) -> torch.Tensor:
        """Low-res ``B x M x 4h x 4w`` logits -> ``B x M x H x W`` logits at the original size.

        Upscale to the padded model input, crop the padding, then resize to the original.
        With ``threshold``: the boolean masks ``logits > threshold`` instead (on the fast path
        the logits of the full-size image are then never kept whole).
        """
        size = self.img_size
        in_h, in_w = int(input_size[0]), int(input_size[1])
        out_h, out_w = int(original_size[0]), int(original_size[1])
        low = masks.shape[-1]
        banded = self._banded_postprocess(masks, input_size, original_size, threshold, ())
        if banded is not None:
            return banded[0]
        if self.fast_postprocess and masks.dim() == 4 and masks.shape[1] > 1:
            # Several masks per prompt: PyTorch's CPU bilinear kernel is the channels-last one
            # (a contiguous B x M x H x W input is converted to it and back); giving it
            # channels-last tensors skips both copies. Same kernel, bit-identical values.
            masks = masks.contiguous(memory_format=torch.channels_last)
        if self.fast_postprocess and masks.shape[-2] == low and size % low == 0:
            # Upscale only the low-res rows/columns the crop needs (+1 for the bilinear
            # neighbour): the same scale factor and neighbours, hence the same values.
            f = size // low
            rh, rw = min(low, -(-in_h // f) + 1), min(low, -(-in_w // f) + 1)
            masks = F.interpolate(
                masks[..., :rh, :rw], (rh * f, rw * f), mode="bilinear", align_corners=False
            )
        else:
            masks = F.interpolate(masks, (size, size), mode="bilinear", align_corners=False)
        masks = masks[..., :in_h, :in_w]
        masks = F.interpolate(masks, (out_h, out_w), mode="bilinear", align_corners=False)
        return masks if threshold is None else masks > threshold

    def postprocess_mask_stats(
        self,
        masks: torch.Tensor,
        input_size: tuple[int, ...] | torch.Size,
        original_size: tuple[int, ...] | torch.Size,
        count_above: tuple[float, ...],
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``postprocess_masks(..., threshold=self.mask_threshold)`` of ``N x h x w`` low-res
        logits, plus, per mask, the number of full-size logits above each of
        ``count_above`` (``len(count_above) x N`` int64), without ever holding the full-size
        float logits: each block of the banded resize is thresholded and counted while hot.
        None where the banded form does not apply (the caller then uses the float path)."""
        if masks.dim() != 3 or masks.device.type != "cpu":
            return None
        return self._banded_postprocess(
            masks, input_size, original_size, self.mask_threshold, count_above
        )

    def _banded_postprocess(
        self,
        masks: torch.Tensor,
        input_size: tuple[int, ...] | torch.Size,
        original_size: tuple[int, ...] | torch.Size,
        threshold: float | None,
        count_above: tuple[float, ...],
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The fast path of :meth:`postprocess_masks` (and the counts of
        :meth:`postprocess_mask_stats`); None where it does not apply."""
        low = masks.shape[-1]
        if not (self.fast_postprocess and masks.shape[-2] == low and masks.is_floating_point()):
            return None
        in_h, in_w = int(input_size[0]), int(input_size[1])
        out_h, out_w = int(original_size[0]), int(original_size[1])
        ops = _resize_operators(
            low, self.img_size, in_h, in_w, out_h, out_w, masks.dtype, masks.device
        )
        if ops is None:
            return None
        # Both bilinear resizes (and the crop between them) are linear and act on rows and
        # columns separately: one banded map per axis, applied in turn.
        rows, cols, columns_first = ops
        m = masks[..., : rows.n, : cols.n]
        if columns_first:
            return rows.apply_counting(cols.apply(m, -1), -2, threshold, count_above)
        return cols.apply_counting(rows.apply(m, -2), -1, threshold, count_above)

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise a ``3 x h x w`` (or ``B x 3 x h x w``) image and pad it to the square input."""
        x = (x - self.pixel_mean) / self.pixel_std
        h, w = x.shape[-2:]
        return F.pad(x, (0, self.img_size - w, 0, self.img_size - h))


def _high_res_rows(
    pe: PromptEncoder,
    features: list[torch.Tensor],
    points: tuple[torch.Tensor, torch.Tensor] | None,
    masks: torch.Tensor | None,
    b: int,
    rows: torch.Tensor | None,
) -> list[torch.Tensor]:
    """The high-res features of prompts ``rows`` of B (None: all) with their prompt branch's
    share, as :meth:`Sam.decode` passes them to the decoder (see ``MaskDecoder.forward``)."""

    def take(t: torch.Tensor) -> torch.Tensor:
        return t if rows is None or t.shape[0] != b else t[rows]

    n = b if rows is None else len(rows)
    pts = None if points is None else (take(points[0]), take(points[1]))
    s0 = pe.high_res_embedding(pts, None if masks is None else take(masks), n, take(features[0]))
    return [take(f) for f in features] if s0 is None else [s0, *map(take, features[1:])]


def count_true(masks: torch.Tensor) -> torch.Tensor:
    """``N x H x W`` bool -> ``N`` int64 counts of True. On the CPU numpy's count_nonzero,
    mask by mask: 7x faster than torch's sum over bool (37 -> 5 ms for two 12 MP masks)."""
    if masks.device.type != "cpu" or masks.requires_grad or masks.dim() != 3:
        return masks.sum((-1, -2), dtype=torch.int64)
    return torch.tensor([int(np.count_nonzero(m)) for m in masks.numpy()], dtype=torch.int64)


#: ``postprocess_masks`` uses the banded-product form while it costs at most this many
#: multiply-adds per mask (a 480 x 640 photo from SAM's 256 x 256 logits: ~13 M); bigger
#: outputs use the two bilinear resizes.
RESIZE_PRODUCT_MACS = 200_000_000

#: Output rows (or columns) per block of a banded resize: each block is one dense product
#: with the few input rows its outputs read. Smaller blocks read fewer zeros; every block is
#: one more call (480 x 640 from 256 x 256, three masks: 0.8 ms in ~60-row blocks against
#: 2.6 ms for the dense matrices and 1.2 ms in ~30-row ones).
RESIZE_BLOCK = 64


def _block_size(out: int) -> int:
    """Outputs per block: ``out`` in ``ceil(out / RESIZE_BLOCK)`` blocks of equal size."""
    return -(-out // -(-out // RESIZE_BLOCK))


def _product_costs(
    r: int, c: int, out_h: int, out_w: int, width_r: int, width_c: int
) -> tuple[int, int]:
    """Multiply-adds per mask of the two banded maps on ``r x c`` logits, with windows of
    ``width_r`` rows and ``width_c`` columns: ``(columns first, rows first)``."""
    return (
        out_w * width_c * r + out_h * width_r * out_w,
        out_h * width_r * c + out_w * width_c * out_h,
    )


class _BandedResize:
    """A linear map along one axis, ``out x n``, whose rows read a narrow band of the input
    (a bilinear resize reads 2 inputs per output; two composed, at most 4): kept as dense
    blocks of consecutive outputs, each with the window of inputs it reads."""

    def __init__(self, matrix: torch.Tensor) -> None:
        out, n = matrix.shape
        block = _block_size(out)
        used = (matrix != 0).to(torch.int8)
        first = torch.where(used.any(1), used.argmax(1), n - 1)  # rows of zeros read nothing
        last = torch.where(used.any(1), n - 1 - used.flip(1).argmax(1), 0)
        spans = [
            (int(first[i : i + block].min()), int(last[i : i + block].max()))
            for i in range(0, out, block)
        ]
        self.width = max(1, max(e - s + 1 for s, e in spans))
        self.starts = [max(0, min(s, n - self.width)) for s, _ in spans]
        self.out, self.n, self.block = out, n, block
        self.weights = [
            matrix[i * block : (i + 1) * block, s : s + self.width].contiguous()
            for i, s in enumerate(self.starts)
        ]

    def apply(self, x: torch.Tensor, dim: int, threshold: float | None = None) -> torch.Tensor:
        """The map along ``dim`` (-1: columns, -2: rows) of ``x``; ``> threshold`` when set."""
        return self.apply_counting(x, dim, threshold, ())[0]

    def apply_counting(
        self,
        x: torch.Tensor,
        dim: int,
        threshold: float | None,
        count_above: tuple[float, ...],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`apply`, and per ``H x W`` map of the result the number of values above each
        of ``count_above`` (``len(count_above) x prod(leading dims)`` int64), counted from
        each block while it is hot: with ``threshold`` the float result is never stored."""
        shape = list(x.shape)
        shape[dim] = self.out
        res = x.new_empty(shape, dtype=x.dtype if threshold is None else torch.bool)
        lead = math.prod(shape[:-2])
        counts = torch.zeros(len(count_above), lead, dtype=torch.int64)
        for i, (s, wt) in enumerate(zip(self.starts, self.weights)):
            o = slice(i * self.block, (i + 1) * self.block)
            if dim == -1:
                y, dst = x[..., s : s + self.width] @ wt.T, res[..., o]
            else:
                y, dst = wt @ x[..., s : s + self.width, :], res[..., o, :]
            if threshold is None:
                dst.copy_(y)
            else:
                torch.gt(y, threshold, out=dst)
            for k, t in enumerate(count_above):
                counts[k] += count_true(y.reshape(lead, *y.shape[-2:]) > t)
        return res, counts


@functools.lru_cache(maxsize=32)
def _resize_operators(
    low: int,
    size: int,
    in_h: int,
    in_w: int,
    out_h: int,
    out_w: int,
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[_BandedResize, _BandedResize, bool] | None:
    """``(rows, cols, columns_first)``: the reference's upscale of ``low x low`` logits to
    ``size``, crop to ``in_h x in_w`` and resize to ``out_h x out_w``, as one banded map per
    axis acting on the first ``rows.n`` rows and ``cols.n`` columns (the others never reach
    the crop), and whether the column map is the cheaper one to do first.
    Built by running those very resizes on identity matrices. None when the
    products would cost more than :data:`RESIZE_PRODUCT_MACS` per mask, or ``size`` is not a
    multiple of ``low``."""
    if size % low:
        return None
    f = size // low
    r, c = min(low, -(-in_h // f) + 1), min(low, -(-in_w // f) + 1)

    def width(n: int, out: int) -> int:  # about a block's window: its span + the taps
        return _block_size(out) * n // out + 4

    estimate = _product_costs(r, c, out_h, out_w, width(r, out_h), width(c, out_w))
    if min(estimate) > 2 * RESIZE_PRODUCT_MACS:
        return None  # far too big: not even built

    def axis(n: int, crop: int, out: int) -> _BandedResize:
        # Resizing an identity gives the resize's matrix; in float32, so that its weights are
        # the ones the reference computes (their source positions are float32 arithmetic),
        # then composed in float64.
        eye = torch.eye(n)[None, None]
        up = F.interpolate(eye, (n * f, n), mode="bilinear", align_corners=False)[0, 0]
        eye = torch.eye(crop)[None, None]
        down = F.interpolate(eye, (out, crop), mode="bilinear", align_corners=False)[0, 0]
        return _BandedResize((down.double() @ up[:crop].double()).to(dtype=dtype, device=device))

    rows, cols = axis(r, in_h, out_h), axis(c, in_w, out_w)
    columns_first, rows_first = _product_costs(r, c, out_h, out_w, rows.width, cols.width)
    if min(columns_first, rows_first) > RESIZE_PRODUCT_MACS:
        return None
    return rows, cols, columns_first <= rows_first
