"""Registry of model variants: name -> config, description and where official weights live.

Nothing is downloaded: official checkpoints are files the user already has; the URL is only
shown in messages so people know where to get them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from .modeling.config import (
    LiteEncoderConfig,
    MaskDecoderConfig,
    PromptEncoderConfig,
    SamConfig,
    ViTEncoderConfig,
)


@dataclass(frozen=True)
class ModelSpec:
    """A registered variant."""

    name: str
    config: SamConfig
    description: str
    checkpoint_file: str | None = None  #: official file name, if any
    url: str | None = None  #: where the official file can be downloaded (never fetched here)
    bundled: str | None = None  #: weights file shipped in ``segany/weights/``, if any
    #: "segment everything" filter defaults for this variant's weights (see
    #: :func:`generator_defaults`); empty: SAM's
    generator_defaults: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))


_REGISTRY: dict[str, ModelSpec] = {}
_ALIASES: dict[str, str] = {}


def register_model(spec: ModelSpec, *, aliases: tuple[str, ...] = ()) -> ModelSpec:
    """Adds ``spec`` to the registry; a name may be registered once."""
    for key in (spec.name, *aliases):
        if key in _REGISTRY or key in _ALIASES:
            raise ValueError(f"model name {key!r} is already registered")
    _REGISTRY[spec.name] = spec
    for alias in aliases:
        _ALIASES[alias] = spec.name
    return spec


def get_model_spec(name: str) -> ModelSpec:
    """The spec for ``name`` (or an alias); ``ValueError`` listing the known names otherwise."""
    key = _ALIASES.get(name, name)
    if key not in _REGISTRY:
        known = ", ".join(sorted(_REGISTRY))
        raise ValueError(f"unknown model {name!r}; known models: {known}")
    return _REGISTRY[key]


def list_models() -> list[ModelSpec]:
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def find_variant(config: SamConfig) -> str | None:
    """Name of the registered variant whose config equals ``config``, if any."""
    for spec in _REGISTRY.values():
        if spec.config == config:
            return spec.name
    return None


#: SAM's AutomaticMaskGenerator filter defaults (the official models' calibration).
SAM_GENERATOR_DEFAULTS: Mapping[str, float] = MappingProxyType(
    {"pred_iou_thresh": 0.88, "stability_score_thresh": 0.95, "stability_score_offset": 1.0}
)


def generator_defaults(model: Any) -> dict[str, float]:
    """The "segment everything" filter thresholds to use with ``model`` when none are given:
    its registered variant's (chosen on held-out training images for the bundled weights),
    else SAM's."""
    config = getattr(model, "config", None)
    name = find_variant(config) if isinstance(config, SamConfig) else None
    spec_defaults = get_model_spec(name).generator_defaults if name else {}
    return {**SAM_GENERATOR_DEFAULTS, **spec_defaults}


_BASE_URL = "https://dl.fbaipublicfiles.com/segment_anything/"


def _sam_vit(
    name: str, embed_dim: int, depth: int, heads: int, glob: tuple[int, ...], file: str, desc: str
) -> ModelSpec:
    cfg = SamConfig(
        image_encoder=ViTEncoderConfig(
            embed_dim=embed_dim, depth=depth, num_heads=heads, global_attn_indexes=glob
        )
    )
    return ModelSpec(name, cfg, desc, checkpoint_file=file, url=_BASE_URL + file)


register_model(
    _sam_vit("vit_b", 768, 12, 12, (2, 5, 8, 11), "sam_vit_b_01ec64.pth", "SAM ViT-B (91M)")
)
register_model(
    _sam_vit("vit_l", 1024, 24, 16, (5, 11, 17, 23), "sam_vit_l_0b3195.pth", "SAM ViT-L (308M)")
)
register_model(
    _sam_vit("vit_h", 1280, 32, 16, (7, 15, 23, 31), "sam_vit_h_4b8939.pth", "SAM ViT-H (636M)"),
    aliases=("default",),
)


#: segany-lite: EfficientNet-Lite0 (ImageNet; late stages fine-tuned) + fusion neck + SAM
#: prompt encoder and mask decoder with high-resolution features; 768 px input, 48 x 48 x 128
#: embedding. The decoder is SAM's at width 128 (not 256): 6x cheaper to train on 2 CPU cores
#: (measured).
SEGANY_LITE_CONFIG = SamConfig(
    image_encoder=LiteEncoderConfig(backbone="lite0", img_size=768, out_chans=128, neck_blocks=4),
    prompt_encoder=PromptEncoderConfig(high_res_prompt=True),
    mask_decoder=MaskDecoderConfig(
        transformer_mlp_dim=1024, iou_head_hidden_dim=128, use_high_res_features=True
    ),
    pixel_mean=(127.0, 127.0, 127.0),
    pixel_std=(128.0, 128.0, 128.0),
)
register_model(
    ModelSpec(
        "segany-lite",
        SEGANY_LITE_CONFIG,
        "segany's own offline model (Lite0, 768 px; see MODEL_CARD.md)",
        bundled="segany_lite.safetensors",
        # from benchmarks/tune_amg_thresholds.py --f1-tolerance 0.01 (F1 at mask IoU 0.5 on
        # the 14 held-out COCO_panoptic200 images; docs/amg_thresholds_segany_lite.json): its
        # pick, pred_iou_thresh 0.3 (the most masks within 0.01 of the best F1), upscales many
        # more candidates ('everything' 4.4-5.2 s on 640-px photos), so 0.4 (F1 0.170 against
        # 0.173, 3.2-4.7 s, the same masks there; benchmarks/lite_costs.py thresholds); SAM's
        # defaults keep no mask with these weights
        generator_defaults=MappingProxyType(
            {"pred_iou_thresh": 0.4, "stability_score_thresh": 0.7, "stability_score_offset": 1.0}
        ),
    )
)

#: The model used when no name and no checkpoint are given.
DEFAULT_MODEL = "segany-lite"
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


def bundled_weights_path(name: str) -> Path | None:
    """The installed weights file of ``name``'s bundled weights, or None if it has none."""
    spec = get_model_spec(name)
    if spec.bundled is None:
        return None
    path = WEIGHTS_DIR / spec.bundled
    return path if path.is_file() else None
