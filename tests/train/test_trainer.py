"""The training loop: learning, schedule, metrics, gradient checkpointing, I2V batches and the entry point."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from train_helpers import TINY_DIT, fake_text, fake_video, make_cache, make_items, tiny_config, write_toml

from kandinsky5.train import CacheError, main_train, train
from kandinsky5.train.checkpointing import load_checkpoint
from kandinsky5.train.data import DataItem, EncodedVideo, LatentDataset, SkipItem, build_cache, collate
from kandinsky5.train.trainer import build_model, build_optimizer, lr_factor, micro_batch_loss, read_metrics

CPU = torch.device("cpu")


def _held_out_loss(model, config) -> float:
    """Mean loss over the whole data set with fixed timesteps and noise (the same for every model)."""
    dataset = LatentDataset(config.cache_dir)
    batch = collate([dataset[i] for i in range(len(dataset))])
    generator = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        return sum(micro_batch_loss(model, batch, generator, config, CPU).item() for _ in range(8)) / 8


@pytest.mark.parametrize("prediction", ["velocity", "sample"])
def test_loss_decreases_on_a_tiny_latent_set(tmp_path: Path, prediction: str):
    make_cache(tmp_path / "cache", n=8)  # 8 random latents, fixed text embeddings
    model = {**TINY_DIT, "prediction": prediction}
    config = tiny_config(tmp_path, model=model, max_steps=60, lr=3e-3, checkpoint_every=60)
    result = train(config)
    assert result.step == 60 and result.checkpoint.name == "step_0000060"
    assert result.skipped.num_skipped == 0

    torch.manual_seed(config.seed)
    initial = build_model(config, CPU)  # the same seeded initialisation the run started from
    trained = build_model(config, CPU, empty=True)
    load_checkpoint(result.checkpoint, trained, restore_rng=False)
    before, after = _held_out_loss(initial, config), _held_out_loss(trained, config)
    assert after < 0.9 * before, (before, after)

    rows = read_metrics(config.output_dir)
    assert [int(r["step"]) for r in rows] == list(range(1, 61))
    assert float(rows[-1]["loss"]) == result.loss
    assert all(float(r["samples_per_s"]) > 0 and float(r["grad_norm"]) > 0 for r in rows)


def test_lr_schedule_warmup_then_cosine(tmp_path: Path):
    config = tiny_config(tmp_path, warmup_steps=4, max_steps=14, lr_schedule="cosine", min_lr_ratio=0.1)
    factors = [lr_factor(step, config) for step in range(14)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert (
        factors[4] == 1.0
        and factors[9] == pytest.approx(0.55)
        and factors[13] == pytest.approx(0.1 + 0.9 * 0.0245, abs=1e-3)
    )
    assert all(a >= b for a, b in zip(factors[3:-1], factors[4:], strict=True))
    constant = tiny_config(tmp_path, warmup_steps=0)
    assert {lr_factor(step, constant) for step in range(20)} == {1.0}


def test_cpu_training_uses_the_fused_adamw(tmp_path: Path):
    config = tiny_config(tmp_path)
    optimizer = build_optimizer(build_model(config, torch.device("cpu")), config)
    assert all(group["fused"] for group in optimizer.param_groups)
    assert [group["weight_decay"] for group in optimizer.param_groups] == [config.weight_decay, 0.0]


def test_metrics_rows_average_the_window(tmp_path: Path):
    make_cache(tmp_path / "cache", n=4)
    every = train(tiny_config(tmp_path, output_dir=str(tmp_path / "a"), max_steps=6, log_every=1))
    windowed = train(tiny_config(tmp_path, output_dir=str(tmp_path / "b"), max_steps=6, log_every=4))
    assert every.loss == windowed.loss
    per_step = [float(r["loss"]) for r in read_metrics(tmp_path / "a")]
    rows = read_metrics(tmp_path / "b")
    assert [r["step"] for r in rows] == ["4", "6"]  # every 4 steps, and the last step
    assert float(rows[0]["loss"]) == pytest.approx(sum(per_step[:4]) / 4)
    assert float(rows[1]["loss"]) == pytest.approx(sum(per_step[4:]) / 2)


def test_gradient_checkpointing_and_accumulation_keep_the_numbers(tmp_path: Path):
    make_cache(tmp_path / "cache", n=4)
    plain = train(tiny_config(tmp_path, output_dir=str(tmp_path / "a"), max_steps=3, grad_accum=2))
    recomputed = train(
        tiny_config(tmp_path, output_dir=str(tmp_path / "b"), max_steps=3, grad_accum=2, gradient_checkpointing=True)
    )
    assert recomputed.loss == pytest.approx(plain.loss, rel=1e-6)


def test_i2v_samples_train_with_a_clean_first_frame(tmp_path: Path):
    def video(seed: int) -> EncodedVideo:
        latent = fake_video(seed)
        return EncodedVideo(latent, condition=latent[0])

    build_cache(make_items(4), video, fake_text, tmp_path / "cache")
    config = tiny_config(tmp_path, max_steps=2)
    dataset = LatentDataset(config.cache_dir)
    batch = collate([dataset[0], dataset[1]])
    torch.manual_seed(0)
    model = build_model(config, CPU)
    seen = {}

    def record(_module, args) -> None:
        seen["x"] = args[0].clone()

    model.register_forward_pre_hook(record)
    loss = micro_batch_loss(model, batch, torch.Generator().manual_seed(0), config, CPU)
    x = seen["x"]  # (B, T, H, W, 2C + 1) = [x_t | condition | mask]
    assert torch.equal(x[:, 0, ..., :4], batch.latent[:, 0])  # frame 0 is the clean latent
    assert bool((x[:, 0, ..., -1] == 1).all()) and bool((x[:, 1:, ..., -1] == 0).all())
    assert torch.isfinite(loss)
    assert train(config).step == 2


def test_missing_cache_is_reported_before_any_model_loads(tmp_path: Path):
    with pytest.raises(CacheError, match="set data_dir"):
        train(tiny_config(tmp_path))


def test_main_train_runs_a_toml_config(tmp_path: Path):
    make_cache(tmp_path / "cache", n=4)
    path = write_toml(
        tmp_path / "train.toml",
        {
            "model": TINY_DIT,
            "init": "random",
            "cache_dir": str(tmp_path / "cache"),
            "output_dir": str(tmp_path / "run"),
            "max_steps": 2,
            "batch_size": 2,
            "device": "cpu",
        },
    )
    lines: list[str] = []
    assert main_train(path, log=lines.append) == 0
    assert lines[0].startswith("trained 2 steps; last loss ")
    assert (tmp_path / "run" / "checkpoints" / "step_0000002" / "state.json").is_file()
    assert (tmp_path / "run" / "config.json").is_file()


def test_main_train_ends_with_the_bad_data_summary(tmp_path: Path):
    items = make_items(5)
    items[1] = DataItem("no-caption", 1, None)

    def video(seed: int) -> torch.Tensor:
        if seed == 3:
            raise SkipItem("too small", "3 frames")
        return fake_video(seed)

    build_cache(items, video, fake_text, tmp_path / "cache")
    path = write_toml(
        tmp_path / "train.toml",
        {"model": TINY_DIT, "init": "random", "cache_dir": str(tmp_path / "cache"),
         "output_dir": str(tmp_path / "run"), "max_steps": 1, "device": "cpu"},
    )  # fmt: skip
    lines: list[str] = []
    assert main_train(path, log=lines.append) == 0
    assert lines[-1] == "data: 3 samples used, 2 items skipped (missing caption: 1, too small: 1)"
