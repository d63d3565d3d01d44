"""Where a run's DiT, VAE and text encoders come from: the package for nano, the Hub for the others."""

from __future__ import annotations

from tests.tiny_components import save_tiny_flux_vae, save_tiny_hunyuan_vae

from kandinsky5.train.components import dit_source, vae_location, vae_spatial_factor
from kandinsky5.variants import get_variant, packaged_path


def test_nano_comes_from_the_package():
    nano = get_variant("nano")
    assert dit_source(nano) == packaged_path(nano)
    path, subfolder = vae_location(nano)
    assert (path, subfolder) == (str(packaged_path(nano) / "vae"), None)
    assert vae_spatial_factor(path, subfolder) == 4  # read from config.json alone


def test_official_variants_come_from_the_hub():
    lite = get_variant("video-lite-5s-sft")
    assert dit_source(lite) == "video-lite-5s-sft"  # load_transformer resolves the name to its Hub repo
    assert vae_location(lite) == (lite.vae_repo_id, "vae")


def test_a_process_that_does_not_decode_reads_the_factor_from_the_config(tmp_path):
    assert vae_spatial_factor(str(save_tiny_hunyuan_vae(tmp_path / "video")), "vae") == 8
    assert vae_spatial_factor(str(save_tiny_flux_vae(tmp_path / "image")), "vae") == 8  # no ratio in the config
