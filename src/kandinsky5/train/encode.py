"""From a folder of captioned videos and images to the latent cache, with a variant's VAE and text encoders.

Folder layout: any tree of media files, each with its caption in a ``.txt`` file of the same stem::

    data/
      clips/fox.mp4     clips/fox.txt      ("A red fox runs through fresh snow ...")
      stills/cat.png    stills/cat.txt

or captions in ``data/metadata.jsonl`` (the Hugging Face "imagefolder" convention), one JSON object per
line with ``file_name`` (relative to the folder) and the caption under ``caption``, ``text`` or
``prompt``; a caption there wins over a ``.txt`` file.

Each file is resized to cover the nearest bucket (by aspect ratio) and centre-cropped to it; a video
keeps its first ``4k+1`` frames up to ``max_frames`` at its own frame rate (Kandinsky 5 video models
were trained at 24 fps: convert first). Media without a caption file, files that cannot be decoded
("unreadable media") and clips too small to train on ("too small": fewer than 5 frames when the run
keeps 5 or more, or a picture that would need more than ``MAX_UPSCALE`` times enlarging to cover its
bucket) are skipped with a warning and counted in the cache's summary.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from .config import ConfigError, TrainConfig
from .data import CacheSummary, DataItem, EncodedVideo, SkipItem, build_cache, nearest_bucket

__all__ = [
    "IMAGE_SUFFIXES",
    "VIDEO_SUFFIXES",
    "encode_folder",
    "folder_items",
    "media_encoder",
    "read_frames",
    "read_metadata",
]

VIDEO_SUFFIXES = frozenset({".mp4", ".webm", ".mov", ".mkv", ".avi"})
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp"})
MAX_UPSCALE = 2.0  # media needing more enlargement than this to cover their bucket are skipped as too small
MIN_VIDEO_FRAMES = 5  # one latent frame beyond the first; shorter video files are skipped as too small


METADATA_FILE = "metadata.jsonl"
CAPTION_FIELDS = ("caption", "text", "prompt")


def read_metadata(root: Path) -> dict[str, str]:
    """Captions by relative file name from ``root/metadata.jsonl`` ({} when there is none).

    A line that is not a JSON object with ``file_name`` and a caption field is a ConfigError naming the
    line: a broken metadata file would otherwise silently drop captions from the whole data set.
    """
    import json

    path = root / METADATA_FILE
    if not path.is_file():
        return {}
    captions = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}:{number}: not JSON ({err.msg})") from None
        field = next((f for f in CAPTION_FIELDS if isinstance(record, dict) and f in record), None)
        if not isinstance(record, dict) or not isinstance(record.get("file_name"), str) or field is None:
            raise ConfigError(f'{path}:{number}: needs "file_name" and one of {", ".join(CAPTION_FIELDS)}')
        captions[Path(record["file_name"]).as_posix()] = str(record[field]).strip()
    return captions


def folder_items(data_dir: str | Path) -> list[DataItem]:
    """Every video or image under ``data_dir`` (sorted by relative path) with its caption or None."""
    root = Path(data_dir)
    if not root.is_dir():
        raise ConfigError(f"data_dir: {root} is not a folder")
    listed = read_metadata(root)
    items = []
    for path in sorted(root.rglob("*")):
        if not path.is_file() or path.suffix.lower() not in VIDEO_SUFFIXES | IMAGE_SUFFIXES:
            continue
        caption_file = path.with_suffix(".txt")
        caption = caption_file.read_text(encoding="utf-8").strip() if caption_file.is_file() else None
        caption = listed.get(path.relative_to(root).as_posix(), caption)
        items.append(DataItem(key=path.relative_to(root).as_posix(), media=path, caption=caption))
    if not items:
        raise ConfigError(
            f"data_dir: no videos or images in {root} (looked for {sorted(VIDEO_SUFFIXES | IMAGE_SUFFIXES)})"
        )
    return items


def read_frames(path: Path, max_frames: int) -> np.ndarray:
    """(F, H, W, 3) uint8 RGB frames: an image gives F = 1, a video its first 4k+1 <= max_frames frames."""
    if path.suffix.lower() in IMAGE_SUFFIXES:
        from ..media import load_image

        return np.array(load_image(path))[None]  # a writable copy
    import av

    frames = []
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            frames.append(frame.to_ndarray(format="rgb24"))
            if len(frames) >= max_frames:
                break
    if not frames:
        raise ValueError(f"{path}: no video frames")
    keep = (len(frames) - 1) // 4 * 4 + 1  # the causal VAE takes 4k+1 frames
    return np.stack(frames[:keep])


def fit_to_bucket(frames: np.ndarray, buckets: Sequence[tuple[int, int]]) -> torch.Tensor:
    """Resize to cover the nearest bucket and centre-crop → (3, F, H, W) float in [-1, 1]."""
    height, width = frames.shape[1:3]
    target_h, target_w = nearest_bucket(height, width, buckets)
    scale = max(target_h / height, target_w / width)
    resized_h, resized_w = max(target_h, round(height * scale)), max(target_w, round(width * scale))
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()  # (F, 3, H, W)
    x = torch.nn.functional.interpolate(x, size=(resized_h, resized_w), mode="bicubic", antialias=True)
    top, left = (resized_h - target_h) // 2, (resized_w - target_w) // 2
    x = x[:, :, top : top + target_h, left : left + target_w]
    return (x / 127.5 - 1.0).clamp(-1.0, 1.0).permute(1, 0, 2, 3)  # (3, F, H, W)


def media_encoder(
    vae,
    buckets: Sequence[tuple[int, int]],
    max_frames: int,
    with_condition: bool = False,
    seed: int = 0,
    sample: bool = True,
) -> Callable[[Path], EncodedVideo]:
    """``encode_video_fn`` for :func:`build_cache`: file → latent (and the first-frame latent for I2V).

    Posterior samples come from a CPU generator seeded from ``seed`` and the file name, so a cache is
    reproducible and files do not all share one noise pattern. ``sample=False`` stores the posterior
    mean instead.
    """

    def encode(path: Path) -> EncodedVideo:
        path = Path(path)
        file_seed = (seed * 2**32 + zlib.crc32(path.name.encode())) % 2**63
        frames = _readable_frames(path, max_frames)
        _check_size(path, frames, buckets, max_frames)
        pixels = fit_to_bucket(frames, buckets)[None]  # (1, 3, F, H, W)
        latent = vae.encode(pixels, generator=torch.Generator().manual_seed(file_seed), sample=sample)[0]
        condition = None
        if with_condition:
            first, generator = pixels[:, :, :1], torch.Generator().manual_seed(file_seed + 1)
            condition = vae.encode(first, generator=generator, sample=sample)[0, 0]
        return EncodedVideo(latent=latent, condition=condition)

    return encode


def _readable_frames(path: Path, max_frames: int) -> np.ndarray:
    try:
        return read_frames(path, max_frames)
    except Exception as err:  # noqa: BLE001 - PyAV, Pillow and the OS raise many kinds; all mean "unreadable"
        raise SkipItem("unreadable media", f"{type(err).__name__}: {err}") from err


def _check_size(path: Path, frames: np.ndarray, buckets: Sequence[tuple[int, int]], max_frames: int) -> None:
    count, height, width = frames.shape[:3]
    is_video = path.suffix.lower() in VIDEO_SUFFIXES
    if is_video and count < MIN_VIDEO_FRAMES <= max_frames:
        raise SkipItem("too small", f"fewer than {MIN_VIDEO_FRAMES} frames")
    target_h, target_w = nearest_bucket(height, width, buckets)
    scale = max(target_h / height, target_w / width)
    if scale > MAX_UPSCALE:
        raise SkipItem(
            "too small", f"{width}x{height} pixels would be enlarged {scale:.1f}x to cover {target_w}x{target_h}"
        )


def encode_folder(config: TrainConfig, *, vae=None, text_encoder=None) -> CacheSummary:
    """Build ``config.cache_dir`` from ``config.data_dir`` with the variant's VAE and text encoders.

    nano variants use the package's VAE (4x in space: a 17x64x64 clip becomes a 5x16x16 latent, stored as
    the posterior mean) and MiniLM. Buckets default to the variant's resolutions and ``max_frames`` to its
    longest clip.

    ``vae`` / ``text_encoder`` replace the variant's components (already loaded ones, or tiny test ones).
    """
    variant = config.variant
    if variant is None or config.data_dir is None:
        raise ConfigError("data_dir: encoding media needs model = a variant name (it names the VAE and text encoders)")
    if variant.task == "i2i":
        raise ConfigError(f"data_dir: {variant.name} is an editing model; encoding edit pairs is not supported")
    items = folder_items(config.data_dir)
    from ..devices import resolve_device
    from .components import load_text_encoder, load_vae  # nano: the package's VAE and MiniLM

    device = resolve_device(config.device)
    if vae is None:
        vae = load_vae(variant, device)
    if text_encoder is None:
        text_encoder = load_text_encoder(variant, device)
    spec = variant.text

    def encode_text(caption: str):
        return text_encoder.encode([caption], spec.template, spec.qwen_max_length)

    buckets = config.buckets or variant.resolutions
    max_frames = config.max_frames or variant.max_num_frames
    # nano's DiT learned the posterior means (nano/recipe.py), and its VAE's posterior is wide (a sample
    # strays by about as much as the latent's own spread), so nano is fine-tuned on means too. The
    # official models get posterior samples, as the official code encodes.
    sample = variant.vae != "nano"
    with_condition = variant.task == "i2v"
    encode_media = media_encoder(vae, buckets, max_frames, with_condition, seed=config.seed, sample=sample)
    return build_cache(items, encode_media, encode_text, config.cache_dir, config.shard_size)
