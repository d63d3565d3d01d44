"""A generation request checked against a variant before any weights load.

``Kandinsky5Model.generate`` and the CLI both go through ``plan_generation``, so a bad size, frame
count or image fails in milliseconds with one clear message, and what was checked is what runs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from .images import area_preserving_size, nearest_resolution
from .media import load_image
from .sampling import random_seed, valid_num_frames
from .variants import MAX_SIDE, Variant

__all__ = ["GenerationRequest", "plan_generation"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationRequest:
    """Every setting of one generation, defaults filled in from the variant."""

    prompt: str
    negative_prompt: str | None  # None when guidance is off (no unconditional pass)
    num_frames: int  # exactly what is returned (the model runs the next 4k+1 count)
    height: int
    width: int
    num_inference_steps: int
    guidance_scale: float
    shift: float
    seed: int
    image: object | None  # PIL image for I2V / editing

    @property
    def uses_guidance(self) -> bool:
        return abs(self.guidance_scale - 1.0) > 1e-6


def plan_generation(
    variant: Variant,
    prompt: str,
    negative_prompt: str | None = None,
    num_frames: int | None = None,
    height: int | None = None,
    width: int | None = None,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    seed: int | None = None,
    image=None,
    shift: float | None = None,
) -> GenerationRequest:
    """Check a request and fill in the variant's defaults; raises ValueError (or FileNotFoundError for a
    missing image) with the fix. Loads the conditioning image, nothing else."""
    d = variant.sampling
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("prompt must be a non-empty string")
    steps = d.num_inference_steps if num_inference_steps is None else num_inference_steps
    guidance = d.guidance_scale if guidance_scale is None else guidance_scale
    shift = d.shift if shift is None else shift
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"num_inference_steps must be an integer >= 1, got {steps!r}")
    if not guidance >= 0:
        raise ValueError(f"guidance_scale must be >= 0, got {guidance}; 1 turns guidance off")
    if not shift > 0:
        raise ValueError(f"shift must be > 0, got {shift}; 1 means no shift")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64):
        raise ValueError(f"seed must be an integer from 0 to 2**64 - 1, got {seed!r}")
    source = _condition_image(variant, image)
    height, width = _size(variant, height, width, source)
    negative = (d.negative_prompt if negative_prompt is None else negative_prompt) if abs(guidance - 1) > 1e-6 else None
    return GenerationRequest(
        prompt=prompt, negative_prompt=negative, num_frames=_frames(variant, num_frames), height=height,
        width=width, num_inference_steps=steps, guidance_scale=float(guidance), shift=float(shift),
        seed=random_seed() if seed is None else seed, image=source,
    )  # fmt: skip


def _frames(variant: Variant, num_frames: int | None) -> int:
    if not variant.is_video:
        if num_frames not in (None, 1):
            raise ValueError(f"{variant.name} makes images: num_frames must be 1 or None, got {num_frames}")
        return 1
    frames = variant.sampling.num_frames if num_frames is None else num_frames
    most = variant.max_num_frames
    if isinstance(frames, bool) or not isinstance(frames, int) or not 1 <= frames <= most:
        raise ValueError(f"num_frames must be an integer from 1 to {most} for {variant.name}, got {frames!r}")
    if valid_num_frames(frames) != frames:
        logger.info("generating %d frames (4k+1) and returning the first %d", valid_num_frames(frames), frames)
    return frames


def _condition_image(variant: Variant, image):
    if image is None:
        if variant.task == "i2v":
            raise ValueError(f"{variant.name} animates an image: pass image=PATH (--image on the command line)")
        return None
    if variant.task not in ("i2v", "i2i"):
        raise ValueError(
            f"{variant.name} takes text only ({variant.task}); an image needs an image-to-video or editing variant"
        )
    return load_image(image) if isinstance(image, (str, Path)) else image.convert("RGB")


def _size(variant: Variant, height: int | None, width: int | None, source) -> tuple[int, int]:
    """Explicit sizes win; with an image and no size, the official rules pick one; else the default."""
    d, m = variant.sampling, variant.size_multiple
    if height is None and width is None and source is not None:
        size = (source.height, source.width)
        if variant.task == "i2i":
            height, width = nearest_resolution(size, variant.resolutions)
        else:
            height, width = area_preserving_size(size, d.height * d.width, m)
    height = d.height if height is None else height
    width = d.width if width is None else width
    if height < m or width < m or height % m or width % m:
        fix = f"{max(m, round(width / m) * m)}x{max(m, round(height / m) * m)}"
        raise ValueError(
            f"{variant.name} needs width and height in multiples of {m} pixels, got {width}x{height}; try {fix}"
        )
    if max(height, width) > MAX_SIDE:
        raise ValueError(f"{width}x{height}: at most {MAX_SIDE} pixels per side (the RoPE tables' length)")
    return height, width
