"""TrainConfig validation and loading from TOML / YAML."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from train_helpers import TINY_DIT, tiny_config, write_toml

from kandinsky5.config import DiTConfig
from kandinsky5.train.config import ConfigError, TrainConfig, load_config


def test_toml_with_a_model_table_gives_a_dit_config(tmp_path: Path):
    path = write_toml(tmp_path / "c.toml", {"model": TINY_DIT, "init": "random", "betas": [0.9, 0.95], "lr": 1})
    config = load_config(path)
    assert isinstance(config.model, DiTConfig) and config.model.axes_dims == (4, 6, 6)
    assert config.betas == (0.9, 0.95) and config.lr == 1.0 and isinstance(config.lr, float)
    assert config.resolved_rope_scale == (1.0, 1.0, 1.0) and config.resolved_shift == 1.0


def test_a_variant_name_brings_its_shift_and_rope_scale(tmp_path: Path):
    config = load_config(write_toml(tmp_path / "c.toml", {"model": "video-lite-5s-sft"}))
    assert config.dit_config == config.variant.dit
    assert config.resolved_shift == config.variant.sampling.shift
    assert config.resolved_rope_scale == config.variant.sampling.rope_scale
    assert load_config(tmp_path / "c.toml", timestep_shift=3.0).resolved_shift == 3.0


def test_unknown_keys_are_all_listed_before_anything_else(tmp_path: Path):
    path = write_toml(tmp_path / "c.toml", {"model": "nope", "learning_rate": 1e-4, "batchsize": 2, "zzz": 1})
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert "'learning_rate'" in message and "'batchsize'" in message and "'zzz'" in message
    assert "did you mean 'batch_size'" in message
    assert "unknown variant" not in message  # reported first, alone


def test_bad_values_name_the_field_and_the_fix(tmp_path: Path):
    path = write_toml(tmp_path / "c.toml", {"model": TINY_DIT, "init": "random", "batch_size": 0, "lr": -1.0})
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "batch_size: must be >= 1, got 0" in str(err.value)
    assert "lr: must be > 0" in str(err.value)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"batch_size": "4"}, "batch_size: expected an integer"),
        ({"gradient_checkpointing": 1}, "gradient_checkpointing: expected true or false"),
        ({"betas": [0.9]}, "betas: expected a list of 2 values"),
        ({"lr_schedule": "linear"}, "lr_schedule: must be one of 'constant', 'cosine'"),
        ({"dtype": "fp8"}, "dtype: must be one of float32, bfloat16"),
        ({"max_frames": 10}, "max_frames: must be 4k+1"),
        ({"buckets": [[500, 512]]}, "buckets: sizes must be positive multiples of 16"),
        ({"model": "video-lite-5s-sf"}, "did you mean 'video-lite-5s-sft'"),
        ({"model": {**TINY_DIT, "depth": 3}}, "unknown DiTConfig fields ['depth']"),
        ({"model": {**TINY_DIT, "model_dim": 30}}, "model: model_dim 30 must be a multiple of head_dim"),
        ({"init": "pretrained"}, 'set init = "random" or give weights'),
        ({"weights": "w.safetensors"}, 'weights: only used with init = "pretrained"'),
    ],
)
def test_each_bad_field_is_explained(tmp_path: Path, change: dict, message: str):
    with pytest.raises(ConfigError) as err:
        tiny_config(tmp_path, **change)
    assert message in str(err.value)


def test_config_is_frozen_and_round_trips_through_to_dict(tmp_path: Path):
    config = tiny_config(tmp_path, buckets=[[512, 768]], betas=[0.9, 0.99])
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.lr = 1.0  # type: ignore[misc]
    assert TrainConfig(**config.to_dict()) == config
    assert config.buckets == ((512, 768),)


def test_yaml_is_read_when_pyyaml_is_present(tmp_path: Path):
    pytest.importorskip("yaml")
    path = tmp_path / "c.yaml"
    path.write_text("model: video-lite-5s-sft\nbatch_size: 2\nbetas: [0.9, 0.95]\n", encoding="utf-8")
    config = load_config(path)
    assert (config.model, config.batch_size, config.betas) == ("video-lite-5s-sft", 2, (0.9, 0.95))
    path.write_text("model: video-lite-5s-sft\nbatch_sise: 2\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="batch_sise"):
        load_config(path)


def test_file_problems(tmp_path: Path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml")
    (tmp_path / "c.json").write_text("{}")
    with pytest.raises(ConfigError, match="use .toml"):
        load_config(tmp_path / "c.json")
    (tmp_path / "bad.toml").write_text("model = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(tmp_path / "bad.toml")
    write_toml(tmp_path / "empty.toml", {"lr": 1e-4})
    with pytest.raises(ConfigError, match='missing "model"'):
        load_config(tmp_path / "empty.toml")
