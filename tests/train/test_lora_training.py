"""LoRA runs (adapters only, exact resume, diffusers-format export) and the export of a full fine-tune."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from train_helpers import make_cache, tiny_config

from kandinsky5.api import load_transformer
from kandinsky5.checkpoint import load_dit
from kandinsky5.lora import apply_loras, read_lora
from kandinsky5.train import train
from kandinsky5.train.checkpointing import load_checkpoint
from kandinsky5.train.config import ConfigError
from kandinsky5.train.data import LatentDataset, collate
from kandinsky5.train.trainer import build_model, micro_batch_loss, read_metrics

CPU = torch.device("cpu")


def _held_out_loss(model, config) -> float:
    """Mean loss over the data set with fixed timesteps and noise (the same draws for every model)."""
    dataset = LatentDataset(config.cache_dir)
    batch = collate([dataset[i] for i in range(len(dataset))])
    generator = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        return sum(micro_batch_loss(model, batch, generator, config, CPU).item() for _ in range(8)) / 8


def _restored(config, checkpoint):
    """The run's model at ``checkpoint``: the seeded base rebuilt, the adapters loaded."""
    torch.manual_seed(config.seed)
    model = build_model(config, CPU, empty=True)
    load_checkpoint(checkpoint, model, restore_rng=False)
    return model


def test_lora_run_lowers_the_loss_and_trains_only_the_adapters(tmp_path: Path):
    make_cache(tmp_path / "cache", n=8)
    config = tiny_config(tmp_path, lora_rank=4, lora_alpha=8, lr=1e-2, max_steps=40, checkpoint_every=40)
    result = train(config)
    torch.manual_seed(config.seed)
    initial = build_model(config, CPU)  # the seeded base with zero-initialised B: the base model
    trained = _restored(config, result.checkpoint)
    before, after = _held_out_loss(initial, config), _held_out_loss(trained, config)
    assert after < 0.9 * before, (before, after)

    with safe_open(result.checkpoint / "model.safetensors", framework="pt") as f:
        keys = list(f.keys())
    assert keys and all(".lora_A." in k or ".lora_B." in k for k in keys)  # the frozen base is not saved
    frozen = {n: p for n, p in trained.named_parameters() if not p.requires_grad}
    base = {n: p for n, p in initial.named_parameters() if not p.requires_grad}
    assert frozen.keys() == base.keys() and all(torch.equal(frozen[n], base[n]) for n in frozen)


def test_lora_resume_matches_one_long_run(tmp_path: Path):
    make_cache(tmp_path / "cache", n=5)

    def run(name: str, steps: int):
        return train(tiny_config(tmp_path, output_dir=str(tmp_path / name), max_steps=steps, checkpoint_every=3,
                                 lora_rank=2, lora_targets=["self_attention", "feed_forward.in_layer"]))  # fmt: skip

    full = run("full", 8)
    run("split", 4)
    split = run("split", 8)
    assert split.loss == full.loss
    losses = [[(r["step"], r["loss"]) for r in read_metrics(tmp_path / name)] for name in ("full", "split")]
    assert losses[0] == losses[1] and len(losses[0]) == 8


def test_lora_export_reproduces_the_trained_model(tmp_path: Path):
    make_cache(tmp_path / "cache", n=4)
    config = tiny_config(tmp_path, lora_rank=4, lora_alpha=2, lr=1e-2, max_steps=6)
    result = train(config)
    path = Path(config.output_dir) / "final" / "lora.safetensors"
    assert path.is_file() and not (Path(config.output_dir) / "final" / "official").exists()

    trained = _restored(config, result.checkpoint).eval()
    torch.manual_seed(config.seed)
    base = build_model(config, CPU).eval()  # zero B: behaves as the plain base
    dataset = LatentDataset(config.cache_dir)
    batch = collate([dataset[0], dataset[1]])
    x = torch.cat([batch.latent, torch.zeros_like(batch.latent), torch.zeros_like(batch.latent[..., :1])], -1)
    args = (x, batch.tokens, batch.pooled, torch.tensor([300.0, 700.0]), batch.mask)
    with torch.no_grad():
        expected, plain = trained(*args), base(*args)
        with apply_loras(base, [(read_lora(path, config.dit_config), 1.0)]):
            adapted = base(*args)
    assert (expected - plain).abs().max() > 1e-4
    torch.testing.assert_close(adapted, expected, rtol=0, atol=1e-5)


def test_full_fine_tune_is_exported_in_both_layouts(tmp_path: Path):
    make_cache(tmp_path / "cache", n=4)
    config = tiny_config(tmp_path, max_steps=3)
    result = train(config)
    torch.manual_seed(0)
    trained = build_model(config, CPU, empty=True)
    load_checkpoint(result.checkpoint, trained, restore_rng=False)
    final = Path(config.output_dir) / "final"
    from_diffusers = load_transformer(final / "diffusers", device="cpu", dtype="float32")  # config.json: no variant
    official = load_dit(final / "official" / "model.safetensors", config.dit_config)
    assert from_diffusers.config == config.dit_config
    for model in (from_diffusers, official):
        for (name, a), b in zip(trained.state_dict().items(), model.state_dict().values(), strict=True):
            assert torch.equal(a, b), name


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"lora_rank": -1}, "lora_rank: must be >= 0"),
        ({"lora_alpha": 4.0}, "lora_alpha: only used with lora_rank > 0"),
        ({"lora_targets": ["feed_forward"]}, "lora_targets: only used with lora_rank > 0"),
        ({"lora_rank": 4, "lora_targets": ["mlp"]}, "lora_targets: ['mlp'] select no layer"),
        ({"lora_rank": 4, "lora_targets": []}, "lora_targets: give at least one layer name"),
        ({"lora_rank": 4, "lora_alpha": 0.0}, "lora_alpha: must be > 0"),
    ],
)
def test_lora_fields_are_checked(tmp_path: Path, change: dict, message: str):
    with pytest.raises(ConfigError) as err:
        tiny_config(tmp_path, **change)
    assert message in str(err.value)
