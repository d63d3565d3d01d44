"""Where a training run gets a variant's pieces: the starting DiT weights, the VAE and the text encoders.

Official variants name Hub repositories; nano ships everything in the package (``packaged_path``, in the
diffusers layout ``transformer/`` and ``vae/``) and encodes text with MiniLM. Encoding a data folder
(encode.py) and rendering validation clips (validation.py) both load their components through here, so
the two always agree with each other and with generation (``api.Kandinsky5Model.from_pretrained``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..variants import Variant, packaged_path
from .config import ConfigError

__all__ = ["dit_source", "load_text_encoder", "load_vae", "vae_location", "vae_spatial_factor"]


def _packaged_folder(variant: Variant) -> Path | None:
    folder = packaged_path(variant)
    if folder is not None and not (folder / "transformer").is_dir():
        raise ConfigError(f"model: {variant.name}'s weights are missing from the package ({folder}); reinstall it")
    return folder


def dit_source(variant: Variant) -> str | Path:
    """What ``load_transformer`` reads for ``init = "pretrained"`` without ``weights``: the package folder
    of a packaged variant (nano), else the variant's name (its official Hub checkpoint)."""
    return _packaged_folder(variant) or variant.name


def vae_location(variant: Variant) -> tuple[str, str | None]:
    """(folder or Hub repo, subfolder) of the variant's VAE."""
    folder = _packaged_folder(variant)
    if folder is not None:
        return str(folder / "vae"), None
    return variant.vae_repo_id, variant.vae_subfolder


def _vae_class(variant: Variant):
    from ..vae import ImageVAE, VideoVAE

    return ImageVAE if variant.vae == "flux" else VideoVAE  # nano's VAE is a video VAE for all three tasks


def load_vae(variant: Variant, device: torch.device, dtype: torch.dtype | None = None):
    """The variant's VAE wrapper (``VideoVAE`` or ``ImageVAE``) on ``device``."""
    path, subfolder = vae_location(variant)
    return _vae_class(variant).from_pretrained(path, subfolder=subfolder, device=device, dtype=dtype)


def vae_spatial_factor(path: str, subfolder: str | None) -> int:
    """Pixels per latent along height and width of the VAE at ``path``, read from its ``config.json``
    alone (for processes that sample latents but never decode them): 8 for the official VAEs, 4 for nano's."""
    from diffusers import AutoencoderKLHunyuanVideo

    from ..vae import SPATIAL_FACTOR

    config = AutoencoderKLHunyuanVideo.load_config(path, subfolder=subfolder)  # reads config.json only
    return int(config.get("spatial_compression_ratio", SPATIAL_FACTOR))


def load_text_encoder(variant: Variant, device: torch.device, dtype: torch.dtype | None = None):
    """The variant's text encoder: ``NanoTextEncoder`` (MiniLM) for nano, else Qwen2.5-VL + CLIP."""
    if variant.text.kind == "minilm":
        from ..nano.text import NanoTextEncoder

        return NanoTextEncoder.from_pretrained(device=device)
    from ..text import TextEncoder

    return TextEncoder.from_spec(variant.text, device=device, dtype=dtype)
