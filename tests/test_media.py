"""Results and how they are written: every format decodes back to what was saved, with its metadata.

Videos are tiny (64x48) so the whole file runs in seconds; decoding goes through PyAV and Pillow, the
same libraries a user would read the files with. Atomicity is checked by making an encoder fail midway.
"""

from __future__ import annotations

import json
import os
import stat
import warnings
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import PIL.Image
import pytest
import torch

from kandinsky5 import media
from kandinsky5.media import (
    SUPPORTED_SUFFIXES,
    Image,
    Video,
    check_output_path,
    frames_from_vae_output,
    load_image,
    vae_input_from_frames,
)

META = {"prompt": "кот в шляпе, a cat in a hat", "negative_prompt": "blurry", "seed": 42, "steps": 50}


def gradient(t: int, h: int, w: int) -> np.ndarray:
    """A smooth colour ramp that drifts over time: easy to compress, so codec error stays small."""
    tt, yy, xx = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
    r = 30 + 180 * xx / max(w - 1, 1) + tt % 40
    g = 30 + 180 * yy / max(h - 1, 1)
    b = 128 + 60 * np.sin(tt / 5 + xx / 20)
    return np.stack([r, g, b], axis=-1).round().astype(np.uint8)


def decode(path: Path) -> tuple[np.ndarray, Fraction, dict[str, str]]:
    """Frames (T, H, W, 3), frame rate and container tags (keys lower-cased: Matroska upper-cases them)."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)])
        tags = {k.lower(): v for k, v in container.metadata.items()}
        return frames, stream.average_rate, tags


def sidecar(path: Path) -> dict:
    return json.loads(path.with_name(path.name + ".json").read_text(encoding="utf-8"))


def has_encoder(name: str) -> bool:
    try:
        av.Codec(name, "w")
    except ValueError:
        return False
    return True


def video_encoders() -> str:
    names = (n for n in av.codecs_available if has_encoder(n) and av.Codec(n, "w").type == "video")
    return ", ".join(sorted(names))


# ------------------------------------------------------------------------------------------------ video


@pytest.mark.parametrize(("t", "h", "w"), [(1, 48, 64), (17, 48, 64), (121, 48, 64), (9, 47, 63)])
def test_mp4_round_trip(tmp_path: Path, t: int, h: int, w: int) -> None:
    frames = gradient(t, h, w)
    out = Video(frames, 24.0, META).save(tmp_path / "out.mp4")

    decoded, rate, tags = decode(out)
    # Odd sizes are padded by one edge-replicated row/column (yuv420p needs even sizes).
    assert decoded.shape == (t, h + h % 2, w + w % 2, 3)
    assert rate == 24
    error = np.abs(decoded[:, :h, :w].astype(float) - frames).mean()
    assert error < 3.0, f"mean abs error {error:.2f} levels"
    if h % 2:
        assert np.abs(decoded[:, h].astype(float) - decoded[:, h - 1]).mean() < 3.0

    expected = {**META, "fps": 24.0, "num_frames": t, "height": h, "width": w}
    if h % 2 or w % 2:
        expected |= {"encoded_height": h + h % 2, "encoded_width": w + w % 2}
    assert json.loads(tags["comment"]) == expected
    assert sidecar(out) == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.mp4", "out.mp4.json"]


def test_mp4_keeps_ntsc_rate_exact(tmp_path: Path) -> None:
    out = Video(gradient(5, 48, 64), 30000 / 1001).save(tmp_path / "ntsc.mp4")
    decoded, rate, _ = decode(out)
    assert len(decoded) == 5
    assert rate == Fraction(30000, 1001)


def test_webm_round_trip(tmp_path: Path) -> None:
    if not has_encoder("libvpx-vp9"):
        pytest.skip(f"PyAV's FFmpeg has no libvpx-vp9; video encoders present: {video_encoders()}")
    frames = gradient(17, 47, 63)  # VP9 takes odd sizes as they are
    out = Video(frames, 24.0, META).save(tmp_path / "out.webm")

    decoded, rate, tags = decode(out)
    assert decoded.shape == frames.shape
    assert rate == 24
    assert np.abs(decoded.astype(float) - frames).mean() < 3.0
    assert (
        json.loads(tags["comment"])
        == sidecar(out)
        == {**META, "fps": 24.0, "num_frames": 17}
        | {
            "height": 47,
            "width": 63,
        }
    )


def test_webm_without_encoder_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_codec(name: str, mode: str = "r") -> None:
        raise av.codec.codec.UnknownCodecError(name)

    monkeypatch.setattr(av, "Codec", no_codec)
    with pytest.raises(ValueError, match="libvpx-vp9 encoder is not in PyAV"):
        Video(gradient(2, 8, 8)).save(tmp_path / "out.webm")
    assert list(tmp_path.iterdir()) == []


def test_gif_frames_duration_and_loop(tmp_path: Path) -> None:
    out = Video(gradient(17, 48, 64), 24.0, META).save(tmp_path / "out.gif")
    with PIL.Image.open(out) as gif:
        assert gif.n_frames == 17
        assert gif.size == (64, 48)
        assert gif.info["loop"] == 0
        assert json.loads(gif.info["comment"])["seed"] == 42
        durations = []
        for i in range(gif.n_frames):
            gif.seek(i)
            durations.append(gif.info["duration"])
    # GIF delays are whole centiseconds: 40 or 50 ms, spread so the total stays 17 / 24 s.
    assert set(durations) <= {40, 50}
    assert abs(sum(durations) - 17 * 1000 / 24) <= 10
    assert sidecar(out)["num_frames"] == 17


@pytest.mark.parametrize("name", ["frames", "frames.v1/"])
def test_png_folder(tmp_path: Path, name: str) -> None:
    frames = gradient(5, 47, 63)
    out = Video(frames, 24.0, META).save(f"{tmp_path}/{name}")  # a Path would drop the "/"
    assert out == tmp_path / name.rstrip("/")
    assert sorted(p.name for p in out.iterdir()) == [f"frame_{i:05d}.png" for i in range(5)] + ["metadata.json"]
    with PIL.Image.open(out / "frame_00003.png") as png:
        np.testing.assert_array_equal(np.asarray(png), frames[3])  # PNG is lossless
    meta = json.loads((out / "metadata.json").read_text(encoding="utf-8"))
    assert meta == {**META, "fps": 24.0, "num_frames": 5, "height": 47, "width": 63}
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # no temp folder left


def test_png_folder_overwrite_rules(tmp_path: Path) -> None:
    out = tmp_path / "frames"
    Video(gradient(5, 8, 8)).save(out)
    with pytest.raises(FileExistsError, match="not empty.*overwrite=True"):
        Video(gradient(3, 8, 8)).save(out)
    Video(gradient(3, 8, 8)).save(out, overwrite=True)
    assert len(list(out.glob("frame_*.png"))) == 3  # no stale frames from the longer first save

    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="refusing to replace"):
        Video(gradient(3, 8, 8)).save(other, overwrite=True)
    assert (other / "notes.txt").read_text() == "keep me"

    empty = tmp_path / "empty"
    empty.mkdir()
    Video(gradient(2, 8, 8)).save(empty)
    assert len(list(empty.iterdir())) == 3


def test_missing_parents_are_created(tmp_path: Path) -> None:
    out = Video(gradient(2, 8, 8)).save(tmp_path / "a" / "b" / "out.mp4")
    assert out.is_file()


def test_saved_file_mode_follows_umask(tmp_path: Path) -> None:
    out = Video(gradient(2, 8, 8)).save(tmp_path / "out.gif")
    plain = tmp_path / "plain"
    plain.write_bytes(b"")
    assert stat.S_IMODE(out.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)


def test_existing_file_is_replaced(tmp_path: Path) -> None:
    out = tmp_path / "out.mp4"
    Video(gradient(3, 8, 8)).save(out)
    Video(gradient(5, 8, 8)).save(out)
    assert len(decode(out)[0]) == 5


# ------------------------------------------------------------------------------------------- atomicity


def fail_on_call(n: int, original):
    """Wrap ``original`` so that its n-th call raises, as a crash midway through encoding would."""
    calls = {"count": 0}

    def wrapper(*args, **kwargs):
        calls["count"] += 1
        if calls["count"] == n:
            raise RuntimeError("encoder crashed")
        return original(*args, **kwargs)

    return wrapper


def test_failed_mp4_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(av.VideoFrame, "from_ndarray", fail_on_call(5, av.VideoFrame.from_ndarray))
    with pytest.raises(RuntimeError, match="encoder crashed"):
        Video(gradient(17, 48, 64)).save(tmp_path / "new" / "out.mp4")
    assert list(tmp_path.iterdir()) == []  # no file, no temp, and the folder it created is gone


def test_failed_save_keeps_the_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = Video(gradient(3, 8, 8)).save(tmp_path / "out.mp4")
    before = out.read_bytes()
    monkeypatch.setattr(av.VideoFrame, "from_ndarray", fail_on_call(2, av.VideoFrame.from_ndarray))
    with pytest.raises(RuntimeError):
        Video(gradient(9, 8, 8)).save(out)
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.mp4", "out.mp4.json"]


def test_failed_sidecar_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(media, "write_json_durable", fail_on_call(1, media.write_json_durable))
    with pytest.raises(RuntimeError):
        Image(gradient(1, 8, 8)[0]).save(tmp_path / "out.png")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["out.gif", "frames"])
def test_failed_pillow_save_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    monkeypatch.setattr(PIL.Image.Image, "save", fail_on_call(3, PIL.Image.Image.save))
    if name == "out.gif":  # the GIF is one save call: make it fail in the frame conversion instead
        monkeypatch.setattr(PIL.Image, "fromarray", fail_on_call(3, PIL.Image.fromarray))
    with pytest.raises(RuntimeError):
        Video(gradient(6, 8, 8)).save(tmp_path / name)
    assert list(tmp_path.iterdir()) == []


def test_failed_folder_overwrite_keeps_the_previous_frames(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = Video(gradient(4, 8, 8)).save(tmp_path / "frames")
    monkeypatch.setattr(PIL.Image.Image, "save", fail_on_call(2, PIL.Image.Image.save))
    with pytest.raises(RuntimeError):
        Video(gradient(6, 8, 8)).save(out, overwrite=True)
    assert len(list(out.glob("frame_*.png"))) == 4
    assert [p.name for p in tmp_path.iterdir()] == ["frames"]


# ------------------------------------------------------------------------------------------- images


def test_png_text_chunks_round_trip(tmp_path: Path) -> None:
    pixels = gradient(1, 47, 63)[0]
    out = Image(pixels, META).save(tmp_path / "out.png")
    with PIL.Image.open(out) as png:
        np.testing.assert_array_equal(np.asarray(png), pixels)
        record = json.loads(png.text["kandinsky5"])
        parameters = png.text["parameters"]
    assert record == sidecar(out) == {**META, "height": 47, "width": 63}
    assert parameters.splitlines()[:2] == [META["prompt"], "Negative prompt: blurry"]
    assert "Seed: 42" in parameters


def test_jpeg_and_webp_carry_metadata(tmp_path: Path) -> None:
    pixels = gradient(1, 48, 64)[0]
    jpg = Image(pixels, META).save(tmp_path / "out.JPG")
    webp = Image(pixels, META).save(tmp_path / "out.webp")
    with PIL.Image.open(jpg) as im:
        assert im.format == "JPEG"
        assert json.loads(im.info["comment"])["prompt"] == META["prompt"]
        assert np.abs(np.asarray(im).astype(float) - pixels).mean() < 3.0
    with PIL.Image.open(webp) as im:
        assert im.format == "WEBP"
        assert json.loads(im.getexif()[0x010E])["prompt"] == META["prompt"]
    assert sidecar(webp)["seed"] == 42


def test_to_pil() -> None:
    pil = Image(gradient(1, 8, 12)[0]).to_pil()
    assert (pil.mode, pil.size) == ("RGB", (12, 8))


# ------------------------------------------------------------------------------------ tensors, checks


def test_frames_from_vae_output_truncates_like_the_official_code() -> None:
    values = torch.tensor([-3.0, -1.0, -0.5, 0.0, 0.999, 1.0, 2.0])
    x = values.view(1, 1, 1, 7).expand(3, 1, 1, 7).clone()
    x[1] = 0.0
    frames = frames_from_vae_output(x)
    assert frames.shape == (1, 1, 7, 3) and frames.dtype == np.uint8
    assert frames[0, 0, :, 0].tolist() == [0, 0, 63, 127, 254, 255, 255]
    assert frames[0, 0, :, 1].tolist() == [127] * 7  # channel 1 lands in the last axis


def test_vae_input_from_frames_keeps_the_batch_and_moves_channels_first() -> None:
    frames = np.random.default_rng(0).integers(0, 256, (2, 5, 6, 7, 3), dtype=np.uint8)  # (B, T, H, W, 3)
    x = vae_input_from_frames(frames)
    assert x.shape == (2, 3, 5, 6, 7) and x.dtype == torch.float32
    assert x[1, 2, 4, 5, 6] == frames[1, 4, 5, 6, 2] / 127.5 - 1.0
    assert -1.0 <= x.min() and x.max() <= 1.0
    back = frames_from_vae_output(x[1]).astype(int)  # the official truncation may lose 1
    assert np.all((frames[1] - back >= 0) & (frames[1] - back <= 1))
    frames.setflags(write=False)  # as np.asarray gives a PIL image's pixels: converted without a warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(vae_input_from_frames(frames), x)
    with pytest.raises(ValueError, match="uint8 RGB frames"):
        vae_input_from_frames(frames.astype(np.float32))
    with pytest.raises(ValueError, match="uint8 RGB frames"):
        vae_input_from_frames(frames[0, 0])  # (H, W, 3): no time axis


def test_from_tensor_layouts() -> None:
    x = torch.rand(3, 5, 6, 7) * 2 - 1
    video = Video.from_tensor(x, 24.0, {"seed": 1})
    assert video.frames.shape == (5, 6, 7, 3) and video.metadata == {"seed": 1}
    image = Image.from_tensor(x[:, 0])
    np.testing.assert_array_equal(image.pixels, video.frames[0])
    with pytest.raises(ValueError, match=r"pass one sample, e.g. x\[0\]"):
        Video.from_tensor(x[None])
    with pytest.raises(ValueError, match="expected shape"):
        Image.from_tensor(x)
    with pytest.raises(ValueError, match="NaN"):
        Video.from_tensor(torch.full((3, 1, 2, 2), float("nan")))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"frames": np.zeros((2, 8, 8, 3), np.float32)}, "must be uint8"),
        ({"frames": np.zeros((2, 3, 8, 8), np.uint8)}, r"shape \(T, H, W, 3\)"),
        ({"frames": np.zeros((0, 8, 8, 3), np.uint8)}, "must not be empty"),
        ({"frames": torch.zeros(2, 8, 8, 3, dtype=torch.uint8)}, "from_tensor"),
        ({"fps": 0}, "positive"),
        ({"fps": float("nan")}, "positive"),
        ({"metadata": {"seed": np.int64(3)}}, "JSON-serialisable"),
        ({"metadata": {"guidance": float("inf")}}, "JSON-serialisable"),
    ],
)
def test_video_validation(kwargs: dict, message: str) -> None:
    args = {"frames": np.zeros((2, 8, 8, 3), np.uint8), "fps": 24.0, "metadata": {}} | kwargs
    with pytest.raises(ValueError, match=message):
        Video(**args)


def test_bad_suffix_lists_supported(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"\.avi.*\.mp4, \.webm, \.gif or a folder"):
        Video(gradient(2, 8, 8)).save(tmp_path / "out.avi")
    with pytest.raises(ValueError, match=r"\.png, \.jpg, \.jpeg, \.webp"):
        Image(gradient(1, 8, 8)[0]).save(tmp_path / "out.mp4")
    with pytest.raises(ValueError, match="unsupported suffix"):
        check_output_path(tmp_path / "out", "image")
    assert list(tmp_path.iterdir()) == []


def test_check_output_path(tmp_path: Path) -> None:
    assert check_output_path(tmp_path / "x" / "y" / "out.MP4") == "mp4"
    assert check_output_path(tmp_path / "frames") == "frames"
    assert check_output_path(tmp_path / "out.jpeg", "image") == "jpeg"
    assert list(tmp_path.iterdir()) == []  # checking creates nothing
    assert set(SUPPORTED_SUFFIXES) == {"video", "image"}

    (tmp_path / "dir.mp4").mkdir()
    with pytest.raises(IsADirectoryError, match="is a folder"):
        check_output_path(tmp_path / "dir.mp4")
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError, match="is a file"):
        check_output_path(tmp_path / "file" / "out.mp4")
    with pytest.raises(FileExistsError, match="is a file"):
        check_output_path(tmp_path / "file")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores folder permissions")
def test_unwritable_folder(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(PermissionError, match="cannot write to .*locked"):
            check_output_path(locked / "sub" / "out.mp4")
        with pytest.raises(PermissionError):
            Video(gradient(2, 8, 8)).save(locked / "out.mp4")
    finally:
        locked.chmod(0o700)
    assert list(locked.iterdir()) == []


def test_unwritable_folder_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same check with os.access faked, so it runs as root too."""
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(PermissionError, match=f"cannot write to {tmp_path}.*choose another path"):
        Video(gradient(2, 8, 8)).save(tmp_path / "new" / "out.mp4")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------ loading


def test_load_image(tmp_path: Path) -> None:
    rgba = np.zeros((4, 6, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:, :3, 3] = 255  # left half opaque red, right half fully transparent
    PIL.Image.fromarray(rgba).save(tmp_path / "in.png")
    image = load_image(tmp_path / "in.png")
    assert (image.mode, image.size) == ("RGB", (6, 4))
    assert image.getpixel((0, 0)) == (200, 0, 0)
    assert image.getpixel((5, 0)) == (255, 255, 255)  # transparent → white

    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_image(tmp_path / "missing.png")
    (tmp_path / "notes.png").write_text("not pixels")
    with pytest.raises(ValueError, match="not an image file"):
        load_image(tmp_path / "notes.png")
    with pytest.raises(ValueError, match="not an image file"):
        load_image(tmp_path)
