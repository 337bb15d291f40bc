"""SAM building blocks; parameter names equal the official checkpoints'."""

from .config import (
    LiteEncoderConfig,
    MaskDecoderConfig,
    PromptEncoderConfig,
    SamConfig,
    ViTEncoderConfig,
    build_sam,
)
from .image_encoder import ImageEncoderViT
from .mask_decoder import MaskDecoder
from .prompt_encoder import PromptEncoder
from .sam import Sam
from .transformer import TwoWayTransformer

__all__ = [
    "ImageEncoderViT",
    "LiteEncoderConfig",
    "MaskDecoder",
    "MaskDecoderConfig",
    "PromptEncoder",
    "PromptEncoderConfig",
    "Sam",
    "SamConfig",
    "TwoWayTransformer",
    "ViTEncoderConfig",
    "build_sam",
]
