"""The attention kernels behind every attention layer.

Layers hand over (B, S, heads, D) tensors and get (B, S, heads·D) back. Dense attention is
PyTorch's SDPA; sparse visual self-attention (NABLA) plugs in as a ``VisualAttention`` object that
the DiT receives per forward call, so the layers never know which kernel runs.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

__all__ = ["VisualAttention", "dense_attention"]


def dense_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Non-causal softmax attention with scale 1/sqrt(D).

    Args:
        q: (B, Sq, heads, D); k, v: (B, Sk, heads, D).
        key_mask: optional (B, Sk) bool, True = attend (text padding mask).
    Returns:
        (B, Sq, heads·D).
    """
    mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, 1, 1, Sk)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask
    )  # (B, heads, Sq, D)
    return out.transpose(1, 2).flatten(2)


class VisualAttention(Protocol):
    """A replacement for dense visual self-attention (the seam NABLA uses).

    ``fractal`` asks the DiT to order visual tokens in 8×8-token tiles per frame (64-token blocks)
    before the visual blocks and to restore raster order after them.
    """

    fractal: bool

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """(B, S, heads, D) ×3 → (B, S, heads·D), tokens in the order the DiT passes them."""
        ...
