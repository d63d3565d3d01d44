"""VAE wrappers on tiny random diffusers autoencoders, compared with direct diffusers calls."""

from __future__ import annotations

import logging

import pytest
import torch
from huggingface_hub import constants

from kandinsky5.vae import FLUX_SCALING_FACTOR, HUNYUAN_SCALING_FACTOR, ImageVAE, VideoVAE
from tests.tiny_components import (
    build_tiny_flux_vae,
    build_tiny_hunyuan_vae,
    save_tiny_flux_vae,
    save_tiny_hunyuan_vae,
)


@pytest.fixture(autouse=True)
def single_thread():
    """Tiny models on a busy two-core machine run far faster on one intra-op thread."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _offline(cls, folder, **kwargs):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(constants, "HF_HUB_OFFLINE", True)
        return cls.from_pretrained(str(folder), device="cpu", **kwargs)


@pytest.fixture(scope="module")
def video_vae(tmp_path_factory) -> VideoVAE:
    folder = save_tiny_hunyuan_vae(tmp_path_factory.mktemp("hunyuan"))
    # Small tiles so that tiny inputs exercise the tiled paths.
    return _offline(VideoVAE, folder, tile_size=96, tile_stride=64, tile_frames=8, tile_frames_stride=4)


@pytest.fixture(scope="module")
def image_vae(tmp_path_factory) -> ImageVAE:
    return _offline(ImageVAE, save_tiny_flux_vae(tmp_path_factory.mktemp("flux")), tile_size=96)


def _pixels(seed: int, *shape: int) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _latent(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _close_enough(tiled: torch.Tensor, whole: torch.Tensor, max_mean_error: float, min_corr: float) -> None:
    """Tiles change GroupNorm statistics and attention context, a lot with random weights: compare loosely."""
    mean_error = (tiled - whole).abs().mean().item()
    corr = torch.corrcoef(torch.stack([tiled.flatten(), whole.flatten()]))[0, 1].item()
    assert mean_error < max_mean_error and corr > min_corr, (mean_error, corr)


# --------------------------------------------------------------------------------------------- video


def test_video_loads_offline_with_the_config_scaling(video_vae: VideoVAE) -> None:
    assert video_vae.scaling_factor == HUNYUAN_SCALING_FACTOR == video_vae.vae.config.scaling_factor
    assert video_vae.latent_channels == 16 and video_vae.dtype == torch.float32
    reference = build_tiny_hunyuan_vae().state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in video_vae.vae.state_dict().items())


@pytest.mark.parametrize("num_frames", [1, 5, 9])
def test_video_shapes(video_vae: VideoVAE, num_frames: int) -> None:
    frames = _pixels(num_frames, 1, 3, num_frames, 16, 24)
    latent = video_vae.encode(frames)
    assert latent.shape == (1, (num_frames - 1) // 4 + 1, 2, 3, 16)
    video = video_vae.decode(latent)
    assert video.shape == (1, 3, num_frames, 16, 24) and video.dtype == torch.float32
    assert video.min() >= -1 and video.max() <= 1


def test_video_encode_is_the_scaled_posterior(video_vae: VideoVAE) -> None:
    frames = _pixels(0, 2, 3, 5, 16, 16)
    mode = video_vae.encode(frames, sample=False, tiling=False)  # first: sets the unchunked path for both
    with torch.no_grad():
        posterior = video_vae.vae.encode(frames).latent_dist
    to_ours = (0, 2, 3, 4, 1)  # (B, C, T, h, w) → (B, T, h, w, C)
    torch.testing.assert_close(mode, (posterior.mode() * HUNYUAN_SCALING_FACTOR).permute(to_ours))
    sample = video_vae.encode(frames, generator=torch.Generator().manual_seed(7), tiling=False)
    expected = posterior.sample(generator=torch.Generator().manual_seed(7)) * HUNYUAN_SCALING_FACTOR
    torch.testing.assert_close(sample, expected.permute(to_ours))
    # No generator: a CPU generator seeded with 0, whatever the global RNG state.
    torch.manual_seed(123)
    first = video_vae.encode(frames)
    torch.manual_seed(456)
    assert torch.equal(first, video_vae.encode(frames))
    assert torch.equal(first, video_vae.encode(frames, generator=torch.Generator().manual_seed(0)))
    assert not torch.equal(first, sample)


def test_video_decode_divides_by_the_scaling(video_vae: VideoVAE) -> None:
    latent = _latent(1, 2, 2, 2, 3, 16)
    # Ours first: tiling=False turns off the frame-wise decoding an earlier "auto" call may have left on,
    # so the reference below runs the same (unchunked) path and only the scaling is compared.
    ours = video_vae.decode(latent, tiling=False)
    with torch.no_grad():
        expected = video_vae.vae.decode(latent.permute(0, 4, 1, 2, 3) / HUNYUAN_SCALING_FACTOR).sample
    torch.testing.assert_close(ours, expected.clamp(-1, 1))


def test_video_spatial_tiling(video_vae: VideoVAE) -> None:
    latent = _latent(2, 1, 1, 16, 16, 16)  # one frame of 128 x 128 pixels, tiles of 96 every 64
    whole = video_vae.decode(latent, tiling=False)
    tiled = video_vae.decode(latent, tiling=True)
    assert tiled.shape == whole.shape == (1, 3, 1, 128, 128)
    with torch.no_grad():  # exactly diffusers' own tiled decode with our tile geometry
        video_vae.vae.use_tiling = True
        expected = video_vae.vae.tiled_decode(latent.permute(0, 4, 1, 2, 3) / HUNYUAN_SCALING_FACTOR).sample
    torch.testing.assert_close(tiled, expected.clamp(-1, 1))
    _close_enough(tiled, whole, max_mean_error=0.12, min_corr=0.85)


def test_video_framewise_decoding() -> None:
    video_vae = VideoVAE(build_tiny_hunyuan_vae())  # default windows: 16 frames every 12
    latent = _latent(3, 1, 5, 4, 4, 16)  # 17 frames: two windows
    whole = video_vae.decode(latent, tiling=False)
    windows = video_vae.decode(latent, tiling="auto")  # frame windows on, spatial tiles off at this size
    assert windows.shape == whole.shape == (1, 3, 17, 32, 32)
    assert not torch.equal(windows, whole)
    _close_enough(windows, whole, max_mean_error=0.1, min_corr=0.85)


def test_video_auto_tiling_follows_the_size(video_vae: VideoVAE) -> None:
    vae = video_vae.vae
    video_vae._set_tiling("auto", 512, 768)  # SD: whole frames, frame windows
    assert not vae.use_tiling and vae.use_framewise_decoding and vae.use_slicing
    video_vae._set_tiling("auto", 768, 1280)  # HD: spatial tiles too (the official int32 rule)
    assert vae.use_tiling
    video_vae._set_tiling(False, 768, 1280)
    assert not (vae.use_tiling or vae.use_framewise_decoding or vae.use_framewise_encoding or vae.use_slicing)
    with pytest.raises(ValueError, match="tiling must be"):
        video_vae.decode(_latent(0, 1, 1, 2, 2, 16), tiling="yes")


def test_video_input_validation(video_vae: VideoVAE) -> None:
    with pytest.raises(ValueError, match="4k\\+1, got 4; try 5"):
        video_vae.encode(torch.zeros(1, 3, 4, 16, 16))
    with pytest.raises(ValueError, match="multiples of 8"):
        video_vae.encode(torch.zeros(1, 3, 1, 12, 16))
    with pytest.raises(ValueError, match="\\(B, 3, F, H, W\\)"):
        video_vae.encode(torch.zeros(3, 1, 16, 16))
    with pytest.raises(ValueError, match="channels-last"):
        video_vae.decode(torch.zeros(1, 16, 1, 2, 2))
    with pytest.raises(ValueError, match="multiples of 8"):
        VideoVAE(build_tiny_hunyuan_vae(), tile_size=100, tile_stride=64)


def test_unexpected_scaling_factor_warns(caplog) -> None:
    vae = build_tiny_hunyuan_vae()
    vae.register_to_config(scaling_factor=1.0)
    with caplog.at_level(logging.WARNING, logger="kandinsky5.vae"):
        wrapped = VideoVAE(vae)
    assert wrapped.scaling_factor == 1.0 and "official HunyuanVideo VAE uses 0.476986" in caplog.text


# --------------------------------------------------------------------------------------------- image


def test_image_round_trip_shapes(image_vae: ImageVAE) -> None:
    assert image_vae.scaling_factor == FLUX_SCALING_FACTOR and image_vae.vae.config.shift_factor == 0.1159
    latent = image_vae.encode(_pixels(4, 2, 3, 1, 32, 48))
    assert latent.shape == (2, 1, 4, 6, 16)
    image = image_vae.decode(latent)
    assert image.shape == (2, 3, 1, 32, 48) and image.dtype == torch.float32
    assert image.min() >= -1 and image.max() <= 1


def test_image_vae_ignores_the_flux_shift(image_vae: ImageVAE) -> None:
    """decode(z) = diffusers decode(z / scaling), encode = scaling · posterior: no shift either way."""
    latent = _latent(5, 1, 1, 4, 4, 16)
    z = latent[:, 0].permute(0, 3, 1, 2) / FLUX_SCALING_FACTOR
    decoded = image_vae.decode(latent, tiling=False)[:, :, 0]  # ours first, as in the video tests
    with torch.no_grad():
        expected = image_vae.vae.decode(z).sample.clamp(-1, 1)
        shifted = image_vae.vae.decode(z + 0.1159).sample.clamp(-1, 1)
    torch.testing.assert_close(decoded, expected)
    assert (decoded - shifted).abs().max() > 1e-3

    pixels = _pixels(6, 1, 3, 1, 32, 32)
    encoded = image_vae.encode(pixels, sample=False)
    with torch.no_grad():
        mode = image_vae.vae.encode(pixels[:, :, 0]).latent_dist.mode()
    torch.testing.assert_close(encoded, (mode * FLUX_SCALING_FACTOR).permute(0, 2, 3, 1)[:, None])


def test_image_sample_uses_the_generator(image_vae: ImageVAE) -> None:
    pixels = _pixels(7, 1, 3, 1, 16, 16)
    with torch.no_grad():
        posterior = image_vae.vae.encode(pixels[:, :, 0]).latent_dist
    expected = posterior.sample(generator=torch.Generator().manual_seed(3)) * FLUX_SCALING_FACTOR
    sample = image_vae.encode(pixels, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(sample, expected.permute(0, 2, 3, 1)[:, None])


def test_image_tiling(image_vae: ImageVAE) -> None:
    latent = _latent(8, 1, 1, 16, 16, 16)  # 128 x 128 pixels, tiles of 96
    whole = image_vae.decode(latent, tiling=False)
    assert torch.equal(image_vae.decode(latent), whole)  # "auto" leaves supported sizes whole
    tiled = image_vae.decode(latent, tiling=True)
    assert tiled.shape == whole.shape == (1, 3, 1, 128, 128)
    _close_enough(tiled, whole, max_mean_error=0.1, min_corr=0.9)


def test_image_input_validation(image_vae: ImageVAE) -> None:
    with pytest.raises(ValueError, match="\\(B, 3, 1, H, W\\)"):
        image_vae.encode(torch.zeros(1, 3, 2, 16, 16))
    with pytest.raises(ValueError, match="T = 1"):
        image_vae.decode(torch.zeros(1, 2, 2, 2, 16))
    with pytest.raises(ValueError, match="tile_size"):
        ImageVAE(build_tiny_flux_vae(), tile_size=100)
