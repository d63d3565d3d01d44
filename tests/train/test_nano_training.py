"""nano trains like any variant: clips of its world → its own VAE and MiniLM → a few CPU steps → final/."""

from __future__ import annotations

import math
from pathlib import Path

import av
import torch

from kandinsky5.api import load_transformer
from kandinsky5.nano import write_dataset
from kandinsky5.train import TrainConfig, train
from kandinsky5.train.data import LatentDataset
from kandinsky5.train.trainer import read_metrics
from kandinsky5.variants import NANO_DIT


def test_a_tiny_nano_fine_tune_runs_end_to_end(tmp_path: Path):
    write_dataset(tmp_path / "data", 6, seed=0)
    config = TrainConfig(
        model="nano",  # init = "pretrained": the weights in the package, nothing downloaded
        data_dir=str(tmp_path / "data"),
        cache_dir=str(tmp_path / "cache"),
        output_dir=str(tmp_path / "run"),
        batch_size=2,
        lr=1e-4,
        max_steps=3,
        log_every=1,
        checkpoint_every=2,
        device="cpu",
        validation_prompts=("a red circle moves to the right",),  # rendered with nano's VAE and MiniLM
        validation_steps=2,
        validation_size=(64, 64),
        validation_num_frames=5,
    )
    result = train(config)

    assert result.step == 3 and math.isfinite(result.loss)
    assert result.skipped.num_samples == 6 and result.skipped.num_skipped == 0
    latent = LatentDataset(config.cache_dir)[0]
    assert latent.latent.shape == (5, 16, 16, 16)  # 17x64x64 pixels, nano's VAE: 4x time, 4x space
    assert latent.tokens.shape[-1] == latent.pooled.shape[-1] == 384  # MiniLM
    rows = read_metrics(config.output_dir)
    assert [row["step"] for row in rows] == ["1", "2", "3"]
    assert all(math.isfinite(float(row["loss"])) for row in rows)
    checkpoints = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert checkpoints == ["step_0000002", "step_0000003"]

    clip = tmp_path / "run" / "validation" / "step_0000003" / "00_a_red_circle_moves_to_the_right.mp4"
    with av.open(str(clip)) as container:
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    assert len(frames) == 5 and frames[0].shape == (64, 64, 3)

    final = tmp_path / "run" / "final"
    dit = load_transformer(final / "diffusers", device="cpu")
    assert dit.config == NANO_DIT
    official = load_transformer(final / "official" / "model.safetensors", "nano", device="cpu")
    for (name, a), (_, b) in zip(dit.state_dict().items(), official.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
