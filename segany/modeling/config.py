"""Frozen configuration types for the SAM family and the builder that turns them into modules.

Every default is the official SAM value; variants differ only in a few encoder numbers.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .image_encoder import ImageEncoderViT
from .mask_decoder import MaskDecoder
from .prompt_encoder import PromptEncoder
from .sam import Sam
from .transformer import TwoWayTransformer


@dataclass(frozen=True)
class ViTEncoderConfig:
    """The ViT image encoder."""

    img_size: int = 1024  #: side of the square model input, in pixels
    patch_size: int = 16  #: patch side; the embedding grid is img_size / patch_size
    embed_dim: int = 768  #: token width
    depth: int = 12  #: number of transformer blocks
    num_heads: int = 12  #: attention heads per block
    mlp_ratio: float = 4.0  #: MLP hidden width / embed_dim
    out_chans: int = 256  #: neck output channels (= prompt embedding dim)
    window_size: int = 14  #: local attention window (tokens) in non-global blocks
    global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)  #: blocks with global attention
    kind: str = "vit"

    @property
    def embedding_size(self) -> int:
        return self.img_size // self.patch_size


@dataclass(frozen=True)
class LiteEncoderConfig:
    """segany-lite: EfficientNet-Lite backbone + fusion neck (see ``lite_encoder.py``)."""

    backbone: str = "lite0"  #: EfficientNet-Lite variant: lite0, lite1 or lite2
    img_size: int = 512  #: side of the square model input, in pixels
    out_chans: int = 256  #: embedding channels (= prompt embedding dim)
    neck_blocks: int = 2  #: ConvNeXt blocks after the fusion
    kind: str = "efficientnet_lite"

    @property
    def embedding_size(self) -> int:
        return self.img_size // 16


@dataclass(frozen=True)
class PromptEncoderConfig:
    """The prompt encoder."""

    mask_in_chans: int = 16  #: channels of the mask-downscaling convolutions
    #: segany-lite: the clicks and the mask input at the mask frame, added to the decoder's
    #: stride-4 features (``prompt_encoder.HighResPrompt``; needs ``use_high_res_features``)
    high_res_prompt: bool = False


@dataclass(frozen=True)
class MaskDecoderConfig:
    """The mask decoder and its two-way transformer."""

    num_multimask_outputs: int = 3  #: candidate masks for ambiguous prompts
    transformer_depth: int = 2  #: two-way attention blocks
    transformer_mlp_dim: int = 2048  #: MLP width inside the transformer
    transformer_num_heads: int = 8  #: attention heads
    attention_downsample_rate: int = 2  #: cross-attention internal dim = dim / rate
    iou_head_depth: int = 3  #: layers of the IoU prediction MLP
    iou_head_hidden_dim: int = 256  #: hidden width of the IoU prediction MLP
    use_high_res_features: bool = False  #: add encoder strides 4/8 in the upscaling path


@dataclass(frozen=True)
class SamConfig:
    """A whole model: image encoder + prompt encoder + mask decoder + input normalisation."""

    image_encoder: ViTEncoderConfig | LiteEncoderConfig = field(default_factory=ViTEncoderConfig)
    prompt_encoder: PromptEncoderConfig = field(default_factory=PromptEncoderConfig)
    mask_decoder: MaskDecoderConfig = field(default_factory=MaskDecoderConfig)
    pixel_mean: tuple[float, float, float] = (123.675, 116.28, 103.53)  #: RGB, 0..255 scale
    pixel_std: tuple[float, float, float] = (58.395, 57.12, 57.375)

    @property
    def prompt_embed_dim(self) -> int:
        return self.image_encoder.out_chans

    @property
    def img_size(self) -> int:
        return self.image_encoder.img_size

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SamConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError``."""
        try:
            enc = dict(data["image_encoder"])
            kind = enc.get("kind", "vit")
            encoder: ViTEncoderConfig | LiteEncoderConfig
            if kind == "vit":
                enc["global_attn_indexes"] = tuple(enc.get("global_attn_indexes", ()))
                encoder = ViTEncoderConfig(**enc)
            elif kind == "efficientnet_lite":
                encoder = LiteEncoderConfig(**enc)
            else:
                raise ValueError(f"unknown image encoder kind {kind!r}")
            return cls(
                image_encoder=encoder,
                prompt_encoder=PromptEncoderConfig(**data.get("prompt_encoder", {})),
                mask_decoder=MaskDecoderConfig(**data.get("mask_decoder", {})),
                pixel_mean=tuple(data.get("pixel_mean", SamConfig.pixel_mean)),  # type: ignore[arg-type]
                pixel_std=tuple(data.get("pixel_std", SamConfig.pixel_std)),  # type: ignore[arg-type]
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"invalid model config: {exc}") from exc


def build_image_encoder(cfg: ViTEncoderConfig | LiteEncoderConfig) -> nn.Module:
    if isinstance(cfg, LiteEncoderConfig):
        from .efficientnet import build_efficientnet_lite
        from .lite_encoder import LiteImageEncoder

        return LiteImageEncoder(
            backbone=build_efficientnet_lite(cfg.backbone),
            img_size=cfg.img_size,
            out_chans=cfg.out_chans,
            neck_blocks=cfg.neck_blocks,
        )
    return ImageEncoderViT(
        img_size=cfg.img_size,
        patch_size=cfg.patch_size,
        embed_dim=cfg.embed_dim,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
        mlp_ratio=cfg.mlp_ratio,
        out_chans=cfg.out_chans,
        norm_layer=nn.LayerNorm,
        norm_eps=1e-6,
        qkv_bias=True,
        use_rel_pos=True,
        window_size=cfg.window_size,
        global_attn_indexes=cfg.global_attn_indexes,
    )


def build_sam(config: SamConfig) -> Sam:
    """A randomly initialised :class:`Sam` for ``config`` (load weights separately)."""
    enc = config.image_encoder
    dim = config.prompt_embed_dim
    grid = enc.embedding_size
    dec = config.mask_decoder
    if config.prompt_encoder.high_res_prompt and not dec.use_high_res_features:
        raise ValueError("high_res_prompt needs a mask decoder with use_high_res_features")
    sam = Sam(
        image_encoder=build_image_encoder(enc),
        prompt_encoder=PromptEncoder(
            embed_dim=dim,
            image_embedding_size=(grid, grid),
            input_image_size=(enc.img_size, enc.img_size),
            mask_in_chans=config.prompt_encoder.mask_in_chans,
            high_res_prompt=config.prompt_encoder.high_res_prompt,
        ),
        mask_decoder=MaskDecoder(
            transformer_dim=dim,
            transformer=TwoWayTransformer(
                depth=dec.transformer_depth,
                embedding_dim=dim,
                num_heads=dec.transformer_num_heads,
                mlp_dim=dec.transformer_mlp_dim,
                attention_downsample_rate=dec.attention_downsample_rate,
            ),
            num_multimask_outputs=dec.num_multimask_outputs,
            iou_head_depth=dec.iou_head_depth,
            iou_head_hidden_dim=dec.iou_head_hidden_dim,
            use_high_res_features=dec.use_high_res_features,
        ),
        pixel_mean=config.pixel_mean,
        pixel_std=config.pixel_std,
    )
    sam.config = config
    return sam
