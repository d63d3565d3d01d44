"""TensorBoard scalars beside metrics.csv, and one clear error when the package is missing."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from train_helpers import make_cache, tiny_config

from kandinsky5.train import train
from kandinsky5.train.config import ConfigError


def test_scalars_are_written_and_purged_on_resume(tmp_path: Path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    make_cache(tmp_path / "cache", n=4)
    train(tiny_config(tmp_path, tensorboard=True, max_steps=3, checkpoint_every=2))
    train(tiny_config(tmp_path, tensorboard=True, max_steps=5, checkpoint_every=2))  # resumes at step 2
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "train/it_per_s", "train/samples_per_s"} <= tags
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4, 5]  # step 3 of the first run purged


def test_a_missing_package_is_one_config_error(tmp_path: Path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name))
    with pytest.raises(ConfigError, match="tensorboard: the tensorboard package is not installed"):
        tiny_config(tmp_path, tensorboard=True)
