"""Checkpoint round trip, keep-last-K, incomplete folders and a save that fails midway."""

from __future__ import annotations

import errno
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from train_helpers import tiny_config

from kandinsky5.checkpoint import load_dit
from kandinsky5.train import checkpointing
from kandinsky5.train.checkpointing import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from kandinsky5.train.trainer import build_model, build_optimizer, build_scheduler

CPU = torch.device("cpu")


def _trained(config, steps: int = 2):
    """Model, optimizer and scheduler after a few real AdamW steps (so every state tensor exists)."""
    torch.manual_seed(0)
    model = build_model(config, CPU)
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config)
    for _ in range(steps):
        optimizer.zero_grad()
        sum(p.square().sum() for p in model.parameters()).backward()
        optimizer.step()
        scheduler.step()
    return model, optimizer, scheduler


def _save(config, step: int, model, optimizer, scheduler, **kwargs):
    return save_checkpoint(config.output_dir, step, model, optimizer, scheduler, **kwargs)


def test_round_trip_restores_model_optimizer_scheduler_and_rngs(tmp_path: Path):
    config = tiny_config(tmp_path, warmup_steps=5)
    model, optimizer, scheduler = _trained(config)
    noise = torch.Generator().manual_seed(5)
    noise.manual_seed(5), torch.randn(3, generator=noise)  # advance it a little
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    folder = _save(config, 2, model, optimizer, scheduler, generators={"noise": noise},
                   sampler={"epoch": 1, "position": 4}, extra={"last_loss": 0.5})  # fmt: skip
    expected_draws = (random.random(), np.random.rand(), torch.rand(1), torch.rand(1, generator=noise))
    assert folder == tmp_path / "run" / "checkpoints" / "step_0000002"
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["model.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json"]
    )
    assert not list(folder.glob("*.pt")) and not list(folder.glob("*.bin"))

    fresh = build_model(config, CPU, empty=True)
    fresh_optimizer = build_optimizer(fresh, config)
    fresh_scheduler = build_scheduler(fresh_optimizer, config)
    other = torch.Generator().manual_seed(99)
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    state = load_checkpoint(folder, fresh, fresh_optimizer, fresh_scheduler, generators={"noise": other})

    assert state["step"] == 2 and state["sampler"] == {"epoch": 1, "position": 4}
    assert state["extra"] == {"last_loss": 0.5}
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    saved, loaded = optimizer.state_dict(), fresh_optimizer.state_dict()
    assert saved["param_groups"] == loaded["param_groups"]
    for i, entry in saved["state"].items():
        for key, value in entry.items():
            assert torch.equal(value, loaded["state"][i][key]), (i, key)
    assert fresh_scheduler.state_dict() == scheduler.state_dict()
    assert fresh_scheduler.get_last_lr() == scheduler.get_last_lr()
    draws = (random.random(), np.random.rand(), torch.rand(1), torch.rand(1, generator=other))
    assert draws[:2] == expected_draws[:2]
    assert torch.equal(draws[2], expected_draws[2]) and torch.equal(draws[3], expected_draws[3])


def test_model_file_loads_as_a_plain_dit_checkpoint(tmp_path: Path):
    config = tiny_config(tmp_path)
    model, optimizer, scheduler = _trained(config, steps=1)
    folder = _save(config, 1, model, optimizer, scheduler)
    loaded = load_dit(folder / "model.safetensors", config.dit_config)
    assert all(
        torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values(), strict=True)
    )


def test_keep_last_k_and_latest(tmp_path: Path):
    config = tiny_config(tmp_path)
    model, optimizer, scheduler = _trained(config, steps=1)
    assert latest_checkpoint(config.output_dir) is None
    for step in (5, 10, 15, 20):
        _save(config, step, model, optimizer, scheduler, keep_last_k=2)
    assert [p.name for p in list_checkpoints(config.output_dir)] == ["step_0000015", "step_0000020"]
    assert latest_checkpoint(config.output_dir).name == "step_0000020"


def test_latest_skips_incomplete_folders_and_leftovers(tmp_path: Path):
    config = tiny_config(tmp_path)
    model, optimizer, scheduler = _trained(config, steps=1)
    good = _save(config, 10, model, optimizer, scheduler)
    root = good.parent
    # A folder without state.json, one with a truncated weight file, and an interrupted temp folder.
    (root / "step_0000030").mkdir()
    truncated = root / "step_0000020"
    truncated.mkdir()
    for item in good.iterdir():
        (truncated / item.name).write_bytes(item.read_bytes())
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    (root / ".tmp-step_0000040-abcd").mkdir()
    (root / "step_9").mkdir()  # not a step folder name
    assert latest_checkpoint(config.output_dir) == good
    with pytest.raises(ValueError, match="incomplete or damaged"):
        load_checkpoint(truncated, model)
    _save(config, 11, model, optimizer, scheduler)  # cleans the temp folder up
    assert not (root / ".tmp-step_0000040-abcd").exists()


def test_a_failing_save_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch):
    config = tiny_config(tmp_path)
    model, optimizer, scheduler = _trained(config, steps=1)
    previous = _save(config, 5, model, optimizer, scheduler, keep_last_k=1)
    before = {p.name: p.read_bytes() for p in previous.iterdir()}

    real_write = checkpointing.write_safetensors
    calls = []

    def disk_full_on_second_file(path: Path, tensors):
        calls.append(path.name)
        if len(calls) == 2:  # the model file was written; the disk fills up during the optimizer file
            with open(path, "wb") as f:
                f.write(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(path, tensors)

    monkeypatch.setattr(checkpointing, "write_safetensors", disk_full_on_second_file)
    with pytest.raises(OSError, match="No space left"):
        _save(config, 10, model, optimizer, scheduler, keep_last_k=1)
    assert calls == ["model.safetensors", "optimizer.safetensors"]
    assert latest_checkpoint(config.output_dir) == previous
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step_0000005"]  # no temp left
    assert {p.name: p.read_bytes() for p in previous.iterdir()} == before
    assert json.loads((previous / "state.json").read_text())["step"] == 5


def test_optimizer_mismatch_is_reported(tmp_path: Path):
    config = tiny_config(tmp_path)
    model, optimizer, scheduler = _trained(config, steps=1)
    folder = _save(config, 1, model, optimizer, scheduler)
    for p in list(model.parameters())[:3]:
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="optimizer was saved for other parameters"):
        load_checkpoint(folder, model, build_optimizer(model, config))
