"""Contract suite over every registered variant, plus the registry's lookups."""

from __future__ import annotations

import dataclasses
import re

import pytest

from kandinsky5.config import DiTConfig, NablaConfig, SamplingDefaults
from kandinsky5.variants import (
    MAX_VIDEO_FRAMES,
    VARIANTS,
    HubFiles,
    TextEncoderSpec,
    Variant,
    get_variant,
    list_variants,
    parameter_count,
    variant_for_repo,
)

ALL = [v for v in list_variants() if v.packaged is None]  # the official releases; nano: tests/nano
IDS = [v.name for v in ALL]


# --------------------------------------------------------------------------------------------------
# Contract: every variant
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ALL, ids=IDS)
def test_records_are_typed_and_frozen(variant: Variant) -> None:
    assert isinstance(variant.dit, DiTConfig)
    assert isinstance(variant.sampling, SamplingDefaults)
    assert isinstance(variant.text, TextEncoderSpec)
    assert VARIANTS[variant.name] is variant
    with pytest.raises(dataclasses.FrozenInstanceError):
        variant.name = "other"  # type: ignore[misc]


@pytest.mark.parametrize("variant", ALL, ids=IDS)
def test_default_size_is_allowed_and_on_the_grid(variant: Variant) -> None:
    size = (variant.sampling.height, variant.sampling.width)
    assert size in variant.resolutions
    for height, width in variant.resolutions:
        assert height % variant.size_multiple == 0 and width % variant.size_multiple == 0
        assert height % 16 == 0 and width % 16 == 0  # VAE x8 then patch x2


@pytest.mark.parametrize("variant", ALL, ids=IDS)
def test_nabla_iff_configured_and_sizes_tile_into_128(variant: Variant) -> None:
    assert (variant.attention == "nabla") == isinstance(variant.nabla, NablaConfig)
    if variant.attention == "nabla":
        assert variant.size_multiple % 128 == 0
        assert all(h % 128 == 0 and w % 128 == 0 for h, w in variant.resolutions)
        assert (variant.nabla.wT, variant.nabla.wH, variant.nabla.wW) == (11, 3, 3)


@pytest.mark.parametrize("variant", ALL, ids=IDS)
def test_frames_fit_the_task(variant: Variant) -> None:
    frames = variant.sampling.num_frames
    if variant.is_video:
        assert (frames - 1) % 4 == 0
        assert frames <= variant.max_num_frames <= MAX_VIDEO_FRAMES
        assert variant.sampling.fps == 24
        assert variant.max_num_frames == (241 if "10s" in variant.name else 121)
    else:
        assert frames == variant.max_num_frames == 1


@pytest.mark.parametrize("variant", ALL, ids=IDS)
def test_components_match_the_task(variant: Variant) -> None:
    if variant.is_video:
        assert variant.vae == "hunyuan"
        assert variant.vae_repo_id == "hunyuanvideo-community/HunyuanVideo"
        assert (variant.text.qwen_max_length, variant.text.template) == (256, "video")
        assert variant.sampling.negative_prompt.startswith("Static, 2D cartoon")
        assert variant.dit.visual_cond
    else:
        assert variant.vae == "flux"
        assert variant.vae_repo_id == "black-forest-labs/FLUX.1-dev"
        assert variant.text.qwen_max_length == 512
        assert variant.text.template == ("image_edit" if variant.task == "i2i" else "image")
        assert variant.sampling.negative_prompt == ""
        assert variant.sampling.rope_scale == (1.0, 1.0, 1.0)
        assert variant.dit.visual_cond == (variant.task == "i2i")
    assert variant.vae_subfolder == "vae"
    assert variant.text.qwen_repo_id == "Qwen/Qwen2.5-VL-7B-Instruct"
    assert variant.text.clip_repo_id == "openai/clip-vit-large-patch14"


@pytest.mark.parametrize("variant", ALL, ids=IDS)
def test_sampling_defaults_follow_the_release(variant: Variant) -> None:
    s = variant.sampling
    guidance_free = "nocfg" in variant.name or "distilled" in variant.name
    assert s.num_inference_steps == (16 if "distilled" in variant.name else 50)
    if variant.is_video:
        assert s.guidance_scale == (1.0 if guidance_free else 5.0)
        assert s.shift == (10.0 if "10s" in variant.name or variant.task == "i2v" else 5.0)
        hd = variant.name.endswith("-hd")
        assert s.rope_scale == ((1.0, 3.16, 3.16) if hd else (1.0, 2.0, 2.0))
        assert (s.height, s.width) == ((768, 1280) if hd else (512, 768))
    else:
        assert (s.guidance_scale, s.shift, s.height, s.width) == (3.5, 3.0, 1024, 1024)


REPO = re.compile(r"^kandinskylab/Kandinsky-5\.0-(T2V|I2V|T2I|I2I)-(Lite|Pro)(-[A-Za-z0-9]+)*$")
FILE = re.compile(r"^model/kandinsky5(lite|pro)_(t2v|i2v|t2i|i2i)[a-z0-9_]*\.safetensors$")


@pytest.mark.parametrize("variant", ALL, ids=IDS)
def test_repo_ids_look_right(variant: Variant) -> None:
    hub = variant.hub
    assert hub is not None
    assert REPO.match(hub.repo_id), hub.repo_id
    assert FILE.match(hub.filename), hub.filename
    family = "pro" if "-pro" in variant.name else "lite"
    assert f"-{family.capitalize()}" in hub.repo_id and f"kandinsky5{family}_{variant.task}" in hub.filename
    assert variant.task.upper() in hub.repo_id
    if hub.diffusers_repo_id is not None:
        assert REPO.match(hub.diffusers_repo_id.removesuffix("-Diffusers"))
        assert hub.diffusers_repo_id.endswith("-Diffusers")
        assert hub.diffusers_subfolder == "transformer"


# --------------------------------------------------------------------------------------------------
# Specific releases
# --------------------------------------------------------------------------------------------------

# Exact DiT-only counts from instantiating the official model on the meta device (kandinsky5.md §2.9).
EXPECTED_PARAMETERS = {
    "video-lite-5s-sft": 2_007_702_848,
    "video-pro-5s-sd": 19_311_325_248,
    "image-lite": 6_022_080_576,
    "image-lite-edit": 6_022_254_656,
}


@pytest.mark.parametrize(("name", "expected"), EXPECTED_PARAMETERS.items())
def test_parameter_counts_match_the_official_model(name: str, expected: int) -> None:
    assert parameter_count(get_variant(name).dit) == expected


def test_parameter_count_shares_one_architecture_per_family() -> None:
    counts = {v.name: v.num_parameters for v in ALL}
    assert {counts[n] for n in counts if n.startswith("video-lite")} == {2_007_702_848}
    assert {counts[n] for n in counts if n.startswith("video-pro")} == {19_311_325_248}


def test_parameter_count_of_a_tiny_config_matches_its_layer_sum() -> None:
    tiny = DiTConfig(
        model_dim=32,
        ff_dim=64,
        time_dim=16,
        num_text_blocks=1,
        num_visual_blocks=2,
        axes_dims=(4, 6, 6),
        in_text_dim=24,
        in_text_dim2=8,
        visual_cond=False,
    )
    # Dropping one visual block removes exactly its parameters: 9-way modulation, 2 attentions, FF.
    fewer = dataclasses.replace(tiny, num_visual_blocks=1)
    block = (16 * 9 * 32 + 9 * 32) + 2 * (4 * (32 * 32 + 32) + 2 * 16) + 2 * 32 * 64
    assert parameter_count(tiny) - parameter_count(fewer) == block


def test_ten_second_nocfg_points_at_the_nocfg_checkpoint() -> None:
    # Deliberate fix: the official 10 s nocfg YAML loads the sft file.
    hub = get_variant("video-lite-10s-nocfg").hub
    assert hub.filename == "model/kandinsky5lite_t2v_nocfg_10s.safetensors"
    assert hub.repo_id == "kandinskylab/Kandinsky-5.0-T2V-Lite-nocfg-10s"


def test_pro_sd_and_hd_share_a_checkpoint_but_not_attention() -> None:
    sd, hd = get_variant("video-pro-5s-sd"), get_variant("video-pro-5s-hd")
    assert sd.hub == hd.hub and sd.dit == hd.dit
    assert sd.attention == "dense" and hd.nabla == NablaConfig(P=0.8)
    assert get_variant("video-pro-10s-sd").nabla.P == 0.9
    assert get_variant("video-pro-10s-hd").nabla.P == 0.7
    assert get_variant("video-pro-i2v-5s-hd").nabla.P == 0.8


def test_lite_ten_second_variants_use_nabla_point_nine() -> None:
    for stage in ("sft", "pretrain", "nocfg", "distilled"):
        assert get_variant(f"video-lite-10s-{stage}").nabla == NablaConfig(P=0.9, wT=11, wH=3, wW=3)
        assert get_variant(f"video-lite-5s-{stage}").attention == "dense"


def test_names_are_kebab_case_and_unique() -> None:
    assert len(IDS) == len(set(IDS)) == len(VARIANTS) - 3  # + nano, nano-i2v, nano-t2i
    assert all(re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", n) for n in IDS)


# --------------------------------------------------------------------------------------------------
# Lookups
# --------------------------------------------------------------------------------------------------


def test_get_variant_suggests_close_names() -> None:
    with pytest.raises(ValueError) as info:
        get_variant("video-lite-5s-stf")
    message = str(info.value)
    assert "'video-lite-5s-sft'" in message and "kandinsky5 models" in message


def test_get_variant_without_close_names_still_explains() -> None:
    with pytest.raises(ValueError, match="unknown variant 'zzz'"):
        get_variant("zzz")


def test_list_variants_is_a_copy_in_registry_order() -> None:
    listed = list_variants()
    listed.clear()
    assert [v.name for v in list_variants()] == list(VARIANTS)


def _all_repo_ids() -> list[tuple[str, str]]:
    pairs = []
    for v in ALL:
        pairs.append((v.name, v.hub.repo_id))
        if v.hub.diffusers_repo_id:
            pairs.append((v.name, v.hub.diffusers_repo_id))
    return pairs


@pytest.mark.parametrize(("name", "repo_id"), _all_repo_ids(), ids=lambda x: x)
def test_variant_for_repo_round_trip(name: str, repo_id: str) -> None:
    variant = get_variant(name)
    found = variant_for_repo(repo_id)
    assert found is not None and found.hub == variant.hub
    assert variant_for_repo(repo_id.upper()) is found
    assert variant_for_repo(f" {repo_id.lower()}/ ") is found
    if sum(v.hub == variant.hub for v in ALL) == 1:
        assert found is variant
    else:  # Pro SD/HD share a repository: the SD entry answers
        assert found.name.endswith("-sd")


def test_variant_for_repo_unknown_is_none() -> None:
    assert variant_for_repo("black-forest-labs/FLUX.1-dev") is None
    assert variant_for_repo("kandinskylab/Kandinsky-5.0-T2V-Lite-sft-5s-Diffuser") is None


# --------------------------------------------------------------------------------------------------
# Validation says what is wrong
# --------------------------------------------------------------------------------------------------


def _with(base: str = "video-lite-5s-sft", **changes: object) -> Variant:
    return dataclasses.replace(get_variant(base), **changes)


def test_validation_rejects_nabla_without_config() -> None:
    with pytest.raises(ValueError, match="NablaConfig is required"):
        _with(attention="nabla")
    with pytest.raises(ValueError, match="NablaConfig is required"):
        _with("video-lite-10s-sft", nabla=None)


def test_validation_rejects_nabla_on_a_16_pixel_grid() -> None:
    with pytest.raises(ValueError, match="multiples of 128"):
        _with("video-lite-10s-sft", size_multiple=16)


def test_validation_rejects_default_size_outside_resolutions() -> None:
    sampling = dataclasses.replace(get_variant("video-lite-5s-sft").sampling, height=640, width=640)
    with pytest.raises(ValueError, match="not in resolutions"):
        _with(sampling=sampling)


def test_validation_rejects_bad_frame_counts() -> None:
    sampling = dataclasses.replace(get_variant("video-lite-5s-sft").sampling, num_frames=120)
    with pytest.raises(ValueError, match="4k\\+1, got 120; try 121"):
        _with(sampling=sampling)
    with pytest.raises(ValueError, match="max_num_frames"):
        _with(max_num_frames=513)


def test_validation_rejects_mismatched_components() -> None:
    with pytest.raises(ValueError, match="visual_cond"):
        _with("image-lite", dit=get_variant("image-lite-edit").dit)
    with pytest.raises(ValueError, match="Qwen template"):
        _with(text=TextEncoderSpec(qwen_max_length=256, template="image"))
    with pytest.raises(ValueError, match="video VAE"):
        _with("image-lite", vae="hunyuan")
    with pytest.raises(ValueError, match="kebab case"):
        _with(name="Video_Lite")


def test_hub_files_validation() -> None:
    with pytest.raises(ValueError, match="owner/name"):
        HubFiles("Kandinsky-5.0-T2V-Lite-sft-5s", "model/x.safetensors", None)
    with pytest.raises(ValueError, match="safetensors"):
        HubFiles("kandinskylab/x", "model/x.pt", None)
