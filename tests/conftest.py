"""Shared fixtures: tiny random SAM configs, the reference implementation on the same weights."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch

from segany.modeling import (
    LiteEncoderConfig,
    MaskDecoderConfig,
    SamConfig,
    ViTEncoderConfig,
    build_sam,
)

# Tiny but complete: windowed and global blocks, padding in window partition (grid 10 with
# window 4), 8 decoder heads so the variant is inferable from shapes like the official ones.
TINY = SamConfig(
    image_encoder=ViTEncoderConfig(
        img_size=160,
        patch_size=16,
        embed_dim=32,
        depth=3,
        num_heads=2,
        window_size=4,
        global_attn_indexes=(1,),
        out_chans=32,
    ),
    mask_decoder=MaskDecoderConfig(transformer_mlp_dim=64, iou_head_hidden_dim=32),
)

#: segany-lite in miniature: Lite0 backbone (random weights) at 128 px, high-res decoder.
TINY_LITE = SamConfig(
    image_encoder=LiteEncoderConfig(backbone="lite0", img_size=128, out_chans=32, neck_blocks=1),
    mask_decoder=MaskDecoderConfig(
        transformer_mlp_dim=64, iou_head_hidden_dim=32, use_high_res_features=True
    ),
    pixel_mean=(127.0, 127.0, 127.0),
    pixel_std=(128.0, 128.0, 128.0),
)


def randomize_(model: torch.nn.Module, seed: int = 0, scale: float = 0.2) -> torch.nn.Module:
    """Fills every parameter with random values (zero-initialised tables too) so parity bites."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * scale
            if name.endswith("weight") and ("norm" in name or p.ndim == 1):
                p.copy_(1.0 + noise)
            else:
                p.copy_(noise)
    return model


def build_reference(config: SamConfig) -> torch.nn.Module:
    """The reference ``segment_anything`` Sam with the same architecture numbers."""
    from segment_anything.modeling import (
        ImageEncoderViT,
        MaskDecoder,
        PromptEncoder,
        Sam,
        TwoWayTransformer,
    )

    enc, dec = config.image_encoder, config.mask_decoder
    dim = config.prompt_embed_dim
    grid = enc.img_size // enc.patch_size
    ref = Sam(
        image_encoder=ImageEncoderViT(
            depth=enc.depth,
            embed_dim=enc.embed_dim,
            img_size=enc.img_size,
            mlp_ratio=enc.mlp_ratio,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=enc.num_heads,
            patch_size=enc.patch_size,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=list(enc.global_attn_indexes),
            window_size=enc.window_size,
            out_chans=enc.out_chans,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=dim,
            image_embedding_size=(grid, grid),
            input_image_size=(enc.img_size, enc.img_size),
            mask_in_chans=config.prompt_encoder.mask_in_chans,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=dec.num_multimask_outputs,
            transformer=TwoWayTransformer(
                depth=dec.transformer_depth,
                embedding_dim=dim,
                mlp_dim=dec.transformer_mlp_dim,
                num_heads=dec.transformer_num_heads,
            ),
            transformer_dim=dim,
            iou_head_depth=dec.iou_head_depth,
            iou_head_hidden_dim=dec.iou_head_hidden_dim,
        ),
        pixel_mean=list(config.pixel_mean),
        pixel_std=list(config.pixel_std),
    )
    return ref.eval()


def make_pair(config: SamConfig = TINY, seed: int = 0, scale: float = 0.2):
    """(segany model, reference model) with identical random weights."""
    ours = randomize_(build_sam(config), seed, scale).eval()
    ref = build_reference(config)
    ref.load_state_dict(ours.state_dict(), strict=True)
    return ours, ref


def synthetic_image(h: int = 120, w: int = 180, seed: int = 0) -> np.ndarray:
    """A structured RGB uint8 image: gradients plus a few flat shapes."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (h + w)], -1)
    for _ in range(4):
        cy, cx, r = rng.integers(0, h), rng.integers(0, w), rng.integers(8, 30)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.integers(0, 255, 3)
    img += rng.normal(0, 4, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


@pytest.fixture(scope="session")
def tiny_pair():
    return make_pair(TINY)


@pytest.fixture()
def image() -> np.ndarray:
    return synthetic_image()
