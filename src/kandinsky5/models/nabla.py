"""NABLA's token order: visual tokens grouped into 8×8 tiles per frame (64-token blocks).

The NABLA attention itself plugs in through ``attention.VisualAttention``; this module holds the
reversible re-ordering the DiT applies around the visual blocks when that attention asks for it.
"""

from __future__ import annotations

import torch
from einops import rearrange

__all__ = ["TILE", "check_fractal_grid", "fractal_flatten", "fractal_unflatten"]

TILE = 8  # tokens per tile side; a block is one frame's TILE×TILE tile = 64 tokens


def check_fractal_grid(grid: tuple[int, int, int]) -> None:
    """Token height and width must split into whole tiles (pixel sizes in multiples of 128)."""
    _, h, w = grid
    if h % TILE or w % TILE:
        raise ValueError(
            f"block-sparse attention needs a token grid divisible by {TILE}, got {h}x{w} tokens; "
            f"use a height and width that are multiples of {TILE * 16} pixels"
        )


def fractal_flatten(x: torch.Tensor) -> torch.Tensor:
    """(B, T, H, W, D) → (B, T·H·W, D): blocks in (t, h-tile, w-tile) raster order, each block
    one frame's 8×8 tile in row-major order."""
    check_fractal_grid(tuple(x.shape[1:4]))
    return rearrange(x, "b t (hb p) (wb q) d -> b (t hb wb p q) d", p=TILE, q=TILE)


def fractal_unflatten(x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """Exact inverse of ``fractal_flatten``: (B, S, D) → (B, T, H, W, D)."""
    t, h, w = grid
    return rearrange(x, "b (t hb wb p q) d -> b t (hb p) (wb q) d", t=t, hb=h // TILE, wb=w // TILE, p=TILE, q=TILE)
