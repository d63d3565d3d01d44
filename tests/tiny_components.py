"""Tiny random stand-ins for the real text encoders and VAEs, built offline and saved like Hub folders.

Every builder is deterministic: the same ``seed`` gives the same tokenizer files and the same weights.
The folders have the layout of the real repositories, so the loading code under test is the code that
loads the real models:

- ``save_tiny_qwen(folder)``: a ``Qwen2_5_VLForConditionalGeneration`` checkpoint (text decoder, vision
  tower, LM head; legacy key layout ``model.*`` / ``visual.*`` / ``lm_head.*`` like
  ``Qwen/Qwen2.5-VL-7B-Instruct``), a byte-level BPE tokenizer with Qwen's chat and vision special
  tokens, and a Qwen2-VL image processor config.
- ``save_tiny_clip(folder)``: a full ``CLIPModel`` (text and vision towers, like
  ``openai/clip-vit-large-patch14``) and a CLIP BPE tokenizer.
- ``save_tiny_hunyuan_vae(folder)`` / ``save_tiny_flux_vae(folder)``: ``folder/vae/`` holding a tiny
  ``AutoencoderKLHunyuanVideo`` (8x spatial, 4x temporal) or a FLUX-like ``AutoencoderKL`` (8x, with
  FLUX's shift factor set so tests can prove it is ignored). Both keep 16 latent channels and the
  real scaling factors.

Nothing here touches the network. The tokenizers are trained in-process on the Kandinsky templates and
a few captions, so prompts in tests tokenize into a few dozen tokens.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import torch

# Sizes the tests can assert on.
QWEN_HIDDEN = 32
CLIP_HIDDEN = 24
QWEN_PATCH = 4  # vision patch side in pixels; with merge 2 the image side must be a multiple of 8
QWEN_MERGE = 2
VAE_LATENT_CHANNELS = 16

QWEN_SPECIAL_TOKENS = (
    # In the order of the real vocabulary (after <|endoftext|>), skipping the tokens we never use.
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

_CAPTIONS = (
    "A red fox runs through fresh snow at dawn, the camera follows it from the side.",
    "a cat sits on a mat",
    "Close-up of hands kneading dough on a wooden table, warm light, slow motion.",
    "An old lighthouse on a cliff during a storm; waves crash against the rocks.",
    "Make the sky purple and add the word HELLO on the wall.",
)


def _training_corpus() -> list[str]:
    from kandinsky5.text import TEMPLATES

    plain = [re.sub(r"<\|[a-z_]+\|>", " ", t.replace("{}", " ")) for t in TEMPLATES.values()]
    return [*plain, *_CAPTIONS]


def _learn_merges(pre_tokenizer, num_merges: int, suffix: str = "", lowercase: bool = False) -> list[tuple[str, str]]:
    """BPE merges learned on the templates and captions: most frequent pair first, ties by pair order.

    A few lines of plain Python instead of ``tokenizers``' trainer, whose tie-breaking changes from one
    process to the next.
    """
    words: Counter[tuple[str, ...]] = Counter()
    for text in _training_corpus():
        for piece, _ in pre_tokenizer.pre_tokenize_str(text.lower() if lowercase else text):
            symbols = list(piece)
            symbols[-1] += suffix
            words[tuple(symbols)] += 1
    merges = []
    for _ in range(num_merges):
        pairs: Counter[tuple[str, str]] = Counter()
        for word, count in words.items():
            for pair in zip(word[:-1], word[1:], strict=True):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        merged: Counter[tuple[str, ...]] = Counter()
        for word, count in words.items():
            out, i = [], 0
            while i < len(word):
                if word[i : i + 2] == best:
                    out.append(best[0] + best[1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += count
        words = merged
    return merges


# --------------------------------------------------------------------------------------------------
# Qwen2.5-VL
# --------------------------------------------------------------------------------------------------


def build_tiny_qwen_tokenizer():
    """A ``Qwen2Tokenizer`` with Qwen's pre-tokenizer, ~400 tokens and the chat/vision special tokens.

    Its padding side is deliberately *left*, so tests prove that the encoder forces right padding.
    """
    from tokenizers import Regex, pre_tokenizers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    pre = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    merges = _learn_merges(pre, num_merges=150)
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, model_max_length=131072, padding_side="left")
    tokenizer.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIAL_TOKENS)})
    return tokenizer


def build_tiny_qwen_image_processor():
    """The PIL Qwen2-VL image processor with a 4-pixel patch (images become a handful of tokens)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    factor = QWEN_PATCH * QWEN_MERGE
    return Qwen2VLImageProcessorPil(
        patch_size=QWEN_PATCH,
        merge_size=QWEN_MERGE,
        temporal_patch_size=2,
        min_pixels=factor * factor,
        max_pixels=64 * 64,
    )


def build_tiny_qwen_model(tokenizer, seed: int = 0):
    """A random ``Qwen2_5_VLForConditionalGeneration``: 2 decoder layers of width 32, a 2-block ViT."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN_SPECIAL_TOKENS}
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=QWEN_HIDDEN,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=4096,
            rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]},  # 4 rotary pairs = head_dim 8 / 2
            bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
            eos_token_id=ids["<|im_end|>"],
        ),
        vision_config=dict(
            depth=2,
            hidden_size=16,
            intermediate_size=32,
            num_heads=2,
            out_hidden_size=QWEN_HIDDEN,
            patch_size=QWEN_PATCH,
            spatial_merge_size=QWEN_MERGE,
            temporal_patch_size=2,
            window_size=4 * QWEN_PATCH * QWEN_MERGE,
            fullatt_block_indexes=[1],
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Qwen2_5_VLForConditionalGeneration(config).eval()


def save_tiny_qwen(folder: str | Path, seed: int = 0) -> Path:
    """Save a tiny Qwen2.5-VL (model, tokenizer, image processor) to ``folder``; returns the folder."""
    folder = Path(folder)
    tokenizer = build_tiny_qwen_tokenizer()
    build_tiny_qwen_model(tokenizer, seed).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    build_tiny_qwen_image_processor().save_pretrained(folder)
    return folder


# --------------------------------------------------------------------------------------------------
# CLIP
# --------------------------------------------------------------------------------------------------


def build_tiny_clip_tokenizer():
    """A ``CLIPTokenizer`` (lower-case byte-level BPE with ``</w>``), specials last as in OpenAI's."""
    from tokenizers import Regex, pre_tokenizers
    from transformers import CLIPTokenizer

    pre = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(
                Regex(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""),
                behavior="removed",
                invert=True,
            ),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    merges = _learn_merges(pre, num_merges=150, suffix="</w>", lowercase=True)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    for ch in alphabet:
        vocab[ch + "</w>"] = len(vocab)
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def build_tiny_clip_model(tokenizer, seed: int = 0):
    """A random full ``CLIPModel`` whose text tower has width 24 and 2 layers."""
    from transformers import CLIPConfig, CLIPModel

    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=CLIP_HIDDEN,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        # OpenAI's config keeps the legacy ids (eos 2): pooling then takes the argmax token id, the
        # end-of-text token, which is the largest id in both vocabularies. Same code path as the real one.
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )
    vision = dict(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=32,
        patch_size=16,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).eval()


def save_tiny_clip(folder: str | Path, seed: int = 0) -> Path:
    """Save a tiny CLIP (full model + tokenizer) to ``folder``; returns the folder."""
    folder = Path(folder)
    tokenizer = build_tiny_clip_tokenizer()
    build_tiny_clip_model(tokenizer, seed).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# --------------------------------------------------------------------------------------------------
# VAEs
# --------------------------------------------------------------------------------------------------


def build_tiny_hunyuan_vae(seed: int = 0):
    """A random ``AutoencoderKLHunyuanVideo``: 4 levels (8x spatial, 4x temporal), 16 latent channels."""
    from diffusers import AutoencoderKLHunyuanVideo

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKLHunyuanVideo(
            block_out_channels=(8, 8, 16, 16),
            layers_per_block=1,
            norm_num_groups=4,
            latent_channels=VAE_LATENT_CHANNELS,
            scaling_factor=0.476986,
            spatial_compression_ratio=8,
            temporal_compression_ratio=4,
        )
    return vae.eval()


def build_tiny_flux_vae(seed: int = 0):
    """A random FLUX-like ``AutoencoderKL``: 4 levels (8x), 16 latent channels, FLUX scaling and shift."""
    from diffusers import AutoencoderKL

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 8, 16, 16),
            layers_per_block=1,
            norm_num_groups=4,
            latent_channels=VAE_LATENT_CHANNELS,
            sample_size=64,
            scaling_factor=0.3611,
            shift_factor=0.1159,  # set like FLUX.1-dev so the tests can show that it is ignored
            use_quant_conv=False,
            use_post_quant_conv=False,
        )
    return vae.eval()


def save_tiny_hunyuan_vae(folder: str | Path, seed: int = 0) -> Path:
    """Save a tiny Hunyuan video VAE to ``folder/vae``; returns ``folder`` (load with subfolder="vae")."""
    folder = Path(folder)
    build_tiny_hunyuan_vae(seed).save_pretrained(folder / "vae")
    return folder


def save_tiny_flux_vae(folder: str | Path, seed: int = 0) -> Path:
    """Save a tiny FLUX-like image VAE to ``folder/vae``; returns ``folder`` (load with subfolder="vae")."""
    folder = Path(folder)
    build_tiny_flux_vae(seed).save_pretrained(folder / "vae")
    return folder
