"""From a folder of captioned media to the latent cache (fake VAE and text encoder)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from train_helpers import TINY_DIT, fake_text

from kandinsky5.train.config import ConfigError, TrainConfig
from kandinsky5.train.data import LatentDataset
from kandinsky5.train.encode import encode_folder, fit_to_bucket, folder_items, read_frames


def _write_video(path: Path, frames: int, height: int = 48, width: int = 80) -> None:
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=24)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            image = np.full((height, width, 3), 20 * i, dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())


@pytest.fixture
def media_folder(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    (root / "clips").mkdir(parents=True)
    _write_video(root / "clips" / "fox.mp4", frames=11)
    (root / "clips" / "fox.txt").write_text("a red fox runs\n")
    Image.new("RGB", (64, 32), (200, 10, 10)).save(root / "cat.png")
    (root / "cat.txt").write_text("a cat")
    Image.new("RGB", (32, 32)).save(root / "nocaption.jpg")
    (root / "notes.md").write_text("ignored")
    return root


class FakeVAE:
    """8x spatial, 4x causal temporal average pooling to 16 channels."""

    def __init__(self):
        self.shapes = []

    def encode(self, pixels: torch.Tensor, generator: torch.Generator, sample: bool = True) -> torch.Tensor:
        self.shapes.append(tuple(pixels.shape))
        b, _, f, h, w = pixels.shape
        pooled = torch.nn.functional.avg_pool2d(pixels[:, :, ::4].flatten(1, 2), 8)  # (B, 3·T, h, w)
        pooled = pooled.unflatten(1, (3, (f - 1) // 4 + 1)).permute(0, 2, 3, 4, 1)  # (B, T, h, w, 3)
        return pooled.repeat(1, 1, 1, 1, 6)[..., :16]


class FakeTextEncoder:
    def __init__(self):
        self.calls = []

    def encode(self, prompts: list[str], template: str, max_length: int):
        self.calls.append((prompts[0], template, max_length))
        return fake_text(prompts[0])


def test_folder_items_pair_media_with_captions(media_folder: Path):
    items = folder_items(media_folder)
    assert [(i.key, i.caption) for i in items] == [
        ("cat.png", "a cat"),
        ("clips/fox.mp4", "a red fox runs"),
        ("nocaption.jpg", None),
    ]
    (media_folder / "empty").mkdir()
    with pytest.raises(ConfigError, match="no videos or images"):
        folder_items(media_folder / "empty")
    with pytest.raises(ConfigError, match="is not a folder"):
        folder_items(media_folder / "missing")


def test_metadata_jsonl_captions_win_over_txt(media_folder: Path):
    lines = [
        '{"file_name": "nocaption.jpg", "text": "a dark square"}',
        "",
        '{"file_name": "clips/fox.mp4", "caption": "a fox in the snow"}',
    ]
    (media_folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    items = {i.key: i.caption for i in folder_items(media_folder)}
    assert items == {"cat.png": "a cat", "clips/fox.mp4": "a fox in the snow", "nocaption.jpg": "a dark square"}
    (media_folder / "metadata.jsonl").write_text('{"file_name": "cat.png"}\n')
    with pytest.raises(ConfigError, match=r"metadata.jsonl:1: needs \"file_name\""):
        folder_items(media_folder)
    (media_folder / "metadata.jsonl").write_text("{not json\n")
    with pytest.raises(ConfigError, match="metadata.jsonl:1: not JSON"):
        folder_items(media_folder)


def test_read_frames_keeps_4k_plus_1(media_folder: Path):
    assert read_frames(media_folder / "clips" / "fox.mp4", max_frames=121).shape == (9, 48, 80, 3)
    assert read_frames(media_folder / "clips" / "fox.mp4", max_frames=5).shape == (5, 48, 80, 3)
    assert read_frames(media_folder / "cat.png", max_frames=121).shape == (1, 32, 64, 3)


def test_fit_to_bucket_covers_and_crops():
    frames = np.zeros((5, 90, 160, 3), dtype=np.uint8)
    frames[:, :, 70:90] = 255
    x = fit_to_bucket(frames, [(64, 64), (32, 64)])
    assert x.shape == (3, 5, 32, 64)  # 16:9 → the 1:2 bucket
    assert x.min() >= -1 and x.max() <= 1


def test_encode_folder_builds_the_cache(tmp_path: Path, media_folder: Path):
    config = TrainConfig(
        model="video-lite-i2v-5s",
        data_dir=str(media_folder),
        cache_dir=str(tmp_path / "cache"),
        buckets=((32, 64), (64, 32)),
        max_frames=5,
        device="cpu",
    )
    vae, text = FakeVAE(), FakeTextEncoder()
    summary = encode_folder(config, vae=vae, text_encoder=text)
    assert (summary.num_samples, summary.skipped_reasons) == (2, {"missing caption": 1})
    dataset = LatentDataset(config.cache_dir)
    shapes = {dataset[i].key: tuple(dataset[i].latent.shape) for i in range(2)}
    assert shapes == {"cat.png": (1, 4, 8, 16), "clips/fox.mp4": (2, 4, 8, 16)}
    assert dataset[1].condition.shape == (4, 8, 16)  # I2V: the first frame's latent
    assert text.calls[0] == ("a cat", "video", 256)


def test_encode_folder_needs_a_variant(tmp_path: Path, media_folder: Path):
    config = TrainConfig(model=TINY_DIT, init="random", data_dir=str(media_folder))
    with pytest.raises(ConfigError, match="needs model = a variant name"):
        encode_folder(config, vae=FakeVAE(), text_encoder=FakeTextEncoder())


def test_unreadable_and_too_small_media_are_skipped_and_summarised(tmp_path: Path, media_folder: Path):
    (media_folder / "broken.mp4").write_bytes(b"not a video at all")
    (media_folder / "broken.txt").write_text("a broken file")
    _write_video(media_folder / "short.mp4", frames=3)
    (media_folder / "short.txt").write_text("too short")
    Image.new("RGB", (8, 8)).save(media_folder / "tiny.png")
    (media_folder / "tiny.txt").write_text("too few pixels")
    config = TrainConfig(
        model="video-lite-5s-sft", data_dir=str(media_folder), cache_dir=str(tmp_path / "cache"),
        buckets=((32, 64), (64, 32), (32, 32)), max_frames=5, device="cpu",
    )  # fmt: skip
    summary = encode_folder(config, vae=FakeVAE(), text_encoder=FakeTextEncoder())
    assert summary.num_samples == 2
    assert summary.skipped_reasons == {"missing caption": 1, "unreadable media": 1, "too small": 2}
    assert summary.describe() == (
        "data: 2 samples used, 4 items skipped (missing caption: 1, too small: 2, unreadable media: 1)"
    )
    reasons = {s["key"]: s["reason"] for s in LatentDataset(config.cache_dir).manifest["skipped"]}
    assert reasons["short.mp4"] == "too small: fewer than 5 frames"
    assert reasons["tiny.png"].startswith("too small: 8x8 pixels would be enlarged 4.0x")
