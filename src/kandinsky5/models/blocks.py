"""Attention layer and the two transformer blocks of the CrossDiT.

Text ("encoder") blocks refine the Qwen tokens with bidirectional self-attention; visual
("decoder") blocks add cross-attention to the refined text. Both are adaLN-modulated by one
vector per sample: time embedding + pooled CLIP embedding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import VisualAttention, dense_attention
from .layers import FeedForward, Modulation, gated_residual, modulate
from .rope import Rotary, apply_rope

__all__ = ["MultiheadAttention", "TextBlock", "VisualBlock"]


class MultiheadAttention(nn.Module):
    """Projections, per-head QK RMSNorm, optional RoPE; the kernel is chosen by the caller.

    ``round_qk_to_bf16`` reproduces the official code, which rounds q and k to bf16 after RoPE
    even in an fp32 run; it matters for parity (it turns last-bit differences into ~5e-5).
    """

    def __init__(self, dim: int, head_dim: int, round_qk_to_bf16: bool = True):
        super().__init__()
        self.head_dim = head_dim
        self.round_qk_to_bf16 = round_qk_to_bf16
        self.to_query = nn.Linear(dim, dim)
        self.to_key = nn.Linear(dim, dim)
        self.to_value = nn.Linear(dim, dim)
        # eps=None: the official RMSNorm runs on fp32 input, so eps = float32 machine epsilon.
        self.query_norm = nn.RMSNorm(head_dim)
        self.key_norm = nn.RMSNorm(head_dim)
        self.out_layer = nn.Linear(dim, dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (-1, self.head_dim))  # (B, S, heads, D)

    def _norm(self, x: torch.Tensor, norm: nn.RMSNorm, rope: Rotary | None) -> torch.Tensor:
        y = F.rms_norm(x.float(), (self.head_dim,), norm.weight.float(), torch.finfo(torch.float32).eps)
        y = y.to(x.dtype)
        if rope is not None:
            y = apply_rope(y, rope)
            if self.round_qk_to_bf16:
                y = y.to(torch.bfloat16)
        return y.to(x.dtype)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        rope: Rotary | None = None,
        key_mask: torch.Tensor | None = None,
        kernel: VisualAttention | None = None,
    ) -> torch.Tensor:
        """x: (B, S, dim); context (cross-attention keys/values): (B, L, dim) or None for self.

        key_mask: (B, L) bool over the keys; kernel: a sparse replacement for dense attention.
        """
        source = x if context is None else context
        q = self._norm(self._heads(self.to_query(x)), self.query_norm, rope)
        k = self._norm(self._heads(self.to_key(source)), self.key_norm, rope)
        v = self._heads(self.to_value(source))
        out = kernel(q, k, v) if kernel is not None else dense_attention(q, k, v, key_mask)
        return self.out_layer(out)


class TextBlock(nn.Module):
    """Official ``TransformerEncoderBlock``: modulated self-attention (1D RoPE) and feed-forward."""

    def __init__(self, model_dim: int, time_dim: int, ff_dim: int, head_dim: int, round_qk: bool = True):
        super().__init__()
        self.text_modulation = Modulation(time_dim, model_dim, 6)
        self.self_attention = MultiheadAttention(model_dim, head_dim, round_qk)
        self.feed_forward = FeedForward(model_dim, ff_dim)

    def forward(self, x: torch.Tensor, temb: torch.Tensor, rope: Rotary, key_mask: torch.Tensor | None) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.text_modulation(temb)
        x = gated_residual(x, self.self_attention(modulate(x, shift1, scale1), rope=rope, key_mask=key_mask), gate1)
        return gated_residual(x, self.feed_forward(modulate(x, shift2, scale2)), gate2)


class VisualBlock(nn.Module):
    """Official ``TransformerDecoderBlock``: self-attention (3D RoPE), cross-attention to text, FF."""

    def __init__(self, model_dim: int, time_dim: int, ff_dim: int, head_dim: int, round_qk: bool = True):
        super().__init__()
        self.visual_modulation = Modulation(time_dim, model_dim, 9)
        self.self_attention = MultiheadAttention(model_dim, head_dim, round_qk)
        self.cross_attention = MultiheadAttention(model_dim, head_dim, round_qk)
        self.feed_forward = FeedForward(model_dim, ff_dim)

    def forward(
        self,
        x: torch.Tensor,
        text: torch.Tensor,
        temb: torch.Tensor,
        rope: Rotary,
        text_mask: torch.Tensor | None,
        kernel: VisualAttention | None = None,
    ) -> torch.Tensor:
        """x: (B, S, D) visual tokens; text: (B, L, D) refined text tokens."""
        (shift1, scale1, gate1, shift2, scale2, gate2, shift3, scale3, gate3) = self.visual_modulation(temb)
        attn = self.self_attention(modulate(x, shift1, scale1), rope=rope, kernel=kernel)
        x = gated_residual(x, attn, gate1)
        cross = self.cross_attention(modulate(x, shift2, scale2), context=text, key_mask=text_mask)
        x = gated_residual(x, cross, gate2)
        return gated_residual(x, self.feed_forward(modulate(x, shift3, scale3)), gate3)
