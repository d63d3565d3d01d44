"""Conditioning images: the official sizing rules and the conversion to VAE input.

I2V picks a size of about the model's area that keeps the image's aspect ratio (no crop); editing
picks the listed resolution nearest the image's aspect ratio and crops the image to cover it.
Explicit sizes always win: the image is scaled to cover them and centre-cropped.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .media import vae_input_from_frames

__all__ = ["area_preserving_size", "cover_and_crop", "nearest_resolution", "to_model_input"]


def area_preserving_size(image_size: tuple[int, int], max_area: int, multiple: int) -> tuple[int, int]:
    """Official I2V rule: (h, w) of about ``max_area`` pixels with the image's aspect, rounded to
    ``multiple``: ``k = sqrt(max_area / (h·w)) / multiple``, ``new = round(side·k)·multiple``."""
    h, w = image_size
    k = math.sqrt(max_area / (h * w)) / multiple
    return max(1, round(h * k)) * multiple, max(1, round(w * k)) * multiple


def nearest_resolution(image_size: tuple[int, int], resolutions: tuple[tuple[int, int], ...]) -> tuple[int, int]:
    """The listed (h, w) whose aspect ratio is closest to the image's (official editing rule)."""
    h, w = image_size
    return min(resolutions, key=lambda hw: abs(math.log((hw[0] / hw[1]) / (h / w))))


def cover_and_crop(image, height: int, width: int):
    """Scale a PIL image to cover (height, width), then centre-crop to exactly that size."""
    from PIL import Image as PILImage

    scale = max(height / image.height, width / image.width)
    size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    resized = image.resize(size, PILImage.Resampling.BICUBIC)
    left, top = (resized.width - width) // 2, (resized.height - height) // 2
    return resized.crop((left, top, left + width, top + height))


def to_model_input(image) -> torch.Tensor:
    """PIL RGB → (1, 3, 1, H, W) float in [-1, 1] (``x / 127.5 − 1``, as the official code)."""
    return vae_input_from_frames(np.asarray(image, dtype=np.uint8)[None, None])  # (1, 1, H, W, 3) → (1, 3, 1, H, W)
