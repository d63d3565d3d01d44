"""Validation clips during training: the config's prompts rendered through the generation pipeline.

Every ``validation_every`` steps (and after the last one) each prompt becomes
``output_dir/validation/step_XXXXXXX/NN_<prompt words>.mp4``, sampled with the trained weights (the
EMA weights when the run keeps an EMA) from the same seed each time, so clips of successive steps
compare like for like. Prompts are encoded once, on the first render, and the text encoders freed;
the VAE stays loaded for the next renders.

The VAE and text encoders come from ``validation_vae`` / ``validation_text_encoders`` or, for a
variant, from the variant's repositories (nano: the package's VAE, 4x in space, and MiniLM). Under
FSDP every rank samples (the forward passes gather the shards together); rank 0 alone decodes and writes.
"""

from __future__ import annotations

import contextlib
import logging
import re
from pathlib import Path

import torch
from torch import nn

from ..pipeline import PromptEmbeddings, sample_latents
from ..sampling import initial_noise, latent_frames, timestep_grid
from .components import load_text_encoder, load_vae, vae_location, vae_spatial_factor
from .config import TrainConfig
from .distributed import Distributed
from .ema import EMA

__all__ = ["VALIDATION", "Validator"]

logger = logging.getLogger(__name__)

VALIDATION = "validation"  # sub-folder of output_dir
DEFAULT_MAX_TEXT_LENGTH = 256


def clip_name(index: int, prompt: str) -> str:
    """``03_a_red_fox_runs.mp4``: the prompt's first words, safe on every file system."""
    words = re.sub(r"[^a-z0-9]+", "_", prompt.lower()).strip("_")[:40].rstrip("_")
    return f"{index:02d}_{words or 'prompt'}.mp4"


class Validator:
    """Renders ``config.validation_prompts`` with the model being trained; see the module docstring."""

    def __init__(self, config: TrainConfig, device: torch.device, parallel: Distributed):
        self.config, self.device, self.parallel = config, device, parallel
        variant = config.variant
        self.guidance_scale = config.validation_guidance_scale or (variant.sampling.guidance_scale if variant else 1.0)
        self.negative_prompt = variant.sampling.negative_prompt if variant else ""
        self.fps = variant.sampling.fps if variant else 24
        self._prompts: list[tuple[PromptEmbeddings, PromptEmbeddings | None]] | None = None
        self._vae = None

    # --- components ----------------------------------------------------------------------------------

    def _encode_prompts(self) -> list[tuple[PromptEmbeddings, PromptEmbeddings | None]]:
        c, variant = self.config, self.config.variant
        if c.validation_text_encoders is not None:
            from ..text import TextEncoder

            qwen, clip = c.validation_text_encoders
            encoder = TextEncoder.from_pretrained(qwen, clip, device=self.device, dtype=torch.float32)
        else:
            encoder = load_text_encoder(variant, self.device, torch.float32)  # nano: MiniLM
        template = variant.text.template if variant else "video"
        max_length = variant.text.qwen_max_length if variant else DEFAULT_MAX_TEXT_LENGTH

        def encode(text: str) -> PromptEmbeddings:
            e = encoder.encode([text], template, max_length)
            return PromptEmbeddings(e.tokens.to(self.device), e.mask.to(self.device), e.pooled.to(self.device))

        use_cfg = abs(self.guidance_scale - 1.0) > 1e-6
        negative = encode(self.negative_prompt) if use_cfg else None
        return [(encode(prompt), negative) for prompt in c.validation_prompts]

    def _load_vae(self):
        c = self.config
        if c.validation_vae is not None:
            from ..vae import VideoVAE

            return VideoVAE.from_pretrained(c.validation_vae, subfolder="vae", device=self.device, dtype=torch.float32)
        return load_vae(c.variant, self.device, torch.float32)  # nano: the package's VAE

    def _spatial_factor(self) -> int:
        """Pixels per latent of the VAE that decodes the clips (4 for nano's, 8 for the official ones)."""
        if self._vae is not None:
            return self._vae.spatial_factor
        c = self.config  # a rank that samples but does not decode: the VAE's config file is enough
        location = (c.validation_vae, "vae") if c.validation_vae is not None else vae_location(c.variant)
        return vae_spatial_factor(*location)

    # --- rendering -----------------------------------------------------------------------------------

    @torch.no_grad()
    def render(self, model: nn.Module, step: int, ema: EMA | None = None) -> list[Path]:
        """Sample every prompt with ``model`` (the unwrapped DiT); rank 0 writes and returns the clips."""
        from ..media import Video, frames_from_vae_output

        c = self.config
        if self._prompts is None:
            self._prompts = self._encode_prompts()  # the text encoders are freed when this returns
        if self._vae is None and self.parallel.is_main:
            self._vae = self._load_vae()
        height, width = c.validation_size
        factor = self._spatial_factor()  # validation_size is a multiple of 16, so of the factor too
        frames, channels = latent_frames(c.validation_num_frames), model.config.in_visual_dim
        shape = (1, frames, height // factor, width // factor, channels)  # (B, T, H/f, W/f, C)
        folder = Path(c.output_dir) / VALIDATION / f"step_{step:07d}"
        written = []
        was_training = model.training
        model.eval()
        try:
            with ema.applied() if ema is not None else contextlib.nullcontext():
                for index, (prompt, negative) in enumerate(self._prompts):
                    noise = initial_noise(shape, c.seed + index, device=self.device)
                    latents = sample_latents(
                        model, prompt, negative, noise, timestep_grid(c.validation_steps, c.resolved_shift),
                        guidance_scale=self.guidance_scale, rope_scale=c.resolved_rope_scale,
                    )  # fmt: skip
                    if not self.parallel.is_main:
                        continue
                    decoded = self._vae.decode(latents.to(self._vae.device))  # (1, 3, F', H, W)
                    frames = frames_from_vae_output(decoded[0, :, : c.validation_num_frames].float().cpu())
                    video = Video(frames, fps=self.fps, metadata={"prompt": c.validation_prompts[index], "step": step})
                    written.append(video.save(folder / clip_name(index, c.validation_prompts[index])))
        finally:
            model.train(was_training)
        if written:
            logger.info("validation clips of step %d in %s", step, folder)
        return written
