"""Latent cache (build, resume, bad items), dataset, collate and the resumable bucket sampler."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from train_helpers import LATENT_SHAPE, fake_text, fake_video, make_items

from kandinsky5.train.data import (
    BucketSampler,
    CacheError,
    DataItem,
    EncodedVideo,
    LatentDataset,
    build_cache,
    collate,
    nearest_bucket,
)


class CountingVideo:
    """fake_video that records which items it encoded and fails on request."""

    def __init__(self, fail: set[int] = frozenset()):
        self.calls: list[int] = []
        self.fail = fail

    def __call__(self, media: int) -> torch.Tensor:
        self.calls.append(media)
        if media in self.fail:
            raise RuntimeError("corrupt file")
        return fake_video(media)


def test_cache_round_trip(tmp_path: Path):
    summary = build_cache(make_items(7), fake_video, fake_text, tmp_path, shard_size=3)
    assert (summary.num_samples, summary.num_skipped, summary.shards_written) == (7, 0, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "manifest.json",
        "shard_00000.safetensors",
        "shard_00001.safetensors",
        "shard_00002.safetensors",
    ]
    dataset = LatentDataset(tmp_path)
    assert len(dataset) == 7
    sample = dataset[4]
    assert sample.key == "item004"
    assert torch.equal(sample.latent, fake_video(4))
    text = fake_text(make_items(7)[4].caption)
    length = int(text.mask.sum())  # right padding is not stored
    assert torch.equal(sample.tokens, text.tokens[0, :length]) and bool(sample.mask.all())
    assert torch.equal(sample.pooled, text.pooled[0])
    assert sample.condition is None


def test_bad_items_are_skipped_and_counted(tmp_path: Path, caplog):
    items = make_items(6)
    items[1] = DataItem("no-caption", 1, None)
    items[2] = DataItem("blank", 2, "   ")
    video = CountingVideo(fail={4})

    def text(caption: str):
        if caption == "hands knead dough":  # item003
            raise ValueError("tokenizer exploded")
        return fake_text(caption)

    with caplog.at_level("WARNING"):
        summary = build_cache(items, video, text, tmp_path, shard_size=4)
    assert summary.num_samples == 2 and summary.num_skipped == 4
    assert summary.skipped_reasons == {"missing caption": 2, "video encoding failed": 1, "text encoding failed": 1}
    assert "skipping no-caption: missing caption" in caplog.text
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert {s["key"] for s in manifest["skipped"]} == {"no-caption", "blank", "item003", "item004"}
    assert any("corrupt file" in s["reason"] for s in manifest["skipped"])
    dataset = LatentDataset(tmp_path)
    assert [dataset[i].key for i in range(len(dataset))] == ["item000", "item005"]
    assert dataset.summary().skipped_reasons == summary.skipped_reasons


def test_an_interrupted_build_resumes_with_the_missing_shards_only(tmp_path: Path):
    items = make_items(8)
    build_cache(items, fake_video, fake_text, tmp_path, shard_size=3)
    reference = {k: v for k, v in LatentDataset(tmp_path)[7].__dict__.items()}
    # A crash during shard 1: it was never renamed into place and the manifest was never written.
    (tmp_path / "shard_00001.safetensors").unlink()
    (tmp_path / "manifest.json").unlink()
    with pytest.raises(CacheError, match="manifest.json is missing"):
        LatentDataset(tmp_path)

    video = CountingVideo()
    summary = build_cache(items, video, fake_text, tmp_path, shard_size=3)
    assert video.calls == [3, 4, 5]
    assert (summary.shards_written, summary.shards_reused, summary.num_samples) == (1, 2, 8)
    again = LatentDataset(tmp_path)[7]
    assert all(torch.equal(getattr(again, k), v) for k, v in reference.items() if isinstance(v, torch.Tensor))


def test_a_shard_whose_items_changed_is_rebuilt(tmp_path: Path):
    items = make_items(6)
    build_cache(items, fake_video, fake_text, tmp_path, shard_size=3)
    items[4] = DataItem("new", 40, "a new clip")
    video = CountingVideo()
    build_cache(items, video, fake_text, tmp_path, shard_size=3)
    assert video.calls == [3, 40, 5]
    assert LatentDataset(tmp_path)[4].key == "new"


def test_a_damaged_shard_is_rebuilt(tmp_path: Path):
    items = make_items(4)
    build_cache(items, fake_video, fake_text, tmp_path, shard_size=2)
    (tmp_path / "shard_00000.safetensors").write_bytes(b"garbage")
    video = CountingVideo()
    build_cache(items, video, fake_text, tmp_path, shard_size=2)
    assert video.calls == [0, 1]


def test_duplicate_keys_and_empty_caches_are_refused(tmp_path: Path):
    with pytest.raises(ValueError, match="unique"):
        build_cache([DataItem("a", 0, "x"), DataItem("a", 1, "y")], fake_video, fake_text, tmp_path)
    build_cache([DataItem("a", 0, None)], fake_video, fake_text, tmp_path / "empty")
    with pytest.raises(CacheError, match="no samples"):
        LatentDataset(tmp_path / "empty")


def test_condition_latents_are_stored(tmp_path: Path):
    def video(seed: int) -> EncodedVideo:
        latent = fake_video(seed)
        return EncodedVideo(latent=latent[None], condition=latent[0] + 1)  # a batch axis of 1 is accepted

    build_cache(make_items(2), video, fake_text, tmp_path)
    sample = LatentDataset(tmp_path)[1]
    assert sample.latent.shape == LATENT_SHAPE
    assert torch.equal(sample.condition, fake_video(1)[0] + 1)


def test_collate_pads_captions_on_the_right(tmp_path: Path):
    build_cache(make_items(2), fake_video, fake_text, tmp_path)  # captions of 3 and 6 words
    dataset = LatentDataset(tmp_path)
    batch = collate([dataset[0], dataset[1]])
    assert batch.latent.shape == (2, *LATENT_SHAPE) and batch.tokens.shape == (2, 6, 24)
    assert batch.mask.tolist() == [[True] * 3 + [False] * 3, [True] * 6]
    assert bool((batch.tokens[0, 3:] == 0).all())
    assert batch.keys == ("item000", "item001")


def test_sampler_is_deterministic_groups_shapes_and_resumes_exactly():
    keys = [(2, 4, 4)] * 5 + [(1, 8, 4)] * 4
    sampler = BucketSampler(keys, batch_size=2, seed=3)
    epoch0 = sampler.epoch_batches(0)
    assert epoch0 == BucketSampler(keys, batch_size=2, seed=3).epoch_batches(0)
    assert epoch0 != sampler.epoch_batches(1)
    assert sorted(i for batch in epoch0 for i in batch) == list(range(9))  # every sample once
    assert all(len({keys[i] for i in batch}) == 1 for batch in epoch0)
    assert sorted(len(b) for b in epoch0) == [1, 2, 2, 2, 2]

    drawn = [sampler.next_batch() for _ in range(7)]  # crosses into epoch 1
    state = sampler.state_dict()
    assert state == {"epoch": 1, "position": 2}
    rest = [sampler.next_batch() for _ in range(6)]
    resumed = BucketSampler(keys, batch_size=2, seed=3)
    resumed.load_state_dict(state)
    assert [resumed.next_batch() for _ in range(6)] == rest
    assert drawn[:5] == epoch0


def test_sampler_drop_last():
    sampler = BucketSampler([0] * 5, batch_size=2, seed=0, drop_last=True)
    assert [len(b) for b in sampler.epoch_batches(0)] == [2, 2]
    with pytest.raises(ValueError, match="no bucket holds"):
        BucketSampler([0], batch_size=2, seed=0, drop_last=True)


def test_nearest_bucket_by_aspect_ratio():
    buckets = [(512, 512), (512, 768), (768, 512)]
    assert nearest_bucket(1080, 1920, buckets) == (512, 768)
    assert nearest_bucket(1920, 1080, buckets) == (768, 512)
    assert nearest_bucket(100, 110, buckets) == (512, 512)
