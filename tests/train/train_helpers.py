"""Tiny training set-ups shared by the training tests: a small DiT, fake encoders, a latent cache, TOML."""

from __future__ import annotations

from pathlib import Path

import torch

from kandinsky5.text import TextEmbeddings
from kandinsky5.train.config import TrainConfig
from kandinsky5.train.data import DataItem, build_cache

TEXT_DIM, POOLED_DIM, CHANNELS = 24, 12, 4
LATENT_SHAPE = (2, 4, 4, CHANNELS)  # (T, H, W, C)

# model_dim 32 = 2 heads of 16 (4 + 6 + 6 RoPE dims); one text block and two visual blocks.
TINY_DIT = dict(
    model_dim=32,
    ff_dim=64,
    time_dim=16,
    num_text_blocks=1,
    num_visual_blocks=2,
    axes_dims=[4, 6, 6],
    patch_size=[1, 2, 2],
    in_visual_dim=CHANNELS,
    out_visual_dim=CHANNELS,
    in_text_dim=TEXT_DIM,
    in_text_dim2=POOLED_DIM,
    visual_cond=True,
)


def fake_video(seed: int) -> torch.Tensor:
    """A deterministic random latent per item (the 'media' of a fake item is its seed)."""
    return torch.randn(LATENT_SHAPE, generator=torch.Generator().manual_seed(seed))


def fake_text(caption: str, padded_length: int = 8) -> TextEmbeddings:
    """Fixed embeddings: right-padded tokens with as many real tokens as the caption has words."""
    gen = torch.Generator().manual_seed(1234)
    tokens = torch.randn(1, padded_length, TEXT_DIM, generator=gen)
    mask = torch.zeros(1, padded_length, dtype=torch.bool)
    mask[0, : min(padded_length, len(caption.split()))] = True
    return TextEmbeddings(tokens=tokens, mask=mask, pooled=torch.randn(1, POOLED_DIM, generator=gen))


def make_items(n: int) -> list[DataItem]:
    captions = ["a red fox", "a cat sits on a mat", "waves crash on rocks", "hands knead dough"]
    return [DataItem(key=f"item{i:03d}", media=i, caption=captions[i % len(captions)]) for i in range(n)]


def make_cache(cache_dir: Path, n: int = 8, shard_size: int = 3):
    return build_cache(make_items(n), fake_video, fake_text, cache_dir, shard_size=shard_size)


def tiny_config(root: Path, **overrides) -> TrainConfig:
    values = dict(
        model=dict(TINY_DIT),
        init="random",
        cache_dir=str(root / "cache"),
        output_dir=str(root / "run"),
        batch_size=2,
        lr=1e-3,
        max_steps=10,
        log_every=1,
        checkpoint_every=5,
        keep_last_k=2,
        warmup_steps=2,
        device="cpu",
    )
    values.update(overrides)
    return TrainConfig(**values)


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


def write_toml(path: Path, values: dict) -> Path:
    """A minimal TOML writer for flat configs with one optional [model] table."""
    lines = [f"{key} = {_toml_value(v)}" for key, v in values.items() if not isinstance(v, dict)]
    for key, table in ((k, v) for k, v in values.items() if isinstance(v, dict)):
        lines += ["", f"[{key}]", *(f"{k} = {_toml_value(v)}" for k, v in table.items())]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
