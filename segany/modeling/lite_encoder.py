"""segany-lite image encoder: a CNN backbone + a neck producing SAM's image embedding.

The backbone gives features at strides 4, 8, 16 and 32. The neck fuses strides 8, 16 and 32
into the ``B x out_chans x S/16 x S/16`` embedding consumed by SAM's prompt encoder and mask
decoder, followed by a few ConvNeXt-style blocks for context. Strides 4 and 8 are also
projected to the decoder's upscaling widths (``out_chans/8`` at ``4h``, ``out_chans/4`` at
``2h``) so the decoder can draw sharp boundaries (``use_high_res_features``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .common import LayerNorm2d


class ConvNeXtBlock(nn.Module):
    """Depthwise 7x7 conv, LayerNorm, pointwise MLP, residual (``B x C x H x W``)."""

    def __init__(self, dim: int, mlp_ratio: float = 2.0) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = LayerNorm2d(dim)
        self.pwconv1 = nn.Conv2d(dim, int(dim * mlp_ratio), kernel_size=1)
        self.act = nn.GELU()
        self.pwconv2 = nn.Conv2d(int(dim * mlp_ratio), dim, kernel_size=1)
        self.gamma = nn.Parameter(torch.full((dim, 1, 1), 0.1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pwconv2(self.act(self.pwconv1(self.norm(self.dwconv(x)))))
        return x + self.gamma * y


class FusionNeck(nn.Module):
    """Strides 8/16/32 -> one stride-16 map of ``out_chans`` channels."""

    def __init__(self, in_channels: tuple[int, int, int], out_chans: int, num_blocks: int) -> None:
        super().__init__()
        c8, c16, c32 = in_channels
        self.lateral8 = nn.Conv2d(c8, out_chans, kernel_size=2, stride=2)  # 2h -> h
        self.lateral16 = nn.Conv2d(c16, out_chans, kernel_size=1)
        self.lateral32 = nn.Conv2d(c32, out_chans, kernel_size=1)
        self.fuse = nn.Sequential(
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )
        self.blocks = nn.Sequential(*[ConvNeXtBlock(out_chans) for _ in range(num_blocks)])
        self.out_norm = LayerNorm2d(out_chans)

    def forward(self, f8: torch.Tensor, f16: torch.Tensor, f32: torch.Tensor) -> torch.Tensor:
        top = F.interpolate(
            self.lateral32(f32), size=f16.shape[-2:], mode="bilinear", align_corners=False
        )
        x = self.lateral8(f8) + self.lateral16(f16) + top
        x = self.fuse(x)
        return self.out_norm(self.blocks(x))


class LiteImageEncoder(nn.Module):
    """``B x 3 x S x S`` -> (embedding ``B x C x S/16 x S/16``, [``C/8 @ S/4``, ``C/4 @ S/8``])."""

    def __init__(
        self,
        *,
        backbone: nn.Module,
        img_size: int = 512,
        out_chans: int = 256,
        neck_blocks: int = 2,
    ) -> None:
        super().__init__()
        self.img_size = img_size
        self.backbone = backbone
        c4, c8, c16, c32 = backbone.feature_channels  # type: ignore[misc]
        self.neck = FusionNeck((c8, c16, c32), out_chans, neck_blocks)
        self.conv_s0 = nn.Conv2d(c4, out_chans // 8, kernel_size=1)
        self.conv_s1 = nn.Conv2d(c8, out_chans // 4, kernel_size=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return self.forward_features(self.backbone(x))

    def forward_features(
        self, feats: list[torch.Tensor]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """From backbone features (strides 4, 8, 16, 32), e.g. cached ones during training."""
        f4, f8, f16, f32 = feats
        emb = self.neck(f8, f16, f32)
        return emb, [self.conv_s0(f4), self.conv_s1(f8)]
