"""The composed SAM model: image encoder + prompt encoder + mask decoder."""

from __future__ import annotations

import functools
from typing import Any

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
            sparse, dense = self.prompt_encoder(
                points=points, boxes=record.get("boxes"), masks=record.get("mask_inputs")
            )
            low_res, iou = self.mask_decoder(
                image_embeddings=emb.unsqueeze(0),
                image_pe=self.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=multimask_output,
                high_res_features=None if high_res is None else [f[i : i + 1] for f in high_res],
            )
            masks = self.postprocess_masks(
                low_res,
                input_size=record["image"].shape[-2:],
                original_size=record["original_size"],
            )
            outputs.append(
                {
                    "masks": masks > self.mask_threshold,
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
    ) -> torch.Tensor:
        """Low-res ``B x M x 4h x 4w`` logits -> ``B x M x H x W`` logits at the original size.

        Upscale to the padded model input, crop the padding, then resize to the original.
        """
        size = self.img_size
        in_h, in_w = int(input_size[0]), int(input_size[1])
        out_h, out_w = int(original_size[0]), int(original_size[1])
        low = masks.shape[-1]
        if self.fast_postprocess and masks.shape[-2] == low and masks.is_floating_point():
            ops = _resize_operators(low, size, in_h, in_w, out_h, out_w, masks.dtype, masks.device)
            if ops is not None:
                # Both bilinear resizes (and the crop between them) are linear and act on
                # rows and columns separately: one small matrix per axis, two products.
                rows, cols, columns_first = ops
                m = masks[..., : rows.shape[1], : cols.shape[1]]
                return rows @ (m @ cols.T) if columns_first else (rows @ m) @ cols.T
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
        return F.interpolate(
            masks,
            (int(original_size[0]), int(original_size[1])),
            mode="bilinear",
            align_corners=False,
        )

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise a ``3 x h x w`` (or ``B x 3 x h x w``) image and pad it to the square input."""
        x = (x - self.pixel_mean) / self.pixel_std
        h, w = x.shape[-2:]
        return F.pad(x, (0, self.img_size - w, 0, self.img_size - h))


#: ``postprocess_masks`` uses the two-product form while it costs at most this many
#: multiply-adds per mask (a 480 x 640 photo from SAM's 256 x 256 logits: ~90 M); bigger
#: outputs use the two bilinear resizes, whose cost grows more slowly with the output.
RESIZE_PRODUCT_MACS = 200_000_000


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
) -> tuple[torch.Tensor, torch.Tensor, bool] | None:
    """``(rows out_h x r, cols out_w x c, columns_first)``: the reference's upscale of ``low x low`` logits to
    ``size``, crop to ``in_h x in_w`` and resize to ``out_h x out_w``, as one matrix per axis
    acting on the first ``r`` rows and ``c`` columns (the others never reach the crop), and
    whether the column product is the cheaper one to do first.
    Built by running those very resizes on identity matrices. None when the
    products would cost more than :data:`RESIZE_PRODUCT_MACS` per mask, or ``size`` is not a
    multiple of ``low``."""
    if size % low:
        return None
    f = size // low
    r, c = min(low, -(-in_h // f) + 1), min(low, -(-in_w // f) + 1)
    columns_first_macs = r * c * out_w + out_h * r * out_w
    rows_first_macs = out_h * r * c + out_h * c * out_w
    if min(columns_first_macs, rows_first_macs) > RESIZE_PRODUCT_MACS:
        return None

    def axis(n: int, crop: int, out: int) -> torch.Tensor:
        # Resizing an identity gives the resize's matrix; in float32, so that its weights are
        # the ones the reference computes (their source positions are float32 arithmetic),
        # then composed in float64.
        eye = torch.eye(n)[None, None]
        up = F.interpolate(eye, (n * f, n), mode="bilinear", align_corners=False)[0, 0]
        eye = torch.eye(crop)[None, None]
        down = F.interpolate(eye, (out, crop), mode="bilinear", align_corners=False)[0, 0]
        return (down.double() @ up[:crop].double()).to(dtype=dtype, device=device)

    return axis(r, in_h, out_h), axis(c, in_w, out_w), columns_first_macs <= rows_first_macs
