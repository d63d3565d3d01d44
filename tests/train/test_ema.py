"""EMA of the weights: the update rule, swapping in and out, checkpoints, exact resume and the export."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import make_cache, tiny_config

from kandinsky5.train import train
from kandinsky5.train.ema import EMA


def test_update_is_a_moving_average_and_applied_swaps_back():
    model = torch.nn.Linear(2, 1)
    frozen = torch.nn.Parameter(torch.zeros(1), requires_grad=False)
    model.register_parameter("frozen", frozen)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema = EMA(model, decay=0.75)
    assert set(ema.state_dict()) == {"weight", "bias"}  # trainable parameters only
    with torch.no_grad():
        model.weight.fill_(5.0)
    ema.update()
    assert torch.equal(ema.state_dict()["weight"], torch.full((1, 2), 2.0))  # 0.75·1 + 0.25·5
    with ema.applied():
        assert torch.equal(model.weight, torch.full((1, 2), 2.0))
    assert torch.equal(model.weight, torch.full((1, 2), 5.0))
    with pytest.raises(ValueError, match="decay must be in"):
        EMA(model, decay=1.0)


def test_ema_is_checkpointed_resumed_exactly_and_exported(tmp_path: Path):
    make_cache(tmp_path / "cache", n=4)
    settings = dict(ema_decay=0.9, max_steps=4, checkpoint_every=2)
    full = train(tiny_config(tmp_path, output_dir=str(tmp_path / "full"), **settings))
    train(tiny_config(tmp_path, output_dir=str(tmp_path / "split"), **{**settings, "max_steps": 2}))
    split = train(tiny_config(tmp_path, output_dir=str(tmp_path / "split"), **settings))
    assert split.loss == full.loss

    ema = load_file(full.checkpoint / "ema.safetensors")
    resumed_ema = load_file(split.checkpoint / "ema.safetensors")
    assert ema.keys() == resumed_ema.keys()
    assert all(torch.equal(ema[k], resumed_ema[k]) for k in ema)  # bit for bit after a resume

    exported = load_file(full.output_dir / "final" / "official" / "model.safetensors")
    trained = load_file(full.checkpoint / "model.safetensors")
    assert all(torch.equal(exported[k], ema[k]) for k in ema)  # the export holds the EMA weights
    assert any(not torch.equal(trained[k], ema[k]) for k in ema)
