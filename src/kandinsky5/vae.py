"""Autoencoders between pixels and the 16-channel latents the DiT works in (docs/kandinsky5.md §7).

- :class:`VideoVAE` wraps diffusers' ``AutoencoderKLHunyuanVideo`` (8x spatial, 4x causal temporal:
  F = 4k + 1 frames ↔ k + 1 latent frames), scaling factor 0.476986, no shift.
- :class:`ImageVAE` wraps diffusers' ``AutoencoderKL`` with the FLUX.1-dev weights (8x), scaling factor
  0.3611. FLUX's ``shift_factor`` is ignored on purpose, exactly like the official code: the Kandinsky
  image models were trained on ``z = scaling · x`` latents without the shift.

Both speak one layout: pixels (B, 3, F, H, W) in [-1, 1] and latents (B, T, H/8, W/8, 16) channels-last,
already multiplied by the scaling factor (images have F = T = 1). ``decode`` returns fp32 pixels clamped
to [-1, 1].

Deliberate differences from the official code:
- ``encode`` draws the posterior sample from an explicit generator (a CPU one seeded with 0 unless the
  caller passes one) instead of the global RNG, so a seed fixes the conditioning latent on any device.
- Tiling uses diffusers' tiled and frame-wise decoding. ``tiling="auto"`` depends on the size only, never
  on free GPU memory (the official policy is memory-adaptive, so its output varied with free VRAM).
"""

from __future__ import annotations

import logging
import math
from typing import Literal

import torch

from kandinsky5.devices import parse_dtype, resolve_device

__all__ = ["FLUX_SCALING_FACTOR", "HUNYUAN_SCALING_FACTOR", "ImageVAE", "Tiling", "VideoVAE"]

logger = logging.getLogger(__name__)

HUNYUAN_SCALING_FACTOR = 0.476986
FLUX_SCALING_FACTOR = 0.3611
SPATIAL_FACTOR = 8
TEMPORAL_FACTOR = 4

Tiling = bool | Literal["auto"]

# The official video tiler splits a frame spatially once a 17-frame, 256-channel activation of the
# (tile + 32 px border) reaches 2**31 elements, the int32 indexing limit of some CUDA kernels. That is
# the size-only part of its rule (the other part looks at free memory): SD sizes stay whole, HD is tiled.
_VIDEO_TILE_ELEMENTS = 2**31
# FLUX images are decoded whole up to 4 megapixels (every supported size); larger ones are tiled.
_IMAGE_TILE_PIXELS = 2048 * 2048


def _check_tiling(tiling: Tiling) -> None:
    if not (isinstance(tiling, bool) or tiling == "auto"):
        raise ValueError(f"tiling must be True, False or 'auto', got {tiling!r}")


def _default_generator(generator: torch.Generator | None) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(0) if generator is None else generator


class _LatentAutoencoder:
    """Shared loading, placement and scaling for the two wrappers."""

    expected_scaling_factor: float
    kind: str

    def __init__(self, vae) -> None:
        self.vae = vae.eval().requires_grad_(False)
        # The factor comes from the loaded config; a different value means other weights than the
        # official ones (for which latents would be scaled differently from what the DiT was trained on).
        self.scaling_factor = float(vae.config.scaling_factor)
        # nano's VAE (4x in space) carries its own factor; only the official 8x geometry warns.
        unexpected = not math.isclose(self.scaling_factor, self.expected_scaling_factor, rel_tol=1e-6)
        if unexpected and self.spatial_factor == SPATIAL_FACTOR:
            logger.warning(
                "%s VAE scaling_factor is %g, the official %s VAE uses %g; using the config value",
                self.kind,
                self.scaling_factor,
                self.kind,
                self.expected_scaling_factor,
            )

    @classmethod
    def _diffusers_class(cls):
        raise NotImplementedError

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo: str,
        *,
        subfolder: str | None = "vae",
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        **kwargs,
    ):
        """Load the diffusers autoencoder from a Hub repo or a local folder (``subfolder`` inside it).

        ``dtype`` defaults to bf16 on accelerators and fp32 on the CPU; ``kwargs`` go to the wrapper.
        """
        device = resolve_device(device)
        vae = cls._diffusers_class().from_pretrained(
            path_or_repo, subfolder=subfolder, torch_dtype=parse_dtype(dtype, device)
        )
        return cls(vae.to(device), **kwargs)

    @property
    def device(self) -> torch.device:
        return self.vae.device

    @property
    def dtype(self) -> torch.dtype:
        return self.vae.dtype

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def spatial_factor(self) -> int:
        """Pixels per latent along height and width: 8 for the official VAEs, 4 for nano's."""
        return int(getattr(self.vae.config, "spatial_compression_ratio", SPATIAL_FACTOR))

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        """Move (and optionally cast) the autoencoder; returns self."""
        self.vae.to(device=device, dtype=dtype)
        return self

    def _draw(self, posterior, generator: torch.Generator | None, sample: bool) -> torch.Tensor:
        """A posterior sample (or its mode), scaled; channels-first like the posterior."""
        z = posterior.sample(generator=_default_generator(generator)) if sample else posterior.mode()
        return z * self.scaling_factor

    def _check_latent(self, latent: torch.Tensor) -> None:
        if latent.ndim != 5 or latent.shape[-1] != self.latent_channels:
            raise ValueError(
                f"latent must be (B, T, H/{self.spatial_factor}, W/{self.spatial_factor}, {self.latent_channels}) "
                f"channels-last, got {tuple(latent.shape)}"
            )


# --------------------------------------------------------------------------------------------------
# Video: HunyuanVideo causal 3D VAE
# --------------------------------------------------------------------------------------------------


class VideoVAE(_LatentAutoencoder):
    """HunyuanVideo VAE: (B, 3, 4k+1, H, W) pixels ↔ (B, k+1, H/8, W/8, 16) latents (H/4, W/4 for nano's).

    Tiling (used when ``tiling`` is True, or "auto" decides so): frames are split into ``tile_size``
    pixel tiles every ``tile_stride`` pixels and blended; long videos are always processed in windows of
    ``tile_frames`` frames every ``tile_frames_stride`` frames (diffusers' frame-wise mode), and a batch
    one sample at a time. ``tiling=False`` runs everything in one pass.
    """

    expected_scaling_factor = HUNYUAN_SCALING_FACTOR
    kind = "HunyuanVideo"

    def __init__(
        self,
        vae,
        *,
        tile_size: int = 256,
        tile_stride: int = 192,
        tile_frames: int = 16,
        tile_frames_stride: int = 12,
    ) -> None:
        super().__init__(vae)
        if not (0 < tile_stride <= tile_size and 0 < tile_frames_stride <= tile_frames):
            raise ValueError(
                f"need 0 < stride <= size for tiles, got tile_size={tile_size}, tile_stride={tile_stride}, "
                f"tile_frames={tile_frames}, tile_frames_stride={tile_frames_stride}"
            )
        factor = self.spatial_factor
        if tile_size % factor or tile_stride % factor or tile_frames % TEMPORAL_FACTOR:
            raise ValueError(
                f"tile_size and tile_stride must be multiples of {factor}, tile_frames a multiple of {TEMPORAL_FACTOR}"
            )
        # Sets diffusers' tile geometry; whether tiles are used is decided per call.
        self.vae.enable_tiling(
            tile_sample_min_height=tile_size,
            tile_sample_min_width=tile_size,
            tile_sample_min_num_frames=tile_frames,
            tile_sample_stride_height=tile_stride,
            tile_sample_stride_width=tile_stride,
            tile_sample_stride_num_frames=tile_frames_stride,
        )
        self.vae.use_tiling = False

    @classmethod
    def _diffusers_class(cls):
        from diffusers import AutoencoderKLHunyuanVideo

        return AutoencoderKLHunyuanVideo

    def _set_tiling(self, tiling: Tiling, height: int, width: int) -> None:
        _check_tiling(tiling)
        chunked = tiling is not False
        if tiling == "auto":
            spatial = 256 * 17 * (height + 32) * (width + 32) >= _VIDEO_TILE_ELEMENTS
        else:
            spatial = tiling
        self.vae.use_tiling = spatial
        self.vae.use_framewise_encoding = self.vae.use_framewise_decoding = chunked
        self.vae.use_slicing = chunked

    @torch.no_grad()
    def encode(
        self,
        frames: torch.Tensor,
        *,
        generator: torch.Generator | None = None,
        sample: bool = True,
        tiling: Tiling = "auto",
    ) -> torch.Tensor:
        """(B, 3, F, H, W) in [-1, 1], F = 4k+1, H and W multiples of 8 → (B, k+1, H/8, W/8, 16).

        ``sample=True`` draws from the posterior like the official I2V code (with ``generator``, by
        default a CPU generator seeded with 0); ``sample=False`` takes its mode (the mean).
        """
        if frames.ndim != 5 or frames.shape[1] != 3:
            raise ValueError(f"frames must be (B, 3, F, H, W), got {tuple(frames.shape)}")
        num_frames, height, width = frames.shape[2:]
        if (num_frames - 1) % TEMPORAL_FACTOR:
            fix = TEMPORAL_FACTOR * round((num_frames - 1) / TEMPORAL_FACTOR) + 1
            raise ValueError(f"num_frames must be 4k+1, got {num_frames}; try {fix}")
        if height % self.spatial_factor or width % self.spatial_factor:
            raise ValueError(f"height and width must be multiples of {self.spatial_factor}, got {height}x{width}")
        self._set_tiling(tiling, height, width)
        posterior = self.vae.encode(frames.to(self.device, self.dtype)).latent_dist
        return self._draw(posterior, generator, sample).permute(0, 2, 3, 4, 1)  # (B, T, h, w, C)

    @torch.no_grad()
    def decode(self, latent: torch.Tensor, *, tiling: Tiling = "auto") -> torch.Tensor:
        """(B, T, h, w, 16) scaled latents → (B, 3, 4(T-1)+1, 8h, 8w) fp32 pixels in [-1, 1]."""
        self._check_latent(latent)
        self._set_tiling(tiling, latent.shape[2] * self.spatial_factor, latent.shape[3] * self.spatial_factor)
        z = latent.to(self.device, self.dtype).permute(0, 4, 1, 2, 3) / self.scaling_factor  # (B, C, T, h, w)
        return self.vae.decode(z).sample.float().clamp(-1.0, 1.0)


# --------------------------------------------------------------------------------------------------
# Images: FLUX.1-dev VAE
# --------------------------------------------------------------------------------------------------


class ImageVAE(_LatentAutoencoder):
    """FLUX VAE: (B, 3, 1, H, W) pixels ↔ (B, 1, H/8, W/8, 16) latents; ``z = 0.3611 · x``, no shift.

    The T axis of length 1 lets images travel through the same latent layout as videos. Tiling (when
    ``tiling`` is True, or "auto" above 4 megapixels) uses ``tile_size``-pixel tiles overlapping by
    ``tile_overlap`` of their side.
    """

    expected_scaling_factor = FLUX_SCALING_FACTOR
    kind = "FLUX"

    def __init__(self, vae, *, tile_size: int = 512, tile_overlap: float = 0.25) -> None:
        super().__init__(vae)
        downsample = 2 ** (len(vae.config.block_out_channels) - 1)
        if tile_size % downsample or not 0.0 <= tile_overlap < 1.0:
            raise ValueError(
                f"tile_size must be a multiple of {downsample} and tile_overlap in [0, 1), "
                f"got {tile_size}, {tile_overlap}"
            )
        # Ignoring config.shift_factor (0.1159 for FLUX.1-dev) is deliberate: see the module docstring.
        self.vae.tile_sample_min_size = tile_size
        self.vae.tile_latent_min_size = tile_size // downsample
        self.vae.tile_overlap_factor = tile_overlap

    @classmethod
    def _diffusers_class(cls):
        from diffusers import AutoencoderKL

        return AutoencoderKL

    def _set_tiling(self, tiling: Tiling, height: int, width: int) -> None:
        _check_tiling(tiling)
        self.vae.use_tiling = height * width > _IMAGE_TILE_PIXELS if tiling == "auto" else tiling
        self.vae.use_slicing = tiling is not False

    @torch.no_grad()
    def encode(
        self,
        images: torch.Tensor,
        *,
        generator: torch.Generator | None = None,
        sample: bool = True,
        tiling: Tiling = "auto",
    ) -> torch.Tensor:
        """(B, 3, 1, H, W) in [-1, 1], H and W multiples of 8 → (B, 1, H/8, W/8, 16).

        ``sample`` and ``generator`` as in :meth:`VideoVAE.encode` (the official editing code samples).
        """
        if images.ndim != 5 or images.shape[1] != 3 or images.shape[2] != 1:
            raise ValueError(f"images must be (B, 3, 1, H, W), got {tuple(images.shape)}")
        height, width = images.shape[-2:]
        if height % self.spatial_factor or width % self.spatial_factor:
            raise ValueError(f"height and width must be multiples of {self.spatial_factor}, got {height}x{width}")
        self._set_tiling(tiling, height, width)
        posterior = self.vae.encode(images[:, :, 0].to(self.device, self.dtype)).latent_dist
        return self._draw(posterior, generator, sample).permute(0, 2, 3, 1)[:, None]  # (B, 1, h, w, C)

    @torch.no_grad()
    def decode(self, latent: torch.Tensor, *, tiling: Tiling = "auto") -> torch.Tensor:
        """(B, 1, h, w, 16) scaled latents → (B, 3, 1, 8h, 8w) fp32 pixels in [-1, 1]."""
        self._check_latent(latent)
        if latent.shape[1] != 1:
            raise ValueError(f"image latents have T = 1, got {tuple(latent.shape)}")
        self._set_tiling(tiling, latent.shape[2] * SPATIAL_FACTOR, latent.shape[3] * SPATIAL_FACTOR)
        z = latent[:, 0].to(self.device, self.dtype).permute(0, 3, 1, 2) / self.scaling_factor  # (B, C, h, w)
        return self.vae.decode(z).sample[:, :, None].float().clamp(-1.0, 1.0)
