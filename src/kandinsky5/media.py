"""What ``generate`` returns (:class:`Video`, :class:`Image`) and how results reach the disk.

Results hold uint8 pixels plus a JSON-serialisable ``metadata`` dict (prompt, seed, steps, ...), so a
picture can always be reproduced from its file. ``save`` picks the format from the path suffix, embeds
the metadata in the file where the format allows, and writes a JSON sidecar next to it. Every write
goes to a temp file in the destination folder, is fsynced, then renamed into place: an interrupted or
failed save never leaves a half-written file behind. PyAV (video) and Pillow (images) are imported
inside the functions that need them, so importing this module stays cheap for the CLI.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from .atomic import fsync_path, make_parents, new_temp_file, remove_empty, temp_beside, write_json_durable

if TYPE_CHECKING:
    import PIL.Image
    import torch

__all__ = [
    "IMAGE_SUFFIXES",
    "SUPPORTED_SUFFIXES",
    "VIDEO_SUFFIXES",
    "Image",
    "Video",
    "check_output_path",
    "frames_from_vae_output",
    "load_image",
    "vae_input_from_frames",
]

logger = logging.getLogger(__name__)

Kind = Literal["video", "image"]
PathLike = str | os.PathLike[str]

VIDEO_SUFFIXES = (".mp4", ".webm", ".gif")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
SUPPORTED_SUFFIXES: dict[str, tuple[str, ...]] = {"video": VIDEO_SUFFIXES, "image": IMAGE_SUFFIXES}
FRAMES = "frames"  # format name of a video saved as a folder of numbered PNGs
_FORMATS = {
    ".mp4": "mp4",
    ".webm": "webm",
    ".gif": "gif",
    ".png": "png",
    ".jpg": "jpeg",
    ".jpeg": "jpeg",
    ".webp": "webp",
}

# (encoder, options). CRF 18 is visually lossless for H.264 at a fraction of the size of the official
# writer's CRF 5; VP9's CRF scale is 0-63 and needs b=0 to mean constant quality.
_AV_CODECS = {
    "mp4": ("libx264", {"crf": "18", "preset": "medium"}),
    "webm": ("libvpx-vp9", {"crf": "24", "b": "0", "deadline": "good", "cpu-used": "4", "row-mt": "1"}),
}
_FRAME_FILE = re.compile(r"frame_\d+\.png")
_SIDECAR_IN_FOLDER = "metadata.json"


# --------------------------------------------------------------------------------------------------
# uint8 frames ↔ the VAE's float pixels
# --------------------------------------------------------------------------------------------------


def vae_input_from_frames(frames: np.ndarray) -> torch.Tensor:
    """Turn uint8 RGB frames (..., T, H, W, 3) into the VAE's input (..., 3, T, H, W) in [-1, 1].

    Uses the official rule ``x / 127.5 - 1``; leading dimensions (a batch) are kept.
    """
    import torch

    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim < 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected uint8 RGB frames (..., T, H, W, 3), got {frames.dtype} {frames.shape}")
    return torch.tensor(frames).movedim(-1, -4).float() / 127.5 - 1.0  # a copy: PIL's arrays are read-only


def frames_from_vae_output(x: torch.Tensor) -> np.ndarray:
    """Turn one decoded video (C=3, T, H, W) in [-1, 1] into uint8 frames (T, H, W, 3).

    Uses the official rule ``((clamp(x, -1, 1) + 1) * 127.5).to(uint8)``: truncation, not rounding,
    computed in the tensor's own dtype, so the same decoded tensor gives the official bytes. The cast
    happens on the tensor's device, so only uint8 data crosses to the CPU.
    """
    import torch

    if not isinstance(x, torch.Tensor):
        raise ValueError(f"expected a torch.Tensor, got {type(x).__name__}")
    if x.ndim == 5:
        raise ValueError(f"got a batch {tuple(x.shape)} (B, C, T, H, W); pass one sample, e.g. x[0]")
    if x.ndim != 4 or x.shape[0] != 3:
        raise ValueError(f"expected shape (3, T, H, W) as the VAE decodes it, got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"expected a float tensor in [-1, 1], got {x.dtype}; uint8 frames go to Video()")
    if torch.isnan(x).any():
        raise ValueError("decoded frames contain NaN; decode the VAE in bfloat16 or float32, not float16")
    frames = ((x.detach().clamp(-1, 1) + 1) * 127.5).to(torch.uint8)
    return np.ascontiguousarray(frames.permute(1, 2, 3, 0).cpu().numpy())  # (T, H, W, 3)


def _check_metadata(metadata: Any) -> None:
    if not isinstance(metadata, dict):
        raise ValueError(f"metadata must be a dict, got {type(metadata).__name__}")
    try:
        json.dumps(metadata, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"metadata must be JSON-serialisable ({err}); store str, int, float, bool, None, lists and "
            "dicts, e.g. int(seed) instead of a numpy or torch scalar"
        ) from err


def _check_pixels(name: str, array: Any, shape: str, ndim: int) -> None:
    if not isinstance(array, np.ndarray):
        raise ValueError(
            f"{name} must be a numpy array {shape}, got {type(array).__name__}; for a decoded tensor use from_tensor()"
        )
    if array.ndim != ndim or array.shape[-1] != 3:
        raise ValueError(f"{name} must have shape {shape} (RGB, channels last), got {array.shape}")
    if array.dtype != np.uint8:
        raise ValueError(f"{name} must be uint8, got {array.dtype}; convert floats in [-1, 1] with from_tensor()")
    if 0 in array.shape:
        raise ValueError(f"{name} must not be empty, got shape {array.shape}")


# --------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------


@dataclass
class Video:
    """A generated video: ``frames`` uint8 (T, H, W, 3) RGB, played at ``fps``.

    ``metadata`` holds whatever reproduces it (prompt, negative_prompt, seed, model, steps, guidance,
    shift, package version); it is embedded in the file and written to the JSON sidecar.
    """

    frames: np.ndarray
    fps: float = 24.0  # every Kandinsky 5 video model is trained and released at 24 fps
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_pixels("frames", self.frames, "(T, H, W, 3)", ndim=4)
        if isinstance(self.fps, bool) or not isinstance(self.fps, (int, float, Fraction)):
            raise ValueError(f"fps must be a number, got {type(self.fps).__name__}")
        if not math.isfinite(self.fps) or self.fps <= 0:
            raise ValueError(f"fps must be a positive number, got {self.fps}; Kandinsky 5 videos use 24")
        self.fps = float(self.fps)
        _check_metadata(self.metadata)

    @classmethod
    def from_tensor(cls, x: torch.Tensor, fps: float = 24.0, metadata: dict[str, Any] | None = None) -> Video:
        """Build from one decoded sample (3, T, H, W) in [-1, 1]; see :func:`frames_from_vae_output`."""
        return cls(frames_from_vae_output(x), fps, dict(metadata or {}))

    @property
    def num_frames(self) -> int:
        return self.frames.shape[0]

    @property
    def height(self) -> int:
        return self.frames.shape[1]

    @property
    def width(self) -> int:
        return self.frames.shape[2]

    def save(self, path: PathLike, *, overwrite: bool = False) -> Path:
        """Write to ``path`` (.mp4, .webm, .gif, or a folder for PNG frames) and return the path written.

        Missing parent folders are created. An existing file is replaced atomically; an existing
        non-empty folder is replaced only with ``overwrite=True`` and only if it holds frames from an
        earlier save. See docs/outputs.md for what each format keeps.
        """
        fmt = check_output_path(path, "video", overwrite=overwrite)
        target = Path(path).expanduser()
        size = {"num_frames": self.num_frames, "height": self.height, "width": self.width}
        record = {**self.metadata, "fps": self.fps, **size}
        if fmt == FRAMES:
            return _save_folder(target, self.frames, record)
        if fmt == "gif":
            return _save_file(target, lambda tmp: _encode_gif(self.frames, self.fps, tmp, record), record)
        if fmt == "mp4" and (self.height % 2 or self.width % 2):
            record |= {
                "encoded_height": self.height + self.height % 2,
                "encoded_width": self.width + self.width % 2,
            }
            logger.info("padding %dx%d to even size for yuv420p H.264 (edge pixels repeated)", self.width, self.height)
        return _save_file(target, lambda tmp: _encode_av(self.frames, self.fps, tmp, fmt, record), record)


@dataclass
class Image:
    """A generated image: ``pixels`` uint8 (H, W, 3) RGB plus the ``metadata`` that reproduces it."""

    pixels: np.ndarray
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_pixels("pixels", self.pixels, "(H, W, 3)", ndim=3)
        _check_metadata(self.metadata)

    @classmethod
    def from_tensor(cls, x: torch.Tensor, metadata: dict[str, Any] | None = None) -> Image:
        """Build from one decoded image (3, H, W) in [-1, 1]; see :func:`frames_from_vae_output`."""
        if getattr(x, "ndim", None) != 3:
            raise ValueError(
                f"expected shape (3, H, W), got {tuple(getattr(x, 'shape', ()))}; for a batch pass x[i], "
                "for a video VAE frame (3, 1, H, W) pass x[:, 0]"
            )
        return cls(frames_from_vae_output(x[:, None])[0], dict(metadata or {}))

    @property
    def height(self) -> int:
        return self.pixels.shape[0]

    @property
    def width(self) -> int:
        return self.pixels.shape[1]

    def to_pil(self) -> PIL.Image.Image:
        from PIL import Image as PILImage

        return PILImage.fromarray(self.pixels)

    def save(self, path: PathLike) -> Path:
        """Write to ``path`` (.png, .jpg/.jpeg, .webp) plus ``<path>.json``; an existing file is replaced."""
        fmt = check_output_path(path, "image")
        target = Path(path).expanduser()
        record = {**self.metadata, "height": self.height, "width": self.width}
        return _save_file(target, lambda tmp: _encode_image(self.to_pil(), tmp, fmt, record), record)


# --------------------------------------------------------------------------------------------------
# Output paths: checked before generation so a bad -o fails in a second, with nothing on disk
# --------------------------------------------------------------------------------------------------


def _output_format(path: PathLike, kind: Kind) -> str:
    if kind not in SUPPORTED_SUFFIXES:
        raise ValueError(f"kind must be 'video' or 'image', got {kind!r}")
    text = os.fspath(path)
    if not text:
        raise ValueError("output path is empty; give a file name such as out.mp4")
    suffix = Path(text).suffix.lower()
    folder = text.endswith(("/", os.sep)) or not suffix
    if kind == "video" and folder:
        return FRAMES
    if not folder and suffix in SUPPORTED_SUFFIXES[kind]:
        return _FORMATS[suffix]
    hint = " or a folder (no suffix, or ending in '/') for numbered PNG frames" if kind == "video" else ""
    raise ValueError(
        f"cannot save a {kind} to {text!r}: unsupported suffix {suffix or '(none)'}; "
        f"use {', '.join(SUPPORTED_SUFFIXES[kind])}{hint}"
    )


def _require_encoder(name: str) -> None:
    import av

    try:
        av.Codec(name, "w")
    except ValueError as err:  # av.codec.codec.UnknownCodecError
        raise ValueError(
            f"the {name} encoder is not in PyAV's bundled FFmpeg; save as .mp4 instead, or install a "
            "PyAV build that includes it"
        ) from err


def _is_frame_folder(folder: Path) -> bool:
    """True if ``folder`` holds only what an earlier frames save wrote, so replacing it loses nothing else."""
    return all(_FRAME_FILE.fullmatch(p.name) or p.name == _SIDECAR_IN_FOLDER for p in folder.iterdir())


def check_output_path(path: PathLike, kind: Kind = "video", *, overwrite: bool = False) -> str:
    """Check that a ``kind`` result can be saved to ``path``; return the format ``save`` will write.

    Formats: "mp4", "webm", "gif", "frames" (folder of PNGs), "png", "jpeg", "webp". Call this before
    generating so a bad path fails at once. Raises ValueError for an unsupported suffix or a missing
    encoder, FileExistsError/IsADirectoryError/NotADirectoryError for a clash with what is on disk,
    PermissionError when the nearest existing folder is not writable. Creates nothing.
    """
    fmt = _output_format(path, kind)
    if fmt in _AV_CODECS:
        _require_encoder(_AV_CODECS[fmt][0])
    target = Path(path).expanduser()
    if fmt == FRAMES:
        if target.exists() and not target.is_dir():
            raise FileExistsError(f"{target} is a file; PNG frames need a folder path, or give a .mp4 name")
        if target.is_dir() and any(target.iterdir()):
            if not overwrite:
                raise FileExistsError(f"{target} is not empty; choose a new folder or pass overwrite=True")
            if not _is_frame_folder(target):
                raise FileExistsError(
                    f"{target} holds files other than frames from an earlier save; refusing to replace it "
                    "even with overwrite=True; choose a new folder"
                )
    elif target.is_dir():
        raise IsADirectoryError(f"{target} is a folder; give a file name such as {target / 'out'}.mp4")
    existing = target.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise NotADirectoryError(f"cannot create folder {target.parent}: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write to {existing.absolute()}: permission denied; choose another path")
    return fmt


# --------------------------------------------------------------------------------------------------
# Encoders: each writes one complete file at a temp path
# --------------------------------------------------------------------------------------------------


def _encode_av(frames: np.ndarray, fps: float, path: Path, fmt: str, record: dict[str, Any]) -> None:
    """H.264 or VP9, yuv420p so browsers play it, BT.709 tagged so players convert colours back right."""
    import av
    from av.video.reformatter import ColorPrimaries, ColorRange, ColorTrc

    codec, options = _AV_CODECS[fmt]
    rate = Fraction(fps).limit_denominator(1001)  # 24 → 24/1, 29.97 → 2997/100, 30000/1001 stays exact
    # yuv420p stores colour per 2x2 block, so x264 refuses odd sizes: repeat the last row/column.
    # (VP9 accepts odd sizes as they are.)
    pad_h, pad_w = (frames.shape[1] % 2, frames.shape[2] % 2) if fmt == "mp4" else (0, 0)
    container_options = {"movflags": "+faststart"} if fmt == "mp4" else {}  # index first: plays while loading
    with av.open(str(path), mode="w", format=fmt, options=container_options) as container:
        container.metadata["comment"] = json.dumps(record, ensure_ascii=False)
        stream = container.add_stream(codec, rate=rate, options=options)
        stream.height, stream.width = frames.shape[1] + pad_h, frames.shape[2] + pad_w
        stream.pix_fmt = "yuv420p"
        ctx = stream.codec_context
        ctx.time_base = 1 / rate  # pts below count frames
        ctx.color_primaries, ctx.color_trc = ColorPrimaries.BT709, ColorTrc.BT709
        ctx.colorspace, ctx.color_range = 1, ColorRange.MPEG  # 1 = AVCOL_SPC_BT709
        for i, frame in enumerate(frames):
            if pad_h or pad_w:
                frame = np.pad(frame, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge")
            picture = av.VideoFrame.from_ndarray(frame, format="rgb24")
            picture = picture.reformat(format="yuv420p", dst_colorspace="itu709", dst_color_range="MPEG")
            picture.pts = i
            container.mux(stream.encode(picture))
        container.mux(stream.encode(None))  # flush delayed frames


def _encode_gif(frames: np.ndarray, fps: float, path: Path, record: dict[str, Any]) -> None:
    """Looping GIF; delays are whole centiseconds, spread so the total duration stays T / fps."""
    from PIL import Image as PILImage

    if fps > 50:
        logger.warning("GIF players slow down frames shorter than 20 ms; %.3g fps plays slower than set", fps)
    ticks = [round(i * 100 / fps) for i in range(len(frames) + 1)]
    durations = [max(b - a, 1) * 10 for a, b in zip(ticks, ticks[1:], strict=False)]  # ms
    images = [PILImage.fromarray(frame) for frame in frames]
    comment = json.dumps(record, ensure_ascii=False).encode()
    images[0].save(
        path,
        format="GIF",
        save_all=True,
        append_images=images[1:],
        duration=durations,
        loop=0,
        comment=comment,
    )


def _parameters_text(record: dict[str, Any]) -> str:
    """A1111-style summary (prompt / Negative prompt / Key: value, ...) that image browsers display."""
    lines = [str(record.get("prompt", ""))]
    if record.get("negative_prompt"):
        lines.append(f"Negative prompt: {record['negative_prompt']}")
    skip = ("prompt", "negative_prompt")
    pairs = [f"{k.replace('_', ' ').capitalize()}: {v}" for k, v in record.items() if k not in skip]
    return "\n".join([*lines, ", ".join(pairs)])


def _encode_image(image: PIL.Image.Image, path: Path, fmt: str, record: dict[str, Any]) -> None:
    from PIL import Image as PILImage
    from PIL.PngImagePlugin import PngInfo

    text = json.dumps(record, ensure_ascii=False)
    if fmt == "png":
        info = PngInfo()  # add_text falls back to UTF-8 iTXt chunks for non-Latin prompts
        info.add_text("kandinsky5", text)
        info.add_text("parameters", _parameters_text(record))
        image.save(path, format="PNG", pnginfo=info)
    elif fmt == "jpeg":
        image.save(path, format="JPEG", quality=95, subsampling=0, comment=text.encode())
    else:
        exif = PILImage.Exif()
        exif[0x010E] = json.dumps(record)  # ImageDescription; EXIF strings are ASCII, so escape the rest
        image.save(path, format="WEBP", quality=95, exif=exif)


# --------------------------------------------------------------------------------------------------
# Atomic writes
# --------------------------------------------------------------------------------------------------


def _save_file(target: Path, write: Callable[[Path], None], record: dict[str, Any]) -> Path:
    """Write the media and its ``<name>.json`` sidecar to temp files, then rename both into place."""
    created = make_parents(target.parent)
    sidecar = target.with_name(target.name + ".json")
    temps: list[Path] = []
    try:
        temps.append(new_temp_file(target))
        write(temps[0])
        fsync_path(temps[0])
        temps.append(new_temp_file(sidecar))
        write_json_durable(temps[1], record)
        os.replace(temps[0], target)
        try:
            os.replace(temps[1], sidecar)
        except BaseException:
            target.unlink(missing_ok=True)  # a file without its sidecar is a half result
            raise
    except BaseException:
        for tmp in temps:
            tmp.unlink(missing_ok=True)
        remove_empty(created)
        raise
    fsync_path(target.parent)
    logger.info("saved %s", target)
    return target


def _save_folder(target: Path, frames: np.ndarray, record: dict[str, Any]) -> Path:
    """Write frame_00000.png, ... and metadata.json into a temp folder, then rename it into place."""
    from PIL import Image as PILImage

    created = make_parents(target.parent)
    tmp = temp_beside(target)
    tmp.mkdir()  # mode 0o777 minus umask, like any new folder
    previous = None
    try:
        for i, frame in enumerate(frames):
            png = tmp / f"frame_{i:05d}.png"
            PILImage.fromarray(frame).save(png, format="PNG")
            fsync_path(png)
        write_json_durable(tmp / _SIDECAR_IN_FOLDER, record)
        fsync_path(tmp)
        if target.exists():  # empty, or frames of an earlier save (check_output_path made sure)
            previous = temp_beside(target)
            os.rename(target, previous)
        os.rename(tmp, target)
    except BaseException:
        if previous is not None and not target.exists():
            os.rename(previous, target)
            previous = None
        shutil.rmtree(tmp, ignore_errors=True)
        remove_empty(created)
        raise
    if previous is not None:
        shutil.rmtree(previous)
    fsync_path(target.parent)
    logger.info("saved %d frames to %s", len(frames), target)
    return target


# --------------------------------------------------------------------------------------------------
# Loading conditioning inputs
# --------------------------------------------------------------------------------------------------


def load_image(path: PathLike) -> PIL.Image.Image:
    """Open a conditioning image as RGB, upright per its EXIF orientation, fully read (file closed).

    Transparent areas are flattened onto white rather than keeping whatever colour hides under alpha 0.
    """
    from PIL import Image as PILImage
    from PIL import ImageOps

    file = Path(path).expanduser()
    if not file.exists():
        raise FileNotFoundError(errno.ENOENT, "image not found", str(file))
    if file.is_dir():
        raise ValueError(f"{file} is a folder, not an image file")
    try:
        with PILImage.open(file) as opened:
            opened.load()
            image = ImageOps.exif_transpose(opened)
    except OSError as err:
        if err.errno is not None:  # a system error (permissions, I/O), not a decoding one
            raise
        raise ValueError(f"{file} is not an image file Pillow can read ({err})") from err
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = PILImage.alpha_composite(PILImage.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return image.convert("RGB")
