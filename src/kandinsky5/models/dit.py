"""CrossDiT: the Kandinsky 5 diffusion transformer (official ``DiffusionTransformer3D``).

    text   ─ text_embeddings ─ TextBlock × N_text ──────────────┐ (keys/values of cross-attention)
    time   ─ time_embeddings ─┐
    pooled ─ pooled_text_embeddings ─ + ─ temb (modulates every block)
    x_t    ─ visual_embeddings ─ VisualBlock × N_visual ─ out_layer ─ velocity

The forward pass is batched (the official code folds the batch into time): (B, T, H, W, C) latents
in channels-last layout, the same layout the sampler and VAEs use.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import DiTConfig
from .attention import VisualAttention
from .blocks import TextBlock, VisualBlock
from .layers import OutLayer, TextEmbeddings, TimeEmbeddings, VisualEmbeddings
from .nabla import fractal_flatten, fractal_unflatten
from .rope import rope_1d, rope_3d

__all__ = ["CrossDiT", "keeps_fp32"]

# Modules the official checkpoints store (and compute) in fp32 whatever the model dtype.
FP32_MODULES = frozenset({"time_embeddings", "text_modulation", "visual_modulation", "modulation"})


def keeps_fp32(key: str) -> bool:
    """Whether a state-dict key belongs to a module kept in fp32 (time embedding, modulation)."""
    return not FP32_MODULES.isdisjoint(key.split("."))


class CrossDiT(nn.Module):
    """Predicts the flow-matching velocity of visual latents given text and time."""

    def __init__(self, config: DiTConfig, round_qk_to_bf16: bool = True):
        super().__init__()
        self.config = config
        c = config
        self.time_embeddings = TimeEmbeddings(c.model_dim, c.time_dim)
        self.text_embeddings = TextEmbeddings(c.in_text_dim, c.model_dim)
        self.pooled_text_embeddings = TextEmbeddings(c.in_text_dim2, c.time_dim)
        self.visual_embeddings = VisualEmbeddings(c.visual_embed_dim, c.model_dim, c.patch_size)
        self.text_transformer_blocks = nn.ModuleList(
            TextBlock(c.model_dim, c.time_dim, c.ff_dim, c.head_dim, round_qk_to_bf16) for _ in range(c.num_text_blocks)
        )
        self.visual_transformer_blocks = nn.ModuleList(
            VisualBlock(c.model_dim, c.time_dim, c.ff_dim, c.head_dim, round_qk_to_bf16)
            for _ in range(c.num_visual_blocks)
        )
        self.out_layer = OutLayer(c.model_dim, c.time_dim, c.out_visual_dim, c.patch_size)
        self.gradient_checkpointing = False

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype: that of the bulk of the weights (not the fp32 islands)."""
        return self.visual_embeddings.in_layer.weight.dtype

    def cast_(self, dtype: torch.dtype) -> CrossDiT:
        """Cast weights to ``dtype`` in place, keeping time embedding and modulation in fp32."""
        for name, param in self.named_parameters():
            param.data = param.data.to(torch.float32 if keeps_fp32(name) else dtype)
        return self

    def _run(self, block: nn.Module, *args) -> torch.Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def forward(
        self,
        x: torch.Tensor,
        text: torch.Tensor,
        pooled_text: torch.Tensor,
        time: torch.Tensor,
        text_mask: torch.Tensor | None = None,
        rope_scale: tuple[float, float, float] = (1.0, 1.0, 1.0),
        visual_attention: VisualAttention | None = None,
    ) -> torch.Tensor:
        """Velocity for latents ``x``.

        Args:
            x: (B, T, H, W, C) latents, C = ``config.visual_embed_dim`` ([x_t | cond | mask] when
                ``visual_cond``).
            text: (B, L, in_text_dim) Qwen token states; pooled_text: (B, in_text_dim2) CLIP.
            time: (B,) or scalar model time = 1000·t (fp32 is kept: rounding it moves outputs).
            text_mask: (B, L) bool, True for real tokens; None when all are real.
            rope_scale: per-axis divisor of the visual RoPE angles (variant's ``rope_scale``).
            visual_attention: replaces dense visual self-attention (NABLA); None = dense.
        Returns:
            (B, T, H, W, out_visual_dim) in the model dtype.
        """
        c = self.config
        if x.ndim != 5 or x.shape[-1] != c.visual_embed_dim:
            raise ValueError(f"x must be (B, T, H, W, {c.visual_embed_dim}) latents, got shape {tuple(x.shape)}")
        pt, ph, pw = c.patch_size
        if x.shape[1] % pt or x.shape[2] % ph or x.shape[3] % pw:
            raise ValueError(f"latent (T, H, W) = {tuple(x.shape[1:4])} must divide by patch {c.patch_size}")
        batch = x.shape[0]
        time = time.reshape(-1).expand(batch) if time.numel() == 1 else time
        if text_mask is not None:
            if text_mask.shape != text.shape[:2]:
                raise ValueError(f"text_mask must be (B, L) = {tuple(text.shape[:2])}, got {tuple(text_mask.shape)}")
            # Tokenizers return 0/1 integers; SDPA would read a float mask as an additive bias.
            text_mask = text_mask.to(torch.bool)
            if bool(text_mask.all()):
                text_mask = None  # all tokens real: take the unmasked (faster) attention path

        temb = self.time_embeddings(time) + self.pooled_text_embeddings(pooled_text).float()
        text_tokens = self.text_embeddings(text)
        text_rope = rope_1d(text.shape[1], c.head_dim, x.device)
        for block in self.text_transformer_blocks:
            text_tokens = self._run(block, text_tokens, temb, text_rope, text_mask)

        visual = self.visual_embeddings(x)  # (B, T', H', W', D)
        grid = tuple(visual.shape[1:4])
        if getattr(visual_attention, "grid", grid) != grid:
            raise ValueError(f"visual_attention was built for token grid {visual_attention.grid}, got {grid}")
        rope = rope_3d(grid, c.axes_dims, rope_scale, x.device)
        fractal = visual_attention is not None and visual_attention.fractal
        if fractal:
            visual = fractal_flatten(visual)
            rope_grid = torch.arange(len(rope), device=x.device).view(1, *grid, 1)
            rope = rope.permute_tokens(fractal_flatten(rope_grid).view(-1))
        else:
            visual = visual.flatten(1, 3)  # raster order: t slowest, w fastest
        for block in self.visual_transformer_blocks:
            visual = self._run(block, visual, text_tokens, temb, rope, text_mask, visual_attention)
        visual = fractal_unflatten(visual, grid) if fractal else visual.unflatten(1, grid)
        return self.out_layer(visual, temb)
