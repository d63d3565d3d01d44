"""Text encoders on tiny random Qwen2.5-VL and CLIP models saved to disk and loaded offline.

The reference for the Qwen part is the official recipe run on the full ``Qwen2_5_VLForConditionalGeneration``
(``model(input_ids)["hidden_states"][-1][:, crop_start:]``); for CLIP a direct ``CLIPTextModel`` call.
"""

from __future__ import annotations

import logging

import pytest
import torch
from huggingface_hub import constants

import kandinsky5.text as text_module
from kandinsky5.text import (
    DEFAULT_MAX_LENGTH,
    OFFICIAL_CROP_START,
    TEMPLATES,
    TextEmbeddings,
    TextEncoder,
    template_crop_start,
)
from tests.tiny_components import CLIP_HIDDEN, QWEN_HIDDEN, QWEN_MERGE, QWEN_PATCH, save_tiny_clip, save_tiny_qwen

CAT = "a cat sits on a mat"
FOX = "A red fox runs through fresh snow at dawn, the camera follows it from the side."


@pytest.fixture(autouse=True)
def single_thread():
    """Tiny models on a busy two-core machine run far faster on one intra-op thread."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    return save_tiny_qwen(root / "qwen"), save_tiny_clip(root / "clip")


def _offline_load(folders, **kwargs) -> TextEncoder:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(constants, "HF_HUB_OFFLINE", True)
        return TextEncoder.from_pretrained(str(folders[0]), str(folders[1]), device="cpu", **kwargs)


@pytest.fixture(scope="module")
def encoder(folders) -> TextEncoder:
    return _offline_load(folders)


@pytest.fixture(scope="module")
def edit_encoder(folders) -> TextEncoder:
    return _offline_load(folders, templates=("image_edit",))


@pytest.fixture(scope="module")
def reference(folders):
    """The full conditional-generation model the official code loads, and the tokenizer it uses."""
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(folders[0]).eval()
    return model, AutoTokenizer.from_pretrained(folders[0])


def _official_tokens(reference, prompts, template, max_length):
    """The official text path: right padding (the real tokenizer's default) to max_length + crop."""
    model, tokenizer = reference
    crop = template_crop_start(tokenizer, template)
    batch = tokenizer(
        [TEMPLATES[template].format(p) for p in prompts],
        max_length=max_length + crop,
        truncation=True,
        padding="max_length",
        padding_side="right",
        return_tensors="pt",
    )
    with torch.no_grad():
        hidden = model(input_ids=batch["input_ids"], output_hidden_states=True)["hidden_states"][-1]
    return hidden[:, crop:], batch["attention_mask"][:, crop:].bool()


def _n_real(tokenizer, caption: str) -> int:
    """Real tokens after the crop: the caption and the closing <|im_end|>."""
    return len(tokenizer(caption + "<|im_end|>", add_special_tokens=False)["input_ids"])


# --------------------------------------------------------------------------------------- templates

# Transcribed independently from docs/kandinsky5.md §6.1 (typos included).
EXPECTED_IMAGE = (
    "<|im_start|>system\nYou are a promt engineer. Describe the image by detailing the color, shape, size, "
    "texture, quantity, text, spatial relationships of the objects and background:<|im_end|>\n"
    "<|im_start|>user\n{}<|im_end|>"
)
EXPECTED_EDIT = (
    "<|im_start|>system\nYou are a promt engineer. Based on the provided source image (first image) and "
    "target image (second image), create an interesting text prompt that can be used together with the "
    "source image to create the target image:<|im_end|>\n<|im_start|>user\n{}"
)
EXPECTED_VIDEO_LINES = [
    "<|im_start|>system",
    "You are a promt engineer. Describe the video in detail.",
    "Describe how the camera moves or shakes, describe the zoom and view angle, whether it follows the objects.",
    "Describe the location of the video, main characters or objects and their action.",
    "Describe the dynamism of the video and presented actions.",
    "Name the visual style of the video: whether it is a professional footage, user generated content, some "
    "kind of animation, video game or scren content.",
    "Describe the visual effects, postprocessing and transitions if they are presented in the video.",
    "Pay attention to the order of key actions shown in the scene.<|im_end|>",
    "<|im_start|>user",
    "{}<|im_end|>",
]


def test_templates_are_the_official_strings() -> None:
    assert TEMPLATES["image"] == EXPECTED_IMAGE
    assert TEMPLATES["image_edit"] == EXPECTED_EDIT
    assert TEMPLATES["video"].split("\n") == EXPECTED_VIDEO_LINES
    i2v = TEMPLATES["image2video"].split("\n")
    assert i2v[1].startswith("You are a promt engineer. Your task is to create a highly detailed")
    assert i2v[3] == "Describe main characters actions." and i2v[-1] == "{}<|im_end|>"
    for template in TEMPLATES.values():
        assert template.count("{}") == 1 and "promt engineer" in template
    assert TEMPLATES["video"].format(CAT).endswith("<|im_start|>user\na cat sits on a mat<|im_end|>")
    assert OFFICIAL_CROP_START == {"video": 129, "image": 41, "image_edit": 55, "image2video": 132}
    assert DEFAULT_MAX_LENGTH["video"] == 256 and DEFAULT_MAX_LENGTH["image"] == 512


# ------------------------------------------------------------------------------------------- crop


@pytest.mark.parametrize("template", list(TEMPLATES))
def test_crop_is_the_template_prefix_token_count(encoder: TextEncoder, template: str) -> None:
    tokenizer = encoder.tokenizer
    prefix = TEMPLATES[template].split("{}")[0]
    crop = encoder.crop_start(template)
    assert crop == len(tokenizer(prefix, add_special_tokens=False)["input_ids"])
    # The tokens after the crop are exactly the caption's (the prefix ends in "\n", a token boundary).
    full = tokenizer(TEMPLATES[template].format(FOX), add_special_tokens=False)["input_ids"]
    caption = tokenizer(FOX, add_special_tokens=False)["input_ids"]
    assert full[crop : crop + len(caption)] == caption


def test_tiny_tokenizer_is_not_taken_for_qwen(encoder: TextEncoder) -> None:
    assert not text_module._is_qwen25_tokenizer(encoder.tokenizer)


def test_real_qwen_vocab_uses_the_official_crop(encoder, monkeypatch, caplog) -> None:
    """With Qwen's vocabulary the official constants win; a disagreeing count is reported."""
    tokenizer = encoder.tokenizer
    monkeypatch.setattr(text_module, "_is_qwen25_tokenizer", lambda tok: True)
    with caplog.at_level(logging.WARNING, logger="kandinsky5.text"):
        assert [template_crop_start(tokenizer, t) for t in ("video", "image", "image_edit")] == [129, 41, 55]
    assert "official code crops 129" in caplog.text

    caplog.clear()
    computed = len(tokenizer(TEMPLATES["image"].split("{}")[0], add_special_tokens=False)["input_ids"])
    monkeypatch.setitem(OFFICIAL_CROP_START, "image", computed)
    with caplog.at_level(logging.WARNING, logger="kandinsky5.text"):
        assert template_crop_start(tokenizer, "image") == computed
    assert not caplog.text


# --------------------------------------------------------------------------------- text encoding


def test_loading_offline_gives_the_saved_weights(encoder, reference, folders) -> None:
    from transformers import CLIPModel

    qwen_reference = reference[0].model.language_model.state_dict()
    loaded = encoder.qwen.state_dict()
    assert loaded.keys() == qwen_reference.keys()
    assert all(torch.equal(loaded[k], qwen_reference[k]) for k in loaded)
    assert not hasattr(encoder.qwen, "visual")  # text-only templates: no vision tower in memory
    assert encoder.image_processor is None

    clip_reference = CLIPModel.from_pretrained(folders[1]).text_model.state_dict()
    clip_loaded = encoder.clip.state_dict()
    assert clip_loaded.keys() == clip_reference.keys()
    assert all(torch.equal(clip_loaded[k], clip_reference[k]) for k in clip_loaded)
    assert encoder.clip.dtype == torch.float32
    assert encoder.tokenizer.padding_side == "right"  # the saved tokenizer pads on the left


@pytest.mark.parametrize("template", ["video", "image"])
def test_encode_matches_the_official_recipe(encoder, reference, template: str) -> None:
    prompts = [CAT, FOX]
    out = encoder.encode(prompts, template, max_length=64)
    assert isinstance(out, TextEmbeddings)
    assert out.tokens.shape == (2, 64, QWEN_HIDDEN) and out.mask.shape == (2, 64)
    assert out.mask.dtype == torch.bool and out.pooled.shape == (2, CLIP_HIDDEN)
    tokens, mask = _official_tokens(reference, prompts, template, 64)
    torch.testing.assert_close(out.tokens, tokens, rtol=0, atol=1e-6)
    assert torch.equal(out.mask, mask)


def test_mask_is_caption_and_im_end_then_right_padding(encoder) -> None:
    out = encoder.encode([CAT, FOX], "video", max_length=64)
    for row, caption in zip(out.mask, (CAT, FOX), strict=True):
        n = _n_real(encoder.tokenizer, caption)
        assert n < 64
        assert row[:n].all() and not row[n:].any()


def test_pads_do_not_change_real_tokens(encoder, reference) -> None:
    """Right padding under causal attention: real positions equal the LM run on the bare sequence."""
    model, tokenizer = reference
    out = encoder.encode([CAT], "image", max_length=48)
    crop = encoder.crop_start("image")
    ids = tokenizer(TEMPLATES["image"].format(CAT), return_tensors="pt")["input_ids"]  # no padding
    with torch.no_grad():
        bare = model(input_ids=ids, output_hidden_states=True)["hidden_states"][-1][:, crop:]
    n = _n_real(tokenizer, CAT)
    assert bare.shape[1] == n
    torch.testing.assert_close(out.tokens[:, :n], bare, rtol=0, atol=1e-5)


def test_long_prompts_are_truncated(encoder, reference) -> None:
    long_prompt = " ".join([FOX] * 8)
    out = encoder.encode([long_prompt, CAT], "video", max_length=24)
    assert out.tokens.shape == (2, 24, QWEN_HIDDEN)
    assert out.mask[0].all()  # the caption fills every position; its <|im_end|> is cut off
    n = _n_real(encoder.tokenizer, CAT)
    assert out.mask[1, :n].all() and not out.mask[1, n:].any()
    # Causal attention: truncation only drops positions, the kept ones equal an untruncated run.
    model, tokenizer = reference
    crop = encoder.crop_start("video")
    ids = tokenizer(TEMPLATES["video"].format(long_prompt), return_tensors="pt")["input_ids"]
    with torch.no_grad():
        full = model(input_ids=ids, output_hidden_states=True)["hidden_states"][-1][:, crop : crop + 24]
    torch.testing.assert_close(out.tokens[:1], full, rtol=0, atol=1e-5)


def test_default_max_lengths(encoder) -> None:
    assert encoder.encode(CAT, "video").tokens.shape == (1, 256, QWEN_HIDDEN)
    assert encoder.encode(CAT, "image").tokens.shape == (1, 512, QWEN_HIDDEN)


def test_clip_pooled_equals_a_direct_call(encoder, folders) -> None:
    from transformers import AutoTokenizer, CLIPTextModel

    model = CLIPTextModel.from_pretrained(folders[1]).eval()
    tokenizer = AutoTokenizer.from_pretrained(folders[1])
    prompts = [CAT, " ".join([FOX] * 6)]  # the second is longer than 77 tokens
    batch = tokenizer(prompts, max_length=77, truncation=True, padding="max_length", return_tensors="pt")
    with torch.no_grad():
        expected = model(**batch)["pooler_output"]
    pooled = encoder.encode_pooled(prompts)
    assert pooled.shape == (2, CLIP_HIDDEN) and pooled.dtype == torch.float32
    torch.testing.assert_close(pooled, expected, rtol=0, atol=0)
    torch.testing.assert_close(encoder.encode(prompts, "image", max_length=8).pooled, expected, rtol=0, atol=0)


def test_input_validation(encoder) -> None:
    with pytest.raises(ValueError, match="unknown template"):
        encoder.encode(CAT, "audio")
    with pytest.raises(ValueError, match="non-empty list"):
        encoder.encode([], "video")
    with pytest.raises(ValueError, match="max_length must be >= 1"):
        encoder.encode(CAT, "video", max_length=0)
    with pytest.raises(ValueError, match="only used by the 'image_edit'"):
        encoder.encode(CAT, "video", images=torch.zeros(1, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match="no vision tower"):
        encoder.encode(CAT, "image_edit", images=torch.zeros(1, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match="bool mask"):
        TextEmbeddings(torch.zeros(1, 4, 8), torch.ones(1, 4), torch.zeros(1, 3))


def test_from_spec_asks_for_the_variant_template(monkeypatch) -> None:
    from kandinsky5.variants import get_variant

    calls = []
    monkeypatch.setattr(TextEncoder, "from_pretrained", classmethod(lambda cls, *a, **k: calls.append((a, k))))
    TextEncoder.from_spec(get_variant("image-lite-edit").text, device="cpu")
    [(args, kwargs)] = calls
    assert args == ("Qwen/Qwen2.5-VL-7B-Instruct", "openai/clip-vit-large-patch14")
    assert kwargs["templates"] == ("image_edit",)


# ------------------------------------------------------------------------------------ image edit


def _images(seed: int, batch: int = 1, height: int = 32, width: int = 48) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 3, height, width), generator=gen, dtype=torch.uint8)


def test_edit_prompt_layout(edit_encoder) -> None:
    """caption, <|vision_start|>, one <|image_pad|> per merged patch of the half-size image, end tokens."""
    out = edit_encoder.encode([FOX], "image_edit", images=_images(0))
    n_caption = len(edit_encoder.tokenizer(FOX, add_special_tokens=False)["input_ids"])
    n_image = (32 // 2 // QWEN_PATCH) * (48 // 2 // QWEN_PATCH) // QWEN_MERGE**2  # 4 x 6 patches → 6
    assert out.tokens.shape == (1, n_caption + n_image + 3, QWEN_HIDDEN)
    assert out.mask.all() and out.pooled.shape == (1, CLIP_HIDDEN)


def test_edit_image_changes_only_positions_after_the_caption(edit_encoder) -> None:
    a = edit_encoder.encode([CAT], "image_edit", images=_images(0))
    b = edit_encoder.encode([CAT], "image_edit", images=_images(1))
    n_caption = len(edit_encoder.tokenizer(CAT, add_special_tokens=False)["input_ids"])
    torch.testing.assert_close(a.tokens[:, :n_caption], b.tokens[:, :n_caption], rtol=0, atol=1e-6)
    assert (a.tokens[:, n_caption + 1 :] - b.tokens[:, n_caption + 1 :]).abs().max() > 1e-3


def test_edit_batch_pads_to_the_longest_prompt(edit_encoder) -> None:
    both = edit_encoder.encode([CAT, FOX], "image_edit", images=_images(0, batch=2))
    cat = edit_encoder.encode([CAT], "image_edit", images=_images(0, batch=2)[:1])
    fox = edit_encoder.encode([FOX], "image_edit", images=_images(0, batch=2)[1:])
    assert both.tokens.shape[1] == fox.tokens.shape[1] > cat.tokens.shape[1]
    n = cat.tokens.shape[1]
    assert both.mask[0, :n].all() and not both.mask[0, n:].any() and both.mask[1].all()
    torch.testing.assert_close(both.tokens[:1, :n], cat.tokens, rtol=0, atol=1e-5)
    torch.testing.assert_close(both.tokens[1:], fox.tokens, rtol=0, atol=1e-5)


def test_edit_uses_the_vision_tower_and_3d_positions(edit_encoder, reference) -> None:
    """Same as the full conditional-generation model fed the processor's outputs."""
    model, tokenizer = reference
    images = _images(2)
    out = edit_encoder.encode([CAT], "image_edit", images=images)
    half = text_module._downscale_by_two(images)
    vision = edit_encoder.image_processor(images=list(half), return_tensors="pt")
    n_image = int(vision["image_grid_thw"].prod()) // QWEN_MERGE**2
    prompt = TEMPLATES["image_edit"].format(CAT) + (
        "<|vision_start|>" + "<|image_pad|>" * n_image + "<|vision_end|><|im_end|>"
    )
    batch = tokenizer([prompt], return_tensors="pt")
    image_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    with torch.no_grad():
        hidden = model(
            **batch,
            **vision,
            mm_token_type_ids=(batch["input_ids"] == image_id).int(),
            output_hidden_states=True,
        )["hidden_states"][-1]
    torch.testing.assert_close(out.tokens, hidden[:, edit_encoder.crop_start("image_edit") :], rtol=0, atol=1e-5)


def test_edit_input_validation(edit_encoder) -> None:
    with pytest.raises(ValueError, match="needs the source images"):
        edit_encoder.encode(CAT, "image_edit")
    with pytest.raises(ValueError, match="uint8 tensor"):
        edit_encoder.encode(CAT, "image_edit", images=torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="B = 2 prompts"):
        edit_encoder.encode([CAT, FOX], "image_edit", images=_images(0))
    with pytest.raises(ValueError, match="no fixed max_length"):
        edit_encoder.encode(CAT, "image_edit", max_length=8, images=_images(0))


def test_downscale_by_two_is_antialiased_bilinear() -> None:
    """Like torchvision's resize (the official call) and PIL's bilinear reduce: a triangle filter."""
    import numpy as np
    from PIL import Image

    flat = torch.full((1, 3, 10, 14), 77, dtype=torch.uint8)
    assert torch.equal(text_module._downscale_by_two(flat), torch.full((1, 3, 5, 7), 77, dtype=torch.uint8))
    images = _images(3, batch=1, height=20, width=30)
    half = text_module._downscale_by_two(images)
    assert half.shape == (1, 3, 10, 15) and half.dtype == torch.uint8
    pil = Image.fromarray(images[0].permute(1, 2, 0).numpy()).resize((15, 10), Image.Resampling.BILINEAR)
    expected = torch.from_numpy(np.array(pil)).permute(2, 0, 1)
    assert (half[0].int() - expected.int()).abs().max() <= 1
