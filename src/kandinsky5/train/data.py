"""Training data: a latent cache of safetensors shards, the dataset over it and a resumable bucket sampler.

Training reads pre-computed VAE latents and text embeddings, never pixels. ``build_cache`` encodes a
list of items into shards of ``shard_size`` items each::

    cache_dir/
      shard_00000.safetensors   per sample j: "j.latent" (T, H, W, C), "j.tokens" (L, D), "j.mask" (L,),
      shard_00001.safetensors   "j.pooled" (P,), optional "j.condition" (H, W, C); item keys and skipped
      ...                       items in the file's metadata
      manifest.json             written last: the cache is complete exactly when it exists

Each shard is written atomically, so an interrupted build resumes by re-encoding only the shards that
are missing. Text tokens are stored without their right padding (the DiT masks padding anyway) and padded
again per batch.

``BucketSampler`` groups samples of equal latent shape into batches and fixes their order from the seed
and the epoch alone; its whole state is ``(epoch, position)``, which the checkpoint stores.
"""

from __future__ import annotations

import collections
import json
import logging
import math
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..atomic import atomic_write, write_json_durable
from ..text import TextEmbeddings

__all__ = [
    "CacheError",
    "CacheSummary",
    "BucketSampler",
    "DataItem",
    "EncodedVideo",
    "LatentBatch",
    "LatentDataset",
    "LatentSample",
    "SkipItem",
    "build_cache",
    "collate",
    "nearest_bucket",
    "read_manifest",
]

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
CACHE_FORMAT = "kandinsky5-latent-cache"
CACHE_VERSION = 1


class CacheError(ValueError):
    """A latent cache that is missing, incomplete or inconsistent; the message says how to fix it."""


# --------------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataItem:
    """One training example before encoding.

    key: unique name stored in the cache (e.g. the media file's relative path).
    media: whatever ``encode_video_fn`` reads (a path, frames, ...).
    caption: the prompt; None or blank means the item is skipped.
    """

    key: str
    media: Any
    caption: str | None


@dataclass(frozen=True)
class EncodedVideo:
    """What ``encode_video_fn`` may return instead of a bare latent.

    latent: (T, H, W, C) scaled VAE latent (a leading batch axis of 1 is accepted).
    condition: optional (H, W, C) latent of a conditioning image (I2V first frame).
    """

    latent: torch.Tensor
    condition: torch.Tensor | None = None


@dataclass(frozen=True)
class LatentSample:
    """One cached sample: latent (T, H, W, C), tokens (L, D), mask (L,) bool, pooled (P,), condition."""

    key: str
    latent: torch.Tensor
    tokens: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor
    condition: torch.Tensor | None = None


@dataclass(frozen=True)
class LatentBatch:
    """A micro-batch of equal-shape latents.

    latent: (B, T, H, W, C); tokens: (B, L, D) right-padded to the longest caption; mask: (B, L) bool;
    pooled: (B, P); condition: (B, H, W, C) or None.
    """

    keys: tuple[str, ...]
    latent: torch.Tensor
    tokens: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor
    condition: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> LatentBatch:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return LatentBatch(
            self.keys, move(self.latent), move(self.tokens), move(self.mask), move(self.pooled), move(self.condition)
        )


@dataclass(frozen=True)
class CacheSummary:
    """What ``build_cache`` did (or what a cache holds): counts and the reasons items were skipped."""

    num_samples: int
    num_skipped: int
    skipped_reasons: dict[str, int] = field(default_factory=dict)  # reason category → count
    shards_written: int = 0
    shards_reused: int = 0

    def describe(self) -> str:
        """One line for the end-of-run summary: samples used, items skipped and why."""
        line = f"data: {self.num_samples} samples used, {self.num_skipped} items skipped"
        if self.skipped_reasons:
            line += " (" + ", ".join(f"{k}: {n}" for k, n in sorted(self.skipped_reasons.items())) + ")"
        return line


# --------------------------------------------------------------------------------------------------
# Building the cache
# --------------------------------------------------------------------------------------------------


def _shard_name(index: int) -> str:
    return f"shard_{index:05d}.safetensors"


def _reason_category(reason: str) -> str:
    return reason.split(":", 1)[0]


def _latent_of(encoded: torch.Tensor | EncodedVideo) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(encoded, EncodedVideo):
        latent, condition = encoded.latent, encoded.condition
    elif isinstance(encoded, torch.Tensor):
        latent, condition = encoded, None
    else:
        raise TypeError(f"encode_video_fn returned {type(encoded).__name__}, not a tensor or EncodedVideo")
    if latent.ndim == 5 and latent.shape[0] == 1:
        latent = latent[0]
    if latent.ndim != 4 or not latent.is_floating_point():
        raise ValueError(f"latent must be a float (T, H, W, C) tensor, got {latent.dtype} {tuple(latent.shape)}")
    if condition is not None:
        if condition.ndim == 4 and condition.shape[0] == 1:
            condition = condition[0]
        if condition.shape != latent.shape[1:]:
            raise ValueError(f"condition must be (H, W, C) = {tuple(latent.shape[1:])}, got {tuple(condition.shape)}")
    if not bool(torch.isfinite(latent).all()):
        raise ValueError("latent has NaN or infinite values")
    return latent, condition


def _text_of(embeddings: TextEmbeddings) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if not isinstance(embeddings, TextEmbeddings) or embeddings.tokens.shape[0] != 1:
        raise TypeError("encode_text_fn must return TextEmbeddings for one caption (batch of 1)")
    mask = embeddings.mask[0]
    length = int(mask.nonzero().max()) + 1 if bool(mask.any()) else 0
    if length == 0:
        raise ValueError("the text encoder returned no real tokens")
    return embeddings.tokens[0, :length], mask[:length], embeddings.pooled[0]


def _own(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU copy sharing memory with nothing (safetensors refuses shared storage)."""
    return tensor.detach().to("cpu").clone(memory_format=torch.contiguous_format)


def _encode_shard(
    items: Sequence[DataItem],
    encode_video_fn: Callable[[Any], torch.Tensor | EncodedVideo],
    encode_text_fn: Callable[[str], TextEmbeddings],
    progress: tqdm,
) -> tuple[dict[str, torch.Tensor], list[str], list[tuple[str, str]]]:
    tensors: dict[str, torch.Tensor] = {}
    keys: list[str] = []
    skipped: list[tuple[str, str]] = []
    for item in items:
        try:
            if item.caption is None or not item.caption.strip():
                raise SkipItem("missing caption")
            try:
                latent, condition = _latent_of(encode_video_fn(item.media))
            except SkipItem:
                raise
            except Exception as err:  # noqa: BLE001 - any failure of user code skips just this item
                raise SkipItem("video encoding failed", f"{type(err).__name__}: {err}") from err
            try:
                tokens, mask, pooled = _text_of(encode_text_fn(item.caption))
            except Exception as err:  # noqa: BLE001
                raise SkipItem("text encoding failed", f"{type(err).__name__}: {err}") from err
        except SkipItem as skip:
            logger.warning("skipping %s: %s", item.key, skip.reason)
            skipped.append((item.key, skip.reason))
        else:
            j = len(keys)
            tensors[f"{j}.latent"] = _own(latent)
            tensors[f"{j}.tokens"] = _own(tokens)
            tensors[f"{j}.mask"] = _own(mask.to(torch.bool))
            tensors[f"{j}.pooled"] = _own(pooled)
            if condition is not None:
                tensors[f"{j}.condition"] = _own(condition)
            keys.append(item.key)
        progress.update(1)
    return tensors, keys, skipped


class SkipItem(Exception):
    """Raised by an ``encode_video_fn`` for an item that must be left out (unreadable, too small, ...).

    ``category`` is what the summary counts ("too small"); ``detail`` says what was wrong with this item.
    """

    def __init__(self, category: str, detail: str | None = None):
        self.reason = category if detail is None else f"{category}: {detail}"
        super().__init__(self.reason)


def _shard_metadata(path: Path) -> dict[str, Any] | None:
    """The metadata of a finished shard, or None when the file is absent or unreadable."""
    if not path.is_file():
        return None
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
        return {
            "first_item": int(meta["first_item"]),
            "item_keys": json.loads(meta["item_keys"]),
            "keys": json.loads(meta["keys"]),
            "skipped": [tuple(s) for s in json.loads(meta["skipped"])],
            "shapes": [tuple(s) for s in json.loads(meta["shapes"])],
            "text_lengths": json.loads(meta["text_lengths"]),
            "conditions": json.loads(meta["conditions"]),
        }
    except Exception:  # noqa: BLE001 - a foreign or damaged file is simply rebuilt
        return None


def build_cache(
    items: Sequence[DataItem],
    encode_video_fn: Callable[[Any], torch.Tensor | EncodedVideo],
    encode_text_fn: Callable[[str], TextEmbeddings],
    cache_dir: str | Path,
    shard_size: int = 256,
) -> CacheSummary:
    """Encode ``items`` into safetensors shards under ``cache_dir``; resumable, manifest written last.

    Items are cut into consecutive groups of ``shard_size``; group k becomes ``shard_0000k``. A shard
    already on disk for exactly the same item keys is reused without encoding, so re-running after a
    crash continues where it stopped. An item whose caption is missing or blank, or whose encoding
    raises, is skipped with a warning and counted (reasons in the manifest and the returned summary).

    ``encode_video_fn(item.media)`` returns the (T, H, W, C) latent or an :class:`EncodedVideo`;
    ``encode_text_fn(caption)`` returns :class:`~kandinsky5.text.TextEmbeddings` of batch 1.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    keys = [item.key for item in items]
    duplicates = sorted(k for k, n in collections.Counter(keys).items() if n > 1)
    if duplicates:
        raise ValueError(f"item keys must be unique; repeated: {duplicates[:5]}")
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    (cache_dir / MANIFEST).unlink(missing_ok=True)  # the cache is incomplete until the new manifest lands

    num_shards = math.ceil(len(items) / shard_size)
    shards, samples, skipped = [], [], []
    written = reused = 0
    with tqdm(total=len(items), desc="encoding", unit="item", dynamic_ncols=True) as progress:
        for index in range(num_shards):
            group = items[index * shard_size : (index + 1) * shard_size]
            path = cache_dir / _shard_name(index)
            meta = _shard_metadata(path)
            if meta is not None and meta["first_item"] == index * shard_size and meta["item_keys"] == _keys_of(group):
                reused += 1
                progress.update(len(group))
            else:
                meta = _write_shard(path, index * shard_size, group, encode_video_fn, encode_text_fn, progress)
                written += 1
            shards.append({"file": path.name, "first_item": meta["first_item"], "num_samples": len(meta["keys"])})
            for j, key in enumerate(meta["keys"]):
                samples.append(
                    {
                        "key": key,
                        "shard": index,
                        "index": j,
                        "latent_shape": list(meta["shapes"][j]),
                        "text_length": meta["text_lengths"][j],
                        "condition": meta["conditions"][j],
                    }
                )
            skipped.extend({"key": key, "reason": reason} for key, reason in meta["skipped"])
            progress.set_postfix(skipped=len(skipped))

    manifest = {
        "format": CACHE_FORMAT,
        "version": CACHE_VERSION,
        "shard_size": shard_size,
        "num_items": len(items),
        "shards": shards,
        "samples": samples,
        "skipped": skipped,
    }
    atomic_write(cache_dir / MANIFEST, lambda tmp: write_json_durable(tmp, manifest))
    summary = CacheSummary(
        num_samples=len(samples),
        num_skipped=len(skipped),
        skipped_reasons=dict(collections.Counter(_reason_category(s["reason"]) for s in skipped)),
        shards_written=written,
        shards_reused=reused,
    )
    if skipped:
        logger.warning(
            "latent cache %s: skipped %d of %d items %s", cache_dir, len(skipped), len(items), summary.skipped_reasons
        )
    return summary


def _keys_of(items: Sequence[DataItem]) -> list[str]:
    return [item.key for item in items]


def _write_shard(
    path: Path,
    first_item: int,
    group: Sequence[DataItem],
    encode_video_fn: Callable,
    encode_text_fn: Callable,
    progress: tqdm,
) -> dict[str, Any]:
    tensors, keys, skipped = _encode_shard(group, encode_video_fn, encode_text_fn, progress)
    meta = {
        "first_item": first_item,
        "item_keys": _keys_of(group),
        "keys": keys,
        "skipped": skipped,
        "shapes": [tuple(tensors[f"{j}.latent"].shape) for j in range(len(keys))],
        "text_lengths": [int(tensors[f"{j}.tokens"].shape[0]) for j in range(len(keys))],
        "conditions": [f"{j}.condition" in tensors for j in range(len(keys))],
    }
    header = {name: value if isinstance(value, str) else json.dumps(value) for name, value in meta.items()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=header))
    return meta


# --------------------------------------------------------------------------------------------------
# Reading the cache
# --------------------------------------------------------------------------------------------------


def read_manifest(cache_dir: str | Path) -> dict[str, Any]:
    """The manifest of a complete cache; raises :class:`CacheError` saying how to complete it."""
    path = Path(cache_dir) / MANIFEST
    if not path.is_file():
        raise CacheError(
            f"no complete latent cache in {cache_dir} ({MANIFEST} is missing); build it with "
            "kandinsky5.train.data.build_cache (it resumes an interrupted build) or set data_dir in the config"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CacheError(f"{path}: corrupt manifest ({err}); delete it and run build_cache again") from None
    if manifest.get("format") != CACHE_FORMAT or manifest.get("version") != CACHE_VERSION:
        raise CacheError(f"{path}: not a version-{CACHE_VERSION} {CACHE_FORMAT} manifest; rebuild the cache")
    return manifest


class LatentDataset:
    """Random access to the samples of a complete latent cache (shards are memory-mapped on demand)."""

    def __init__(self, cache_dir: str | Path, max_open_shards: int = 8):
        self.cache_dir = Path(cache_dir)
        self.manifest = read_manifest(self.cache_dir)
        self.samples = self.manifest["samples"]
        self.shard_files = [self.cache_dir / s["file"] for s in self.manifest["shards"]]
        missing = [p.name for p in self.shard_files if not p.is_file()]
        if missing:
            raise CacheError(f"{self.cache_dir}: shards listed in the manifest are missing: {missing[:5]}; rebuild")
        if not self.samples:
            raise CacheError(f"{self.cache_dir}: the cache holds no samples (all {self.num_skipped} items skipped)")
        self._open: collections.OrderedDict[int, Any] = collections.OrderedDict()
        self._max_open = max_open_shards

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def num_skipped(self) -> int:
        return len(self.manifest["skipped"])

    def summary(self) -> CacheSummary:
        reasons = collections.Counter(_reason_category(s["reason"]) for s in self.manifest["skipped"])
        return CacheSummary(num_samples=len(self.samples), num_skipped=self.num_skipped, skipped_reasons=dict(reasons))

    def bucket_keys(self) -> list[tuple]:
        """Per sample, what must match inside a batch: the latent shape and whether it has a condition."""
        return [(*s["latent_shape"], bool(s["condition"])) for s in self.samples]

    def _shard(self, index: int):
        if index in self._open:
            self._open.move_to_end(index)
            return self._open[index]
        handle = safe_open(self.shard_files[index], framework="pt")
        self._open[index] = handle
        if len(self._open) > self._max_open:
            self._open.popitem(last=False)
        return handle

    def __getitem__(self, i: int) -> LatentSample:
        entry = self.samples[i]
        f, j = self._shard(entry["shard"]), entry["index"]
        return LatentSample(
            key=entry["key"],
            latent=f.get_tensor(f"{j}.latent"),
            tokens=f.get_tensor(f"{j}.tokens"),
            mask=f.get_tensor(f"{j}.mask"),
            pooled=f.get_tensor(f"{j}.pooled"),
            condition=f.get_tensor(f"{j}.condition") if entry["condition"] else None,
        )


def collate(samples: Sequence[LatentSample]) -> LatentBatch:
    """Stack equal-shape samples; captions are right-padded with zeros (mask False) to the longest."""
    shapes = {tuple(s.latent.shape) for s in samples}
    if len(shapes) != 1:
        raise ValueError(f"a batch needs one latent shape, got {sorted(shapes)}")
    if len({s.condition is None for s in samples}) != 1:
        raise ValueError("a batch cannot mix samples with and without a condition latent")
    length = max(s.tokens.shape[0] for s in samples)
    tokens = torch.zeros(len(samples), length, samples[0].tokens.shape[1], dtype=samples[0].tokens.dtype)
    mask = torch.zeros(len(samples), length, dtype=torch.bool)
    for b, s in enumerate(samples):
        tokens[b, : s.tokens.shape[0]] = s.tokens
        mask[b, : s.mask.shape[0]] = s.mask
    return LatentBatch(
        keys=tuple(s.key for s in samples),
        latent=torch.stack([s.latent for s in samples]),
        tokens=tokens,
        mask=mask,
        pooled=torch.stack([s.pooled for s in samples]),
        condition=None if samples[0].condition is None else torch.stack([s.condition for s in samples]),
    )


# --------------------------------------------------------------------------------------------------
# Sampling order
# --------------------------------------------------------------------------------------------------


class BucketSampler:
    """Batches of samples that share a bucket key, in an order fixed by ``(seed, epoch)``.

    Each epoch: shuffle the samples of every bucket, cut them into batches of ``batch_size`` (a
    bucket's last batch may be smaller unless ``drop_last``), then shuffle the batches of all buckets
    together. The state is ``(epoch, position)``: the number of batches already taken this epoch.
    """

    def __init__(self, bucket_keys: Sequence[Hashable], batch_size: int, seed: int, drop_last: bool = False):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size, self.seed, self.drop_last = batch_size, seed, drop_last
        buckets: dict[Hashable, list[int]] = {}
        for i, key in enumerate(bucket_keys):
            buckets.setdefault(key, []).append(i)
        self._buckets = [buckets[key] for key in sorted(buckets, key=repr)]  # order independent of input order
        if not self.epoch_batches(0):
            raise ValueError(f"no bucket holds {batch_size} samples; lower batch_size or set drop_last=False")
        self.epoch, self.position = 0, 0
        self._batches = self.epoch_batches(0)

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """All batches of one epoch, in order (the same on every call and in every process)."""
        rng = np.random.default_rng([self.seed, epoch])
        batches = []
        for members in self._buckets:
            order = [members[k] for k in rng.permutation(len(members))]
            for start in range(0, len(order), self.batch_size):
                batch = order[start : start + self.batch_size]
                if len(batch) == self.batch_size or not self.drop_last:
                    batches.append(batch)
        return [batches[k] for k in rng.permutation(len(batches))]

    def next_batch(self) -> list[int]:
        """The next batch of sample indices; moves to the next epoch when this one is used up."""
        if self.position >= len(self._batches):
            self.epoch, self.position = self.epoch + 1, 0
            self._batches = self.epoch_batches(self.epoch)
        batch = self._batches[self.position]
        self.position += 1
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._batches = self.epoch_batches(self.epoch)


def nearest_bucket(height: int, width: int, buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The bucket (height, width) whose aspect ratio is closest to ``height / width`` (ties: larger area).

    Media are then resized to cover the bucket and centre-cropped to it.
    """
    if not buckets:
        raise ValueError("buckets is empty")
    aspect = math.log(height / width)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - aspect), -b[0] * b[1]))
