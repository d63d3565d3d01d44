"""Validation clips: the prompts rendered to mp4 through the generation pipeline with tiny components."""

from __future__ import annotations

from pathlib import Path

import av
import pytest
import torch
from tests.tiny_components import (
    CLIP_HIDDEN,
    QWEN_HIDDEN,
    VAE_LATENT_CHANNELS,
    save_tiny_clip,
    save_tiny_hunyuan_vae,
    save_tiny_qwen,
)
from train_helpers import TINY_DIT, make_items

from kandinsky5.text import TextEmbeddings
from kandinsky5.train import TrainConfig, train
from kandinsky5.train.config import ConfigError
from kandinsky5.train.data import build_cache
from kandinsky5.train.validation import clip_name

DIT = {**TINY_DIT, "in_text_dim": QWEN_HIDDEN, "in_text_dim2": CLIP_HIDDEN}
DIT |= {"in_visual_dim": VAE_LATENT_CHANNELS, "out_visual_dim": VAE_LATENT_CHANNELS}


def _text(caption: str) -> TextEmbeddings:
    gen = torch.Generator().manual_seed(len(caption))
    tokens = torch.randn(1, 4, QWEN_HIDDEN, generator=gen)
    return TextEmbeddings(tokens, torch.ones(1, 4, dtype=torch.bool), torch.randn(1, CLIP_HIDDEN, generator=gen))


def _video(seed: int) -> torch.Tensor:
    return torch.randn(2, 4, 4, VAE_LATENT_CHANNELS, generator=torch.Generator().manual_seed(seed))  # 5 × 32 × 32


def test_clips_are_rendered_at_intervals_and_after_the_last_step(tmp_path: Path):
    parts = tmp_path / "parts"
    save_tiny_qwen(parts / "qwen"), save_tiny_clip(parts / "clip"), save_tiny_hunyuan_vae(parts / "vae")
    build_cache(make_items(4), _video, _text, tmp_path / "cache")
    prompts = ("a red fox runs", "a cat sits on a mat")
    result = train(
        TrainConfig(
            model=DIT,
            init="random",
            cache_dir=str(tmp_path / "cache"),
            output_dir=str(tmp_path / "run"),
            batch_size=2,
            max_steps=3,
            checkpoint_every=3,
            device="cpu",
            ema_decay=0.5,
            validation_prompts=prompts,
            validation_every=2,
            validation_steps=2,
            validation_size=(32, 32),
            validation_num_frames=5,
            validation_vae=str(parts / "vae"),
            validation_text_encoders=(str(parts / "qwen"), str(parts / "clip")),
        )  # fmt: skip
    )
    assert result.step == 3
    root = tmp_path / "run" / "validation"
    assert sorted(p.name for p in root.iterdir()) == ["step_0000002", "step_0000003"]
    clip = root / "step_0000003" / clip_name(0, prompts[0])
    assert clip.name == "00_a_red_fox_runs.mp4" and (root / "step_0000003" / clip_name(1, prompts[1])).is_file()
    with av.open(str(clip)) as container:
        frames = list(container.decode(video=0))
    assert len(frames) == 5 and (frames[0].height, frames[0].width) == (32, 32)


def test_a_model_table_needs_named_components(tmp_path: Path):
    with pytest.raises(ConfigError, match="set validation_vae and validation_text_encoders"):
        TrainConfig(model=DIT, init="random", validation_prompts=("a fox",))
