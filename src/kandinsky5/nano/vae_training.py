"""Training nano's video autoencoder: a small causal VAE of the HunyuanVideo architecture (docs/nano.md).

The network is diffusers' ``AutoencoderKLHunyuanVideo`` with the real model's geometry (16 latent channels,
8x space, 4x causal time, so 4k+1 frames ↔ k+1 latent frames) and far fewer channels. It learns from
shapes-world clips made on the fly, so it never sees the same clip twice.

A training step on whole 17×64×64 clips costs ~0.6–1.2 s per clip on one CPU core, and the
full-resolution layers dominate (docs/nano.md, "Training nano"), so training runs in two phases:

1. **crops** (most steps): random 5-frame windows (2 latent frames) of 32×32 random crops. The network is
   convolutional, so what it learns on crops transfers; a clip costs ~6x less.
2. **full** (the last ``full_fraction`` of the steps, at the low end of the LR schedule): whole 17×64×64
   clips, so that GroupNorm statistics (taken over time and space) and the causal padding see the
   sizes used at inference.

Every ``image_every``-th step of the crop phase is a batch of still 64×64 images, encoded as 1-frame
clips: that is how nano encodes T2I data and the I2V first frame.

Loss: L1 + ``mse_weight``·MSE on pixels in [-1, 1], plus ``kl_weight`` times the per-element KL of the
posterior to N(0, 1). The decoder reconstructs a posterior *sample* (reparameterised), so the latent space
stays smooth around each mean. At the end the held-out split of the world gives the latent std, from
which ``scaling_factor`` is set so that scaled latents have unit std, and the reconstruction PSNR.

Everything random at step k (clips, crops, posterior noise) derives from ``(seed, k)``, so a run resumed
from a checkpoint continues exactly as an uninterrupted run would. Files under ``out_dir``::

    checkpoints/step_XXXXXXX/   resumable training state (kandinsky5.train.checkpointing, pickle-free)
    model/                      the finished VAE (diffusers save_pretrained, scaling_factor set)
    report.json                 written last: the VAE is complete exactly when it exists
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..atomic import atomic_write, atomic_write_folder, write_json_durable
from ..media import vae_input_from_frames
from ..train.checkpointing import latest_checkpoint, load_checkpoint, save_checkpoint
from .world import dataset, sample_clip, sample_image

__all__ = [
    "DECODER_BATCH",
    "DECODER_FINETUNE",
    "VaeReport",
    "VaeTrainConfig",
    "build_vae",
    "evaluate_vae",
    "load_vae_report",
    "train_vae",
]

logger = logging.getLogger(__name__)

MODEL_DIR = "model"
REPORT = "report.json"
CLIP_SIZE, CLIP_FRAMES = 64, 17  # the world at nano's training size
_STREAM = 5  # tags the VAE's clip seeds, (seed, _STREAM, step, i), apart from the DiT data's (seed, i)


@dataclass(frozen=True)
class VaeTrainConfig:
    """Architecture and optimisation of the nano VAE (step count, batch size and seed are arguments)."""

    # --- architecture (AutoencoderKLHunyuanVideo) ----------------------------------------------------
    # 3 blocks: 2 spatial halvings (4x; the real VAE's 8x reached 17.5 dB where 4x reached 21.4 dB after
    # the same 400 steps, measured), 2 temporal halvings (4x, as the real VAE).
    block_out_channels: tuple[int, ...] = (16, 32, 64)
    spatial_compression: int = 4  # 2 ** (len(block_out_channels) - 1)
    layers_per_block: int = 1
    norm_num_groups: int = 8
    latent_channels: int = 16  # as the real VAE, so the DiT sees the real channel count
    mid_block_add_attention: bool = True  # as the real VAE (causal attention over latent frames)

    # --- loss ----------------------------------------------------------------------------------------
    mse_weight: float = 1.0  # L1 keeps edges sharp, MSE punishes the rare large colour errors
    kl_weight: float = 1e-4  # per-element KL vs per-pixel L1; small: a regulariser, not a bottleneck

    # --- optimisation (AdamW, linear warm-up then cosine to lr·min_lr_ratio) -------------------------
    lr: float = 3e-4  # 1e-3 learns several times slower (measured), 1e-4 about as fast
    min_lr_ratio: float = 0.05
    warmup_steps: int = 100  # capped at a quarter of the steps, so short runs still learn
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0

    # --- data ----------------------------------------------------------------------------------------
    crop_size: int = 32  # pixels (a multiple of 8), phase 1
    crop_frames: int = 5  # 4k+1 frames, phase 1
    crop_on_objects: bool = True  # crops hold an object: random 32×32 crops are mostly plain background
    full_fraction: float = 0.05  # share of the steps on full 17×64×64 clips, at the end (~15 % of the time)
    full_batch_divisor: int = 4  # full clips cost ~13x a crop: max(2, batch_size // 4) clips per full step
    image_every: int = 4  # every n-th step of the crop phase is a batch of 1-frame 64×64 images

    # --- decoder fine-tuning (train_vae(init_from=...)) ------------------------------------------------
    # Train the decoder alone, on whole clips and images, from the posterior mean: the encoder, and so
    # the latent space the DiT is trained in, stay exactly as they are (the scaling factor is kept).
    decoder_only: bool = False

    # --- checkpoints and evaluation ------------------------------------------------------------------
    checkpoint_every: int = 250
    keep_last_k: int = 2
    eval_clips: int = 32  # held-out clips and images for the latent std and PSNR (quick mode: 4)
    eval_images: int = 32

    def __post_init__(self) -> None:
        if (
            self.spatial_compression not in (4, 8)
            or 2 ** (len(self.block_out_channels) - 1) != self.spatial_compression
        ):
            raise ValueError(
                f"spatial_compression must be 4 or 8, with log2 of it + 1 blocks in block_out_channels, "
                f"got {self.spatial_compression} and {list(self.block_out_channels)}"
            )
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ValueError(
                f"every block width must be a multiple of norm_num_groups={self.norm_num_groups}, "
                f"got {list(self.block_out_channels)}"
            )
        if self.crop_size % 8 or not 8 <= self.crop_size <= CLIP_SIZE:
            raise ValueError(f"crop_size must be a multiple of 8 in [8, {CLIP_SIZE}], got {self.crop_size}")
        if (self.crop_frames - 1) % 4 or not 1 <= self.crop_frames <= CLIP_FRAMES:
            raise ValueError(f"crop_frames must be 4k+1 and at most {CLIP_FRAMES}, got {self.crop_frames}")
        if not 0 <= self.full_fraction <= 1:
            raise ValueError(f"full_fraction must be in [0, 1], got {self.full_fraction}")
        for name in ("full_batch_divisor", "image_every", "checkpoint_every", "keep_last_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.kl_weight < 0 or self.mse_weight < 0:
            raise ValueError("lr must be > 0 and kl_weight, mse_weight >= 0")


# The recipe's second VAE stage: the decoder alone on whole clips (and every 4th step images), from
# the posterior mean, so it learns to draw from what the DiT makes. 8 = images per image step; clip steps
# take 2 clips. MSE weighted 100x over L1: PSNR measures squared error, and this stage gains ~0.6 dB on
# clips and ~1 dB on images over L1 + MSE (docs/nano.md); the latents, and so the DiT, do not change.
DECODER_FINETUNE = VaeTrainConfig(decoder_only=True, full_fraction=1.0, lr=1e-4, warmup_steps=50, mse_weight=100.0)
DECODER_BATCH = 8


@dataclass(frozen=True)
class VaeReport:
    """A finished VAE run.

    path: the diffusers model folder.
    psnr / psnr_image: reconstruction PSNR (dB, uint8 frames) on held-out 17×64×64 clips / 64×64 images.
    latent_mean / latent_std: of the unscaled posterior means on those clips; scaling_factor = 1 / latent_std.
    attributes: per attribute (count, colour, shape, motion, ...), the fraction of reconstructed held-out
        clips that :func:`kandinsky5.nano.detect.grade` still reads right.
    first_loss / last_loss: mean training loss of the first / last quarter of the crop phase (noisy: a
        white or black background costs far more than a grey one).
    heldout_l1_start / heldout_l1: L1 error on the fixed held-out clips and images before and after
        training, the steady measure of progress.
    seconds: training time over all sessions, evaluation excluded; seconds_per_step: per phase
        ("crops", which includes the image steps, and "full").
    settings: what the run was asked for; a finished run is reused only for the same settings.
    """

    path: Path
    steps: int
    params: int
    psnr: float
    psnr_image: float
    latent_mean: float
    latent_std: float
    scaling_factor: float
    attributes: dict[str, float]
    first_loss: float
    last_loss: float
    heldout_l1_start: float
    heldout_l1: float
    seconds: float
    seconds_per_step: dict[str, float]
    settings: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "path": str(self.path)}


# --------------------------------------------------------------------------------------------------
# Model and data
# --------------------------------------------------------------------------------------------------


def build_vae(config: VaeTrainConfig = VaeTrainConfig()):
    """A freshly initialised ``AutoencoderKLHunyuanVideo`` (from the global torch RNG) of nano's size.

    Frame-wise (temporal-tile) processing is switched off: diffusers would otherwise split a 17-frame
    clip into overlapping windows, and training and evaluation must see the clip whole.
    """
    from diffusers import AutoencoderKLHunyuanVideo

    vae = AutoencoderKLHunyuanVideo(
        block_out_channels=config.block_out_channels,
        down_block_types=("HunyuanVideoDownBlock3D",) * len(config.block_out_channels),
        up_block_types=("HunyuanVideoUpBlock3D",) * len(config.block_out_channels),
        layers_per_block=config.layers_per_block,
        norm_num_groups=config.norm_num_groups,
        latent_channels=config.latent_channels,
        mid_block_add_attention=config.mid_block_add_attention,
        spatial_compression_ratio=config.spatial_compression,
        temporal_compression_ratio=4,
    )
    _whole_clips(vae)
    return vae


def _load_vae(folder: str | Path):
    from diffusers import AutoencoderKLHunyuanVideo

    vae = AutoencoderKLHunyuanVideo.from_pretrained(folder)
    _whole_clips(vae)
    return vae


def _whole_clips(vae) -> None:
    vae.use_framewise_encoding = vae.use_framewise_decoding = False
    vae.use_tiling = vae.use_slicing = False


def _pixels(frames: list[np.ndarray]) -> torch.Tensor:
    """uint8 (T, H, W, 3) arrays of one shape → float (B, 3, T, H, W) in [-1, 1]."""
    return vae_input_from_frames(np.stack(frames))


def _phases(steps: int, config: VaeTrainConfig) -> int:
    """The step at which the full-clip phase starts (== steps when it is empty)."""
    full = round(steps * config.full_fraction)
    if config.full_fraction > 0 and steps > 1:
        full = max(full, 1)
    return steps - full


def _training_batch(step: int, phase: str, batch_size: int, seed: int, config: VaeTrainConfig) -> torch.Tensor:
    """The pixels of step ``step``, a function of ``(seed, step)`` alone: (B, 3, F, H, W) in [-1, 1]."""
    image_step = step % config.image_every == config.image_every - 1
    if phase == "full" and not (config.decoder_only and image_step):
        count = max(2, batch_size // config.full_batch_divisor)  # one clip alone runs ~4x slower per clip
        return _pixels([sample_clip((seed, _STREAM, step, i)).frames for i in range(count)])
    if image_step:
        return _pixels([sample_image((seed, _STREAM, step, i)).frames for i in range(batch_size)])
    rng = np.random.default_rng([seed, _STREAM, step])
    size, length = config.crop_size, config.crop_frames
    crops = []
    for i in range(batch_size):
        clip = sample_clip((seed, _STREAM, step, i))  # frames (17, 64, 64, 3)
        t0 = int(rng.integers(0, CLIP_FRAMES - length + 1))
        if config.crop_on_objects:  # the crop holds the centre of one object in the window's middle frame
            track = clip.objects[int(rng.integers(len(clip.objects)))]
            centre = track.centres[t0 + length // 2]  # (x, y) in pixels
            low = np.clip(np.floor(centre) - size + 5, 0, CLIP_SIZE - size)
            high = np.clip(np.ceil(centre) - 4, 0, CLIP_SIZE - size)
            x0, y0 = (int(rng.integers(lo, max(lo, hi) + 1)) for lo, hi in zip(low, high, strict=True))
        else:
            y0, x0 = (int(v) for v in rng.integers(0, CLIP_SIZE - size + 1, size=2))
        crops.append(clip.frames[t0 : t0 + length, y0 : y0 + size, x0 : x0 + size])
    return _pixels(crops)


def _step_seed(seed: int, step: int) -> int:
    return int(np.random.SeedSequence([seed, _STREAM, step]).generate_state(1)[0])


def _lr_at(step: int, steps: int, config: VaeTrainConfig) -> float:
    warmup = min(config.warmup_steps, max(1, steps // 4))
    if step < warmup:
        return config.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return config.lr * (config.min_lr_ratio + (1.0 - config.min_lr_ratio) * cosine)


def _loss(vae, pixels: torch.Tensor, generator: torch.Generator, config: VaeTrainConfig) -> torch.Tensor:
    if config.decoder_only:  # the DiT makes posterior means, so the decoder learns to draw from them
        with torch.no_grad():
            z = vae.encode(pixels).latent_dist.mode()
        error = vae.decode(z).sample - pixels
        return error.abs().mean() + config.mse_weight * error.square().mean()
    posterior = vae.encode(pixels).latent_dist  # mean and logvar: (B, C, T', H/4, W/4)
    z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
    recon = vae.decode(z).sample  # (B, 3, F, H, W)
    error = recon - pixels
    kl = 0.5 * (posterior.mean.square() + posterior.var - 1.0 - posterior.logvar).mean()
    return error.abs().mean() + config.mse_weight * error.square().mean() + config.kl_weight * kl


# --------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------


def _psnr(mse: float) -> float:
    return 10.0 * math.log10(255.0**2 / max(mse, 1e-10))


@torch.no_grad()
def evaluate_vae(vae, num_clips: int, num_images: int, seed: int = 0, batch_size: int = 4) -> dict[str, float]:
    """Reconstruction quality and latent statistics on the world's held-out split.

    Clips are 17×64×64 and images 64×64; both are encoded to the posterior mean, decoded, and compared
    as uint8 frames. Returns ``psnr`` and ``psnr_image`` (dB, over all pixels), ``l1`` (mean absolute
    error of clips and images together, in [-1, 1] units: the L1 term of the training loss on fixed data),
    ``latent_mean`` / ``latent_std`` of the unscaled clip latents, and ``attributes``: the fraction of
    reconstructed clips in which :func:`kandinsky5.nano.detect.grade` still reads each attribute right.
    """
    from .detect import grade

    vae.eval()
    _whole_clips(vae)
    results: dict[str, Any] = {}
    total_abs, total_pixels, grades = 0.0, 0, []
    for kind, count, name in (("video", num_clips, "psnr"), ("image", num_images, "psnr_image")):
        clips = list(dataset(count, seed=seed, split="heldout", kind=kind))
        squared, pixels, latents = 0.0, 0, []
        for start in range(0, count, batch_size):
            frames = np.stack([c.frames for c in clips[start : start + batch_size]])  # (B, T, H, W, 3)
            latent = vae.encode(_pixels(list(frames))).latent_dist.mode()
            recon = vae.decode(latent).sample.clamp(-1, 1)  # (B, 3, T, H, W)
            recon = ((recon + 1.0) * 127.5).round().permute(0, 2, 3, 4, 1).numpy()  # (B, T, H, W, 3)
            error = recon - frames.astype(np.float64)
            squared += float(np.square(error).sum())
            if kind == "video":
                batch = clips[start : start + batch_size]
                grades += [grade(r.astype(np.uint8), clip) for r, clip in zip(recon, batch, strict=True)]
            total_abs += float(np.abs(error).sum()) / 127.5
            pixels += frames.size
            latents.append(latent.flatten())
        results[name] = _psnr(squared / pixels)
        total_pixels += pixels
        if kind == "video":
            values = torch.cat(latents).double()
            results["latent_mean"], results["latent_std"] = float(values.mean()), float(values.std())
    results["l1"] = total_abs / total_pixels
    results["attributes"] = {key: float(np.mean([g[key] for g in grades])) for key in grades[0]} if grades else {}
    return results


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------


def _save_model_folder(vae, dest: Path) -> None:
    """``save_pretrained`` into a hidden folder beside ``dest``, then rename it into place."""
    atomic_write_folder(dest, lambda tmp: vae.save_pretrained(tmp, safe_serialization=True))


def load_vae_report(out_dir: str | Path) -> VaeReport | None:
    """The report of a finished run in ``out_dir``, or None when it has not finished."""
    path = Path(out_dir) / REPORT
    if not path.is_file():
        return None
    record = json.loads(path.read_text(encoding="utf-8"))
    if not (Path(record["path"]) / "config.json").is_file():
        return None
    return VaeReport(**{**record, "path": Path(record["path"])})


def _settings(steps: int, batch_size: int, seed: int, quick: bool, config: VaeTrainConfig) -> dict[str, Any]:
    plain = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}
    return {"steps": steps, "batch_size": batch_size, "seed": seed, "quick": quick, **plain}


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------


def train_vae(
    out_dir: str | Path,
    steps: int,
    batch_size: int,
    seed: int = 0,
    quick: bool = False,
    *,
    config: VaeTrainConfig = VaeTrainConfig(),
    init_from: str | Path | None = None,
) -> VaeReport:
    """Train (or resume, or reuse) nano's VAE in ``out_dir``; see the module docstring.

    ``batch_size`` clips per crop step (and images per image step); full-clip steps take
    ``batch_size // full_batch_divisor``. ``quick`` evaluates on 4 held-out clips and images instead of
    ``eval_clips`` / ``eval_images`` (CI). A finished run with the same settings is returned as it is.
    ``init_from`` (a finished model folder) starts from those weights; with ``config.decoder_only`` only
    the decoder trains and the model keeps its scaling factor.
    """
    if config.decoder_only and init_from is None:
        raise ValueError("decoder_only fine-tunes a trained VAE: pass init_from=<model folder>")
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps} and {batch_size}")
    out_dir = Path(out_dir)
    settings = _settings(steps, batch_size, seed, quick, config)
    if init_from is not None:
        settings["init_from"] = str(init_from)
    done = load_vae_report(out_dir)
    if done is not None and done.settings == settings:
        logger.info("reusing the finished VAE in %s", out_dir)
        return done

    torch.manual_seed(seed)
    vae = build_vae(config) if init_from is None else _load_vae(init_from)
    vae.train()
    if config.decoder_only:
        for module in (vae.encoder, vae.quant_conv):
            module.requires_grad_(False).eval()
    params = sum(p.numel() for p in vae.parameters())
    trainable = [p for p in vae.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.99))
    eval_clips, eval_images = (4, 4) if quick else (config.eval_clips, config.eval_images)
    step, losses, seconds = 0, [], {"crops": 0.0, "full": 0.0}
    checkpoint = latest_checkpoint(out_dir)
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, vae, optimizer, restore_rng=False)
        step, extra = state["step"], state["extra"]
        if step > steps:
            raise ValueError(f"{out_dir} holds a VAE trained for {step} steps, more than {steps}; use a new folder")
        losses, seconds, l1_start = list(extra["losses"]), dict(extra["seconds"]), extra["heldout_l1_start"]
        if extra["settings"] != settings:
            logger.warning("resuming the VAE run in %s with changed settings; it is no longer an exact continuation",
                           out_dir)  # fmt: skip
        logger.info("resuming the VAE from %s (step %d)", checkpoint, step)
    else:
        l1_start = evaluate_vae(vae, eval_clips, eval_images, seed)["l1"]
        vae.train()

    def save() -> None:
        extra = {"losses": losses, "seconds": seconds, "settings": settings, "heldout_l1_start": l1_start}
        save_checkpoint(out_dir, step, vae, optimizer, extra=extra, keep_last_k=config.keep_last_k)

    full_start = _phases(steps, config)
    with tqdm(total=steps, initial=step, unit="step", desc="VAE", dynamic_ncols=True) as progress:
        while step < steps:
            phase = "crops" if step < full_start else "full"
            start = time.perf_counter()
            pixels = _training_batch(step, phase, batch_size, seed, config)
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(step, steps, config)
            generator = torch.Generator().manual_seed(_step_seed(seed, step))  # posterior noise
            loss = _loss(vae, pixels, generator, config)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"VAE loss is {loss.item()} at step {step}; lower lr or kl_weight")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(vae.parameters(), config.max_grad_norm)
            optimizer.step()
            seconds[phase] += time.perf_counter() - start
            losses.append(loss.item())
            step += 1
            progress.update(1)
            progress.set_postfix(loss=f"{losses[-1]:.4f}", phase=phase, refresh=False)
            if step % config.checkpoint_every == 0 or step in (full_start, steps):
                save()

    metrics = evaluate_vae(vae, eval_clips, eval_images, seed)
    scaling_factor = float(vae.config.scaling_factor) if config.decoder_only else 1.0 / metrics["latent_std"]
    vae.register_to_config(scaling_factor=scaling_factor)
    model_dir = out_dir / MODEL_DIR
    _save_model_folder(vae, model_dir)

    crop_losses = losses[:full_start] or losses
    window = max(2, len(crop_losses) // 4)
    full_steps = steps - full_start
    report = VaeReport(
        path=model_dir,
        steps=steps,
        params=params,
        psnr=metrics["psnr"],
        psnr_image=metrics["psnr_image"],
        latent_mean=metrics["latent_mean"],
        latent_std=metrics["latent_std"],
        scaling_factor=scaling_factor,
        attributes=metrics["attributes"],
        first_loss=float(np.mean(crop_losses[:window])),
        last_loss=float(np.mean(crop_losses[-window:])),
        heldout_l1_start=l1_start,
        heldout_l1=metrics["l1"],
        seconds=sum(seconds.values()),
        seconds_per_step={
            "crops": seconds["crops"] / max(1, full_start),
            "full": seconds["full"] / max(1, full_steps),
        },
        settings=settings,
    )
    atomic_write(out_dir / REPORT, lambda tmp: write_json_durable(tmp, report.to_json()))
    logger.info(
        "VAE: %d params, held-out PSNR %.2f dB (images %.2f dB), scaling_factor %.4f",
        params, report.psnr, report.psnr_image, scaling_factor,
    )  # fmt: skip
    return report
