"""The one generation core shared by every task.

    prompt → TextEmbeddings ─┐
    seed → noise ────────────┼─ denoise (CFG velocity of the DiT, Euler steps) → latents
    task → Conditioning ─────┘

T2V, I2V, T2I and image editing differ only by the ``Conditioning`` passed in: nothing here knows
which task runs. Encoding prompts and decoding latents are the caller's job (``api.py``), so this
module depends on the model, the sampler and plain tensors only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .models import CrossDiT, VisualAttention
from .sampling import TIMESTEP_SCALE, Velocity, denoise, guided_velocity, normalize_first_frames

__all__ = ["Conditioning", "PromptEmbeddings", "dit_velocity", "sample_latents"]


@dataclass(frozen=True)
class PromptEmbeddings:
    """What the DiT reads of a prompt: Qwen tokens (B, L, D), their key mask (B, L), CLIP pooled (B, P)."""

    tokens: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor


@dataclass(frozen=True)
class Conditioning:
    """What a task adds to the noisy latent (official semantics, docs/kandinsky5.md §2.7, §5.4).

    first_frame: I2V. The clean latent of the input image (B, H, W, C); it replaces frame 0 of the
        noisy latent before every step and in the result, and the mask channel is 1 on frame 0.
        The condition channels stay zero, as in the official code (and diffusers 0.42.1); diffusers'
        first-frame normalisation differs (joint statistics over frames 0-3 and the batch).
    edit_latent: image editing. The latent of the source image (B, 1, H, W, C), placed in the
        condition channels with the mask channel set to 1.
    """

    first_frame: torch.Tensor | None = None
    edit_latent: torch.Tensor | None = None

    def splice_first_frame(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (B, T, H, W, C) with frame 0 replaced by the clean first frame (a new tensor); ``x`` itself
        without I2V. Training and probes noise a whole clip, then give the DiT frame 0 clean, as sampling does."""
        if self.first_frame is None:
            return x
        return torch.cat([self.first_frame.to(x)[:, None], x[:, 1:]], dim=1)

    def model_input(self, x: torch.Tensor, visual_cond: bool) -> torch.Tensor:
        """``[x | condition | mask]`` (2C + 1 channels) for conditioned models, else ``x``."""
        if not visual_cond:
            if self.first_frame is not None or self.edit_latent is not None:
                raise ValueError("this model takes no image conditioning (it has no condition channels)")
            return x
        mask = torch.zeros(*x.shape[:-1], 1, dtype=x.dtype, device=x.device)
        condition = torch.zeros_like(x)
        if self.first_frame is not None:
            mask[:, 0] = 1
        if self.edit_latent is not None:
            condition = self.edit_latent.to(x).expand_as(x)
            mask.fill_(1)
        return torch.cat([x, condition, mask], dim=-1)


def dit_velocity(
    dit: CrossDiT,
    prompt: PromptEmbeddings,
    conditioning: Conditioning,
    rope_scale: tuple[float, float, float],
    visual_attention: VisualAttention | None = None,
) -> Velocity:
    """The velocity ``(x, t) -> v`` of the DiT for one set of prompt embeddings.

    Latents are kept in fp32 between steps (the official code keeps bf16 latents; accumulating the
    Euler updates in fp32 is deliberate); the DiT runs in its own dtype and sees ``1000·t`` in fp32.
    A sample-predicting DiT (``config.prediction == "sample"``, nano) gives x0; its velocity is
    ``(x_t − x0) / t``, exact for every t the sampler asks about (t > 0).
    """
    dtype = dit.dtype
    tokens, pooled = prompt.tokens.to(dtype), prompt.pooled.to(dtype)
    batch = tokens.shape[0]
    predicts_velocity = dit.config.prediction == "velocity"

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != batch:
            raise ValueError(f"latent batch {x.shape[0]} does not match the prompt batch {batch}")
        time = (t.float() * TIMESTEP_SCALE).reshape(1).expand(batch).to(x.device)
        model_input = conditioning.model_input(x, dit.config.visual_cond).to(dtype)
        out = dit(model_input, tokens, pooled, time, prompt.mask, rope_scale, visual_attention).float()
        return out if predicts_velocity else (x - out) / t.float()

    return velocity


def _stacked(a: PromptEmbeddings, b: PromptEmbeddings) -> PromptEmbeddings | None:
    """Both prompts as one batch (cond first), or None when their token counts differ."""
    if a.tokens.shape[1:] != b.tokens.shape[1:]:
        return None
    return PromptEmbeddings(
        torch.cat([a.tokens, b.tokens]), torch.cat([a.mask, b.mask]), torch.cat([a.pooled, b.pooled])
    )


def _batched_guidance(
    dit: CrossDiT,
    both: PromptEmbeddings,
    conditioning: Conditioning,
    guidance_scale: float,
    rope_scale: tuple[float, float, float],
    visual_attention: VisualAttention | None,
) -> Velocity:
    """CFG with the conditional and unconditional passes in one DiT call (batch of two)."""
    doubled = Conditioning(
        first_frame=None if conditioning.first_frame is None else conditioning.first_frame.repeat(2, 1, 1, 1),
        edit_latent=None if conditioning.edit_latent is None else conditioning.edit_latent.repeat(2, 1, 1, 1, 1),
    )
    inner = dit_velocity(dit, both, doubled, rope_scale, visual_attention)

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        v_cond, v_uncond = inner(torch.cat([x, x]), t).chunk(2)
        return v_uncond + guidance_scale * (v_cond - v_uncond)

    return velocity


def sample_latents(
    dit: CrossDiT,
    prompt: PromptEmbeddings,
    negative: PromptEmbeddings | None,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    *,
    guidance_scale: float,
    rope_scale: tuple[float, float, float],
    conditioning: Conditioning = Conditioning(),
    visual_attention: VisualAttention | None = None,
    batch_guidance: bool = True,
    progress: bool = False,
    callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Denoise ``noise`` (B, T, H, W, C) into clean latents (fp32).

    Guidance 1.0 runs the conditional pass only. Otherwise both passes run, batched into one DiT
    call when the prompts have the same token count (``batch_guidance``): the same numbers as two
    calls, fewer weight reads. I2V applies the official first-frame rule and, after sampling, the
    first-frame statistics normalisation.
    """
    x = noise.float()
    use_cfg = abs(guidance_scale - 1.0) > 1e-6
    both = _stacked(prompt, negative) if use_cfg and negative is not None and batch_guidance else None
    if both is not None:
        velocity = _batched_guidance(dit, both, conditioning, guidance_scale, rope_scale, visual_attention)
    else:
        cond = dit_velocity(dit, prompt, conditioning, rope_scale, visual_attention)
        uncond = None if negative is None else dit_velocity(dit, negative, conditioning, rope_scale, visual_attention)
        velocity = guided_velocity(cond, uncond, guidance_scale)
    first = None if conditioning.first_frame is None else conditioning.first_frame.float()
    with torch.inference_mode():
        latents = denoise(velocity, x, timesteps, first_frame=first, callback=callback, progress=progress)
    if first is not None:
        latents = normalize_first_frames(latents)
    return latents
