"""DDP and FSDP2 with 2 CPU processes (gloo) against 1 process, and a sharded checkpoint resumed by 1."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import TINY_DIT, make_cache, tiny_config, write_toml

from kandinsky5.nano.recipe import train_dit
from kandinsky5.train import train
from kandinsky5.train.checkpointing import latest_checkpoint
from kandinsky5.train.config import ConfigError
from kandinsky5.train.distributed import Distributed, free_local_port, setup_distributed
from kandinsky5.train.trainer import read_metrics

WORKER = Path(__file__).with_name("run_distributed.py")
RUN = dict(batch_size=2, grad_accum=2, lr=1e-3, warmup_steps=2, log_every=1, ema_decay=0.9, max_grad_norm=0.5)


def _config(root: Path, name: str, **overrides) -> Path:
    values = dict(
        model=dict(TINY_DIT), init="random", cache_dir=str(root / "cache"), output_dir=str(root / name),
        checkpoint_every=3, max_steps=3, device="cpu", **RUN,
    )  # fmt: skip
    values.update(overrides)
    return write_toml(root / f"{name}.toml", values)


def _launch(configs: list[Path], world: int = 2) -> None:
    """What ``torchrun --nproc_per_node 2`` does, without its agent: one process per rank, env set."""
    port, logs, procs = free_local_port(), [], []
    for rank in range(world):
        env = {
            **os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1",
        }  # fmt: skip
        log = configs[0].with_suffix(f".rank{rank}.log")
        with log.open("wb") as f:
            procs.append(
                subprocess.Popen([sys.executable, str(WORKER), *map(str, configs)], env=env, stdout=f, stderr=f)
            )
        logs.append(log)
    deadline = time.monotonic() + 120
    for proc, log in zip(procs, logs, strict=True):
        try:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        assert proc.returncode == 0, log.read_text(errors="replace")[-3000:]


def _losses(output_dir: Path) -> list[float]:
    return [float(row["loss"]) for row in read_metrics(output_dir)]


def test_two_processes_follow_one_and_a_sharded_checkpoint_resumes_in_one(tmp_path: Path):
    make_cache(tmp_path / "cache", n=5)  # 5 samples, batches of 2: a batch of 1 leaves rank 1 an empty share
    _launch([_config(tmp_path, "ddp", distributed="ddp"), _config(tmp_path, "fsdp", distributed="fsdp")])
    reference = train(tiny_config(tmp_path, output_dir=str(tmp_path / "one"), max_steps=6, checkpoint_every=3, **RUN))
    expected = _losses(tmp_path / "one")

    for name in ("ddp", "fsdp"):
        assert _losses(tmp_path / name) == pytest.approx(expected[:3], rel=1e-5, abs=1e-6), name
        folder = latest_checkpoint(tmp_path / name)
        assert folder.name == "step_0000003" and (folder / "dcp" / ".metadata").is_file()

    # The FSDP checkpoint (two shards per tensor) resumes in a single process and carries on as one would.
    resumed = train(tiny_config(tmp_path, output_dir=str(tmp_path / "fsdp"), max_steps=6, checkpoint_every=3, **RUN))
    assert resumed.step == 6
    assert _losses(tmp_path / "fsdp") == pytest.approx(expected, rel=1e-5, abs=1e-6)
    final = load_file(tmp_path / "fsdp" / "final" / "official" / "model.safetensors")
    reference_final = load_file(reference.output_dir / "final" / "official" / "model.safetensors")
    for key, value in reference_final.items():  # the exported (EMA) weights
        torch.testing.assert_close(final[key], value, rtol=1e-4, atol=1e-5)


def test_world_size_and_kind_from_the_environment(tmp_path: Path, monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert setup_distributed(tiny_config(tmp_path, distributed="fsdp"), cpu) == Distributed()
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match='"none" but 2 processes'):
        setup_distributed(tiny_config(tmp_path, distributed="none"), cpu)
    share = [Distributed("ddp", rank, 3, rank).share(4) for rank in range(3)]
    assert share == [[0, 3], [1], [2]]
    assert Distributed("ddp", 1, 2, 1).loss_weight([1], 3) == pytest.approx(2 / 3)


def test_the_nano_recipe_spawns_ranks_that_follow_one_process(tmp_path: Path):
    make_cache(tmp_path / "cache", n=5)
    one = tiny_config(tmp_path, output_dir=str(tmp_path / "one"), max_steps=3, checkpoint_every=3, **RUN)
    assert train_dit(one, 1) == (3, tmp_path / "one" / "final" / "official" / "model.safetensors")
    step, weights = train_dit(dataclasses.replace(one, output_dir=str(tmp_path / "two")), 2)
    assert (step, weights) == (3, tmp_path / "two" / "final" / "official" / "model.safetensors")
    assert _losses(tmp_path / "two") == pytest.approx(_losses(tmp_path / "one"), rel=1e-5, abs=1e-6)
    trained = load_file(weights)
    for key, value in load_file(tmp_path / "one" / "final" / "official" / "model.safetensors").items():
        torch.testing.assert_close(trained[key], value, rtol=1e-4, atol=1e-5)
