"""Building blocks of the CrossDiT: embeddings, adaLN modulation, feed-forward, output layer.

Attribute names follow the official checkpoint keys, so loading is a plain ``load_state_dict``.
Precision islands are explicit casts (not CUDA autocast), so CPU and GPU follow the same policy:
time embedding, modulation and LayerNorm arithmetic in fp32, results rounded to the stream dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .rope import sinusoid_freqs

__all__ = [
    "FeedForward",
    "Modulation",
    "OutLayer",
    "TextEmbeddings",
    "TimeEmbeddings",
    "VisualEmbeddings",
    "gated_residual",
    "modulate",
]

LAYER_NORM_EPS = 1e-5


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: ``LN(x)·(1 + scale) + shift`` in fp32 (non-affine LN), rounded to x's dtype.

    x: (B, S, D); shift, scale: (B, 1, D) fp32.
    """
    normed = F.layer_norm(x.float(), x.shape[-1:], eps=LAYER_NORM_EPS)
    return (normed * (scale + 1.0) + shift).to(x.dtype)  # multiply then add, as the official code rounds


def gated_residual(x: torch.Tensor, out: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """``x + gate·out`` in fp32, rounded to x's dtype (the residual stream's storage dtype)."""
    return (x.float() + gate * out.float()).to(x.dtype)


class TimeEmbeddings(nn.Module):
    """Sinusoid of width ``model_dim`` ([cos | sin]) → MLP → (B, time_dim), always fp32."""

    def __init__(self, model_dim: int, time_dim: int):
        super().__init__()
        self.model_dim = model_dim
        self.in_layer = nn.Linear(model_dim, time_dim)
        self.out_layer = nn.Linear(time_dim, time_dim)

    def forward(self, time: torch.Tensor) -> torch.Tensor:
        """time: (B,) holding 1000·t."""
        freqs = sinusoid_freqs(self.model_dim // 2, time.device)
        args = torch.outer(time.float(), freqs)  # (B, model_dim/2)
        emb = torch.cat([args.cos(), args.sin()], dim=-1)
        weight_dtype = self.in_layer.weight.dtype
        hidden = F.silu(self.in_layer(emb.to(weight_dtype)))
        return self.out_layer(hidden).float()


class TextEmbeddings(nn.Module):
    """Linear projection then affine LayerNorm (in fp32), returned in the Linear's dtype."""

    def __init__(self, text_dim: int, out_dim: int):
        super().__init__()
        self.in_layer = nn.Linear(text_dim, out_dim)
        self.norm = nn.LayerNorm(out_dim, eps=LAYER_NORM_EPS)

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        dtype = self.in_layer.weight.dtype
        x = self.in_layer(text.to(dtype)).float()
        x = F.layer_norm(x, x.shape[-1:], self.norm.weight.float(), self.norm.bias.float(), self.norm.eps)
        return x.to(dtype)


class VisualEmbeddings(nn.Module):
    """Patchify (B, T, H, W, C) into tokens with features ordered (pt, ph, pw, C), channel fastest."""

    def __init__(self, visual_dim: int, model_dim: int, patch_size: tuple[int, int, int]):
        super().__init__()
        self.patch_size = patch_size
        self.in_layer = nn.Linear(math.prod(patch_size) * visual_dim, model_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pt, ph, pw = self.patch_size
        x = rearrange(x, "b (t pt) (h ph) (w pw) c -> b t h w (pt ph pw c)", pt=pt, ph=ph, pw=pw)
        return self.in_layer(x.to(self.in_layer.weight.dtype))  # (B, T', H', W', model_dim)


class Modulation(nn.Module):
    """SiLU → Linear producing ``num_params`` vectors of width ``model_dim`` (fp32 output)."""

    def __init__(self, time_dim: int, model_dim: int, num_params: int):
        super().__init__()
        self.num_params = num_params
        self.out_layer = nn.Linear(time_dim, num_params * model_dim)

    def forward(self, temb: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """temb: (B, time_dim) → ``num_params`` tensors (B, 1, model_dim) in fp32."""
        params = self.out_layer(F.silu(temb.float()).to(self.out_layer.weight.dtype)).float()
        return params.unsqueeze(1).chunk(self.num_params, dim=-1)


class FeedForward(nn.Module):
    """Linear → exact (erf) GELU → Linear, no biases."""

    def __init__(self, dim: int, ff_dim: int):
        super().__init__()
        self.in_layer = nn.Linear(dim, ff_dim, bias=False)
        self.out_layer = nn.Linear(ff_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_layer(F.gelu(self.in_layer(x)))


class OutLayer(nn.Module):
    """Final adaLN (shift, scale), projection and unpatchify.

    The projection's features are ordered (C, pt, ph, pw) — channel *slowest*, unlike the
    patch embedding's (pt, ph, pw, C). Both orders come from the official checkpoints.
    """

    def __init__(self, model_dim: int, time_dim: int, visual_dim: int, patch_size: tuple[int, int, int]):
        super().__init__()
        self.patch_size = patch_size
        self.modulation = Modulation(time_dim, model_dim, 2)
        self.out_layer = nn.Linear(model_dim, math.prod(patch_size) * visual_dim)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """x: (B, T', H', W', D) → (B, T'·pt, H'·ph, W'·pw, C)."""
        shift, scale = self.modulation(temb)
        b, t, h, w, d = x.shape
        x = modulate(x.reshape(b, t * h * w, d), shift, scale).reshape(b, t, h, w, d)
        y = self.out_layer(x)
        pt, ph, pw = self.patch_size
        return rearrange(y, "b t h w (c pt ph pw) -> b (t pt) (h ph) (w pw) c", pt=pt, ph=ph, pw=pw)
