"""segany: Segment Anything with exact official-checkpoint parity.

Public API::

    model = segany.build_model(checkpoint="sam_vit_b_01ec64.pth")
    predictor = segany.Predictor(model)
    predictor.set_image(segany.load_image("photo.jpg"))
    masks, scores, logits = predictor.predict(point_coords=[[320, 240]], point_labels=[1])
"""

from __future__ import annotations

from typing import Any

from .build import build_model
from .checkpoint import CheckpointError, save_safetensors
from .modeling import Sam, SamConfig, build_sam
from .optimize import optimize
from .predictor import Predictor
from .registry import ModelSpec, get_model_spec, list_models, register_model

__version__ = "0.1.0"

__all__ = [
    "AutomaticMaskGenerator",
    "CheckpointError",
    "ImageLoadError",
    "ModelSpec",
    "Predictor",
    "Sam",
    "SamConfig",
    "ZoomInPredictor",
    "build_model",
    "build_sam",
    "get_model_spec",
    "list_models",
    "load_image",
    "optimize",
    "register_model",
    "save_safetensors",
]


def __getattr__(name: str) -> Any:
    # Lazily imported so that `import segany` stays light (OpenCV/pycocotools load on use).
    if name == "AutomaticMaskGenerator":
        from .automatic import AutomaticMaskGenerator

        return AutomaticMaskGenerator
    if name == "ZoomInPredictor":
        from .zoom import ZoomInPredictor

        return ZoomInPredictor
    if name in ("load_image", "ImageLoadError"):
        from . import images

        return getattr(images, name)
    raise AttributeError(f"module 'segany' has no attribute {name!r}")
