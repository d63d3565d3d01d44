"""Rotary position embeddings: 1D for text tokens, 3D (t, h, w) for visual tokens.

Kandinsky 5 rotates interleaved pairs (x[2i], x[2i+1]) (GPT-J layout, not NeoX halves). The 3D
table concatenates per-axis frequency blocks [t | h | w]; ``scale`` divides the angles per axis
(position interpolation used by the SD and HD checkpoints).
"""

from __future__ import annotations

import math

import torch

__all__ = ["Rotary", "apply_rope", "rope_1d", "rope_3d", "sinusoid_freqs"]

MAX_PERIOD = 10000.0


def sinusoid_freqs(dim: int, device: torch.device | str | None = None) -> torch.Tensor:
    """``10000^(-j/dim)`` for j < dim, fp32, computed as the official ``get_freqs`` does."""
    j = torch.arange(dim, dtype=torch.float32, device=device)
    return torch.exp(-math.log(MAX_PERIOD) * j / dim)


class Rotary:
    """Unit complex numbers ``cos + i·sin`` of the rotation angles, shape (S, 1, D/2), shared by every
    attention layer of a forward pass (the 1 broadcasts over heads)."""

    def __init__(self, angles: torch.Tensor):
        # cos and sin themselves (torch.polar differs in the last bit, which bf16 q/k rounding amplifies)
        self.cis = torch.complex(angles.cos(), angles.sin()).unsqueeze(-2)

    def __len__(self) -> int:
        return self.cis.shape[0]

    @property
    def cos(self) -> torch.Tensor:
        return self.cis.real.squeeze(-2)  # (S, D/2)

    @property
    def sin(self) -> torch.Tensor:
        return self.cis.imag.squeeze(-2)

    def permute_tokens(self, order: torch.Tensor) -> Rotary:
        """The same rotations for tokens re-ordered by index ``order`` (e.g. NABLA's fractal order)."""
        out = Rotary.__new__(Rotary)
        out.cis = self.cis[order]
        return out


def rope_1d(length: int, head_dim: int, device: torch.device | str | None = None) -> Rotary:
    """Text positions 0..length-1 (the official table holds 1024 positions)."""
    pos = torch.arange(length, dtype=torch.float32, device=device)
    return Rotary(torch.outer(pos, sinusoid_freqs(head_dim // 2, device)))


def rope_3d(
    grid: tuple[int, int, int],
    axes_dims: tuple[int, int, int],
    scale: tuple[float, float, float] = (1.0, 1.0, 1.0),
    device: torch.device | str | None = None,
) -> Rotary:
    """Angles for a (T, H, W) token grid in raster order (t slowest), shape (T·H·W, sum(axes)/2).

    Each axis's angle is ``pos · freq`` in fp32 then divided by its scale factor, the same two
    roundings as the official table lookup followed by the division.
    """
    blocks = []
    for axis, (size, dim, factor) in enumerate(zip(grid, axes_dims, scale, strict=True)):
        pos = torch.arange(size, dtype=torch.float32, device=device)
        angles = torch.outer(pos, sinusoid_freqs(dim // 2, device)) / factor  # (size, dim/2)
        view = [1, 1, 1, dim // 2]
        view[axis] = size
        blocks.append(angles.view(view).expand(*grid, dim // 2))
    return Rotary(torch.cat(blocks, dim=-1).reshape(-1, sum(axes_dims) // 2))


def apply_rope(x: torch.Tensor, rope: Rotary) -> torch.Tensor:
    """Rotate interleaved pairs of ``x`` (B, S, heads, D) in fp32; returns fp32.

    Each pair (x0, x1) = (x[2i], x[2i+1]) is the complex number x0 + i·x1 multiplied by cos + i·sin:
    y0 = cos·x0 − sin·x1, y1 = sin·x0 + cos·x1 (one fused complex product, ~8x faster on CPU than
    separate real multiplies).
    """
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)).contiguous())  # (B, S, heads, D/2)
    return torch.view_as_real(pairs * rope.cis).flatten(-2)
