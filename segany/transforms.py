"""Resizing images and prompt coordinates to the model's input frame (longest side = S).

Same arithmetic as the reference ``ResizeLongestSide`` without torchvision: images are
resized with PIL's bilinear filter (what torchvision does for PIL images), coordinates are
scaled in float64.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def preprocess_shape(old_h: int, old_w: int, long_side: int) -> tuple[int, int]:
    """(h, w) after scaling so the longest side equals ``long_side`` (rounded half up)."""
    scale = long_side * 1.0 / max(old_h, old_w)
    new_h, new_w = old_h * scale, old_w * scale
    return int(new_h + 0.5), int(new_w + 0.5)


class ResizeLongestSide:
    """Resizes images to longest side ``target_length`` and maps coordinates along."""

    def __init__(self, target_length: int) -> None:
        self.target_length = target_length

    def apply_image(self, image: np.ndarray) -> np.ndarray:
        """``H x W x 3`` uint8 -> ``h x w x 3`` uint8."""
        h, w = preprocess_shape(image.shape[0], image.shape[1], self.target_length)
        return np.array(Image.fromarray(image).resize((w, h), Image.Resampling.BILINEAR))

    def apply_coords(self, coords: np.ndarray, original_size: tuple[int, int]) -> np.ndarray:
        """``... x 2`` (x, y) pixel coordinates in the original image -> model input frame."""
        old_h, old_w = original_size
        new_h, new_w = preprocess_shape(old_h, old_w, self.target_length)
        out = np.array(coords, dtype=np.float64, copy=True)
        out[..., 0] = out[..., 0] * (new_w / old_w)
        out[..., 1] = out[..., 1] * (new_h / old_h)
        return out

    def apply_boxes(self, boxes: np.ndarray, original_size: tuple[int, int]) -> np.ndarray:
        """``B x 4`` xyxy boxes -> model input frame."""
        return self.apply_coords(np.asarray(boxes).reshape(-1, 2, 2), original_size).reshape(-1, 4)

    def apply_image_torch(self, image: torch.Tensor) -> torch.Tensor:
        """``B x 3 x H x W`` float -> resized with antialiased bilinear interpolation."""
        h, w = preprocess_shape(image.shape[2], image.shape[3], self.target_length)
        return F.interpolate(image, (h, w), mode="bilinear", align_corners=False, antialias=True)

    def apply_coords_torch(
        self, coords: torch.Tensor, original_size: tuple[int, int]
    ) -> torch.Tensor:
        old_h, old_w = original_size
        new_h, new_w = preprocess_shape(old_h, old_w, self.target_length)
        out = coords.detach().clone().to(torch.float)
        out[..., 0] = out[..., 0] * (new_w / old_w)
        out[..., 1] = out[..., 1] * (new_h / old_h)
        return out

    def apply_boxes_torch(
        self, boxes: torch.Tensor, original_size: tuple[int, int]
    ) -> torch.Tensor:
        return self.apply_coords_torch(boxes.reshape(-1, 2, 2), original_size).reshape(-1, 4)
