"""The user-facing classes: load a Kandinsky 5 model once, then ``generate`` videos or images.

    model = Kandinsky5VideoLite.from_pretrained("kandinskylab/Kandinsky-5.0-T2V-Lite")
    model.enable_model_cpu_offload()
    video = model.generate(prompt="A mountain lake at dawn", num_frames=120)
    video.save("output.mp4")

One class per family; they share everything below and differ only in which variants they accept.
"""

from __future__ import annotations

import logging
import math
import time as _time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import ClassVar

import torch

from . import __version__
from .checkpoint import CheckpointError, load_dit
from .config import NablaConfig
from .devices import parse_dtype, resolve_device
from .hub import resolve_dit_files, resolve_pipeline_files
from .images import cover_and_crop, to_model_input
from .lora import LoraWeights, apply_loras, read_lora
from .media import Image, Video, frames_from_vae_output
from .models import CrossDiT, NablaAttention, visual_attention_for
from .offload import Placement
from .pipeline import Conditioning, PromptEmbeddings, sample_latents
from .request import plan_generation
from .sampling import initial_noise, latent_frames, timestep_grid
from .variants import (
    Variant,
    get_variant,
    nano_variant,
    packaged_path,
    resolve_model_name,
    variant_for_folder,
    variant_for_repo,
)

__all__ = [
    "Kandinsky5ImageLite",
    "Kandinsky5Model",
    "Kandinsky5Nano",
    "Kandinsky5VideoLite",
    "Kandinsky5VideoPro",
    "load",
    "load_transformer",
]

logger = logging.getLogger(__name__)

StepCallback = Callable[[int, torch.Tensor, torch.Tensor], None]


def load_transformer(
    source: str | Path,
    variant: str | None = None,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
) -> CrossDiT:
    """Load the CrossDiT of an official checkpoint from a file, a folder, a variant name or a Hub repo.

    The architecture comes from the diffusers ``config.json`` when the files carry one, else from the
    variant (named by ``variant`` or recognised from the repo id). Defaults: the best device present,
    bf16 on accelerators and fp32 on the CPU; time embedding and modulation always stay fp32.
    """
    resolved = resolve_dit_files(source, variant)
    name = variant or resolved.variant
    config = resolved.config
    if name is not None:
        expected = get_variant(name).dit
        if config is not None and config != expected:
            raise CheckpointError(f"{source}: its config.json describes {config}, not variant {name!r}")
        config = expected
    if config is None:
        raise CheckpointError(
            f"{source}: cannot tell which architecture this file holds; pass variant= (see `kandinsky5 models`)"
        )
    device = resolve_device(device)
    model = load_dit(resolved.files, config, device=device, dtype=parse_dtype(dtype, device), expected=name)
    logger.info("loaded %s DiT (%s layout) on %s", name or "custom", resolved.layout, device)
    return model


class Kandinsky5Model:
    """A loaded variant: DiT, text encoder and VAE, and the one ``generate`` they share."""

    families: ClassVar[tuple[str, ...]] = ()  # variant-name prefixes this class accepts
    default_variant: ClassVar[str] = ""  # for local folders that do not say which variant they hold

    def __init__(self, variant: Variant, dit: CrossDiT, text_encoder, vae, device: torch.device):
        self.variant = variant
        self.dit = dit
        self.text_encoder = text_encoder
        self.vae = vae
        self.device = device
        self.placement = Placement(device)
        self.record_attention_stats = False  # NABLA: record the kept-block fraction of every call
        self.last_attention = None  # the visual attention of the last generate (its stats, if recorded)

    # ------------------------------------------------------------------------------------- loading

    @classmethod
    def from_pretrained(
        cls,
        repo_id_or_path: str | Path,
        variant: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
    ) -> Kandinsky5Model:
        """Load every component from a variant name, a Hub repo id or a local folder.

        Short repo names such as ``kandinskylab/Kandinsky-5.0-T2V-Lite`` pick the family's default
        variant (logged); ``variant=`` overrides. Defaults: best device, bf16 on accelerators, fp32 on CPU.
        """
        from .vae import ImageVAE, VideoVAE

        spec = cls._pick_variant(repo_id_or_path, variant)
        device = resolve_device(device)
        dtype = parse_dtype(dtype, device)
        files = resolve_pipeline_files(_weights_source(repo_id_or_path, spec), spec)
        logger.info("loading %s (%s) on %s in %s", spec.name, spec.description, device, dtype)
        dit = load_dit(files.dit.files, files.dit.config or spec.dit, device=device, dtype=dtype, expected=spec.name)
        text = _text_encoder(spec, files, device, dtype)
        vae_class = ImageVAE if spec.vae == "flux" else VideoVAE
        vae = vae_class.from_pretrained(str(files.vae), subfolder=None, device=device, dtype=dtype)
        model_class = cls if cls.families else _class_for(spec)
        return model_class(spec, dit, text, vae, device)

    @classmethod
    def _pick_variant(cls, source: str | Path, variant: str | None) -> Variant:
        """``variant`` if given; for a local folder the variant whose file it holds, else the class's
        default; otherwise the name, repo id or family short name ``source`` stands for."""
        if variant is not None:
            spec = get_variant(variant)
        elif Path(str(source)).expanduser().exists():
            spec = variant_for_folder(Path(str(source)).expanduser())
            if spec is None and not cls.default_variant:
                raise ValueError(f"{source}: cannot tell which variant this folder holds; pass variant=")
            spec = spec or get_variant(cls.default_variant)
            logger.info("%s: using variant %s (pass variant= to choose another)", source, spec.name)
        else:
            spec = resolve_model_name(str(source))
        if cls.families and not spec.name.startswith(cls.families):
            raise ValueError(
                f"{cls.__name__} runs {' / '.join(f'{f}-*' for f in cls.families)} variants, not "
                f"{spec.name!r}; use the class of that family"
            )
        return spec

    def enable_model_cpu_offload(self) -> Kandinsky5Model:
        """Keep components in host memory; move each to the accelerator only while it runs."""
        self.placement = Placement(self.device, offload=True)
        for component in (self.text_encoder, self.dit, self.vae):
            self.placement.place(component)
        return self

    def to(self, device: torch.device | str) -> Kandinsky5Model:
        self.device = resolve_device(device)
        self.placement = Placement(self.device)
        for component in (self.text_encoder, self.dit, self.vae):
            self.placement.place(component)
        return self

    # ---------------------------------------------------------------------------------- generation

    @torch.inference_mode()
    def generate(
        self,
        prompt: str,
        negative_prompt: str | None = None,
        num_frames: int | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        seed: int | None = None,
        image=None,
        shift: float | None = None,
        progress: bool = True,
        callback_on_step_end: StepCallback | None = None,
        *,
        attention: str | None = None,
        nabla: NablaConfig | None = None,
        lora: str | Path | Sequence[str | Path] | None = None,
        lora_scale: float | Sequence[float] = 1.0,
    ) -> Video | Image:
        """Generate from ``prompt``; anything not given takes the variant's default.

        ``num_frames`` may be any count ≥ 1 up to the variant's maximum: the model works on 4k+1
        frames, so we generate the next valid count and return exactly ``num_frames``. ``image`` (a
        path or PIL image) animates a first frame (I2V variants) or is edited (image editing).
        ``attention`` switches NABLA block-sparse attention on ("nabla", with ``nabla`` overriding the
        threshold and window) or off ("dense") whatever the variant ships; NABLA needs sizes in multiples of
        128 pixels. With ``record_attention_stats`` set, ``last_attention.stats_per_layer(n)`` afterwards
        gives the kept-block fraction per layer.

        ``lora``: one LoRA file (diffusers Kandinsky 5 format, peft or kohya naming; docs/training.md) or
        a list of them, applied for this call only with strength ``lora_scale`` (one value, or one per
        file); the DiT is the base model again afterwards, and strength 0 gives exactly the base output.
        """
        started = _time.perf_counter()
        loras = self._read_loras(lora, lora_scale)  # checked before any work
        r = plan_generation(
            self.variant, prompt, negative_prompt, num_frames, height, width, num_inference_steps,
            guidance_scale, seed, image, shift,
        )  # fmt: skip
        v = self.variant
        pixels = None if r.image is None else to_model_input(cover_and_crop(r.image, r.height, r.width))
        with self.placement.use(self.text_encoder):
            positive, negative = self._encode_prompts(r.prompt, r.negative_prompt, pixels)
        conditioning = Conditioning()
        if pixels is not None:
            generator = torch.Generator().manual_seed(r.seed)
            with self.placement.use(self.vae):
                latent = self.vae.encode(pixels.to(self.vae.device), generator=generator)
            i2v = v.task == "i2v"
            conditioning = Conditioning(first_frame=latent[:, 0]) if i2v else Conditioning(edit_latent=latent)

        factor = self.vae.spatial_factor
        shape = (1, latent_frames(r.num_frames), r.height // factor, r.width // factor, self.dit.config.in_visual_dim)
        self.last_attention = self._visual_attention(shape, attention, nabla)
        noise = initial_noise(shape, r.seed, device=self.device)
        with self.placement.use(self.dit), apply_loras(self.dit, loras):
            latents = sample_latents(
                self.dit, positive, negative, noise, timestep_grid(r.num_inference_steps, r.shift),
                guidance_scale=r.guidance_scale, rope_scale=v.sampling.rope_scale,
                conditioning=_to_device(conditioning, self.device),
                visual_attention=self.last_attention, progress=progress,
                callback=callback_on_step_end,
            )  # fmt: skip
        with self.placement.use(self.vae):
            decoded = self.vae.decode(latents.to(self.vae.device))  # (1, 3, F', H, W)
        metadata = {
            "prompt": r.prompt, "negative_prompt": r.negative_prompt, "seed": r.seed, "model": v.name,
            "steps": r.num_inference_steps, "guidance_scale": r.guidance_scale, "shift": r.shift,
            "height": r.height, "width": r.width, "kandinsky5_version": __version__,
        }  # fmt: skip
        if loras:
            metadata["lora"] = [[str(weights.path), strength] for weights, strength in loras]
        logger.info("generated %s in %.1f s", "video" if v.is_video else "image", _time.perf_counter() - started)
        if not v.is_video:
            return Image.from_tensor(decoded[0, :, 0].cpu(), metadata=metadata)
        frames = frames_from_vae_output(decoded[0, :, : r.num_frames].cpu())
        return Video(frames, fps=v.sampling.fps, metadata=metadata)

    def _read_loras(
        self, lora: str | Path | Sequence[str | Path] | None, scale: float | Sequence[float]
    ) -> list[tuple[LoraWeights, float]]:
        """``generate``'s ``lora`` and ``lora_scale`` as (weights, strength) pairs, checked against the DiT."""
        if lora is None:
            return []
        paths = [lora] if isinstance(lora, (str, Path)) else list(lora)
        scales = [scale] * len(paths) if isinstance(scale, (int, float)) else list(scale)
        if len(scales) != len(paths):
            raise ValueError(f"lora_scale: give one value, or one per LoRA ({len(paths)}); got {len(scales)}")
        if not all(isinstance(s, (int, float)) and math.isfinite(s) for s in scales):
            raise ValueError(f"lora_scale: strengths must be finite numbers, got {scales}")
        return [(read_lora(path, self.dit.config), float(s)) for path, s in zip(paths, scales, strict=True)]

    def _encode_prompts(self, prompt: str, negative: str | None, pixels: torch.Tensor | None):
        spec = self.variant.text
        images = None
        if spec.template == "image_edit":
            images = ((pixels[:, :, 0] + 1.0) * 127.5).round().to(torch.uint8)
        max_length = None if spec.template == "image_edit" else spec.qwen_max_length

        def encode(text: str) -> PromptEmbeddings:
            e = self.text_encoder.encode([text], spec.template, max_length, images=images)
            return PromptEmbeddings(e.tokens.to(self.device), e.mask.to(self.device), e.pooled.to(self.device))

        return encode(prompt), None if negative is None else encode(negative)

    def _visual_attention(self, latent_shape: tuple[int, ...], attention: str | None, nabla: NablaConfig | None):
        """The variant's visual self-attention (NABLA for 10 s and HD variants), or the caller's choice."""
        kind = attention or self.variant.attention
        if kind not in ("dense", "nabla"):
            raise ValueError(f"attention must be 'dense' or 'nabla', got {attention!r}")
        pt, ph, pw = self.dit.config.patch_size
        grid = (latent_shape[1] // pt, latent_shape[2] // ph, latent_shape[3] // pw)
        config = nabla or self.variant.nabla
        if kind == "nabla":
            return NablaAttention(grid, config, record_stats=self.record_attention_stats)
        return visual_attention_for("dense", grid, backend="sdpa")


def load(
    repo_id_or_path: str | Path,
    variant: str | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
) -> Kandinsky5Model:
    """Load any variant; returns the model class of its family (``Kandinsky5VideoLite``, ...)."""
    return Kandinsky5Model.from_pretrained(repo_id_or_path, variant, device, dtype)


def _class_for(variant: Variant) -> type[Kandinsky5Model]:
    for model_class in Kandinsky5Model.__subclasses__():
        if variant.name.startswith(model_class.families):
            return model_class
    return Kandinsky5Model


def _text_encoder(spec: Variant, files, device: torch.device, dtype: torch.dtype):
    if spec.text.kind == "minilm":
        from .nano.text import NanoTextEncoder

        return NanoTextEncoder.from_pretrained(device=device)
    from .text import TextEncoder

    return TextEncoder.from_pretrained(
        str(files.text_encoder), str(files.text_encoder_2), device=device, dtype=dtype,
        templates=(spec.text.template,), qwen_tokenizer=str(files.tokenizer), clip_tokenizer=str(files.tokenizer_2),
    )  # fmt: skip


def _weights_source(source: str | Path, variant: Variant) -> str | Path:
    """Local paths and real repo ids stay as given; variant and family names go to the official repo, or
    to the package folder of packaged variants (nano)."""
    if Path(str(source)).expanduser().exists() or variant_for_repo(str(source)) is not None:
        return source
    packaged = packaged_path(variant)
    if packaged is not None:
        if not (packaged / "transformer").is_dir():
            raise FileNotFoundError(f"{variant.name}: its weights are missing from the package ({packaged})")
        return packaged
    return variant.hub.repo_id if variant.hub else source


def _to_device(conditioning: Conditioning, device: torch.device) -> Conditioning:
    move = lambda t: None if t is None else t.to(device)  # noqa: E731
    return Conditioning(move(conditioning.first_frame), move(conditioning.edit_latent))


class Kandinsky5VideoLite(Kandinsky5Model):
    """Video Lite 2B: text-to-video 5 s / 10 s (sft, pretrain, nocfg, distilled) and image-to-video."""

    families = ("video-lite",)
    default_variant = "video-lite-5s-sft"


class Kandinsky5VideoPro(Kandinsky5Model):
    """Video Pro 19B: text-to-video and image-to-video, SD and HD."""

    families = ("video-pro",)
    default_variant = "video-pro-5s-sd"


class Kandinsky5ImageLite(Kandinsky5Model):
    """Image Lite 6B: text-to-image and image editing."""

    families = ("image-lite",)
    default_variant = "image-lite"


class Kandinsky5Nano(Kandinsky5Model):
    """nano: our 3M-parameter model of the shapes world, shipped in the package; T2V, I2V and T2I on a CPU."""

    families = ("nano",)
    default_variant = "nano"

    def for_task(self, task: str) -> Kandinsky5Nano:
        """The same loaded weights as another task: "t2v" (nano), "i2v" (nano-i2v) or "t2i" (nano-t2i)."""
        twin = Kandinsky5Nano(nano_variant(task), self.dit, self.text_encoder, self.vae, self.device)
        twin.placement = self.placement
        return twin
