"""Text conditioning: Qwen2.5-VL token states and the CLIP pooled vector (docs/kandinsky5.md §6).

A prompt becomes three tensors (:class:`TextEmbeddings`):

- ``tokens``: the caption wrapped in a chat template, run through the Qwen2.5-VL language model; the
  final (post-norm) hidden states with the template prefix cropped off, padded to a fixed length;
- ``mask``: which of those positions hold real tokens (the caption and its closing ``<|im_end|>``);
- ``pooled``: CLIP ViT-L/14's ``pooler_output`` for the raw caption (no template, no projection).

Only the language model of Qwen2.5-VL is loaded for text-only tasks; the vision tower joins it when the
image-editing template is requested (the source image is part of the prompt there).
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F

from kandinsky5.devices import parse_dtype, resolve_device

if TYPE_CHECKING:
    from kandinsky5.variants import TextEncoderSpec

__all__ = [
    "CLIP_MAX_LENGTH",
    "DEFAULT_MAX_LENGTH",
    "OFFICIAL_CROP_START",
    "TEMPLATES",
    "TemplateKind",
    "TextEmbeddings",
    "TextEncoder",
    "template_crop_start",
]

logger = logging.getLogger(__name__)

TemplateKind = Literal["video", "image", "image_edit", "image2video"]

# --------------------------------------------------------------------------------------------------
# Templates (§6.1). The typos "promt" and "scren" are part of the data the models were trained on.
# --------------------------------------------------------------------------------------------------

_VIDEO_RULES = (
    "Describe how the camera moves or shakes, describe the zoom and view angle, whether it follows the objects.",
    "Describe the dynamism of the video and presented actions.",
    "Name the visual style of the video: whether it is a professional footage, user generated content, "
    "some kind of animation, video game or scren content.",
    "Describe the visual effects, postprocessing and transitions if they are presented in the video.",
    "Pay attention to the order of key actions shown in the scene.<|im_end|>",
)

TEMPLATES: dict[str, str] = {
    # T2V and I2V (I2V uses this one too).
    "video": "\n".join(
        (
            "<|im_start|>system\nYou are a promt engineer. Describe the video in detail.",
            _VIDEO_RULES[0],
            "Describe the location of the video, main characters or objects and their action.",
            *_VIDEO_RULES[1:],
            "<|im_start|>user\n{}<|im_end|>",
        )
    ),
    # T2I (and a video model asked for a single frame).
    "image": "\n".join(
        (
            "<|im_start|>system\nYou are a promt engineer. Describe the image by detailing the color, shape, "
            "size, texture, quantity, text, spatial relationships of the objects and background:<|im_end|>",
            "<|im_start|>user\n{}<|im_end|>",
        )
    ),
    # I2I: the caption is followed by one image block and <|im_end|> (see _EDIT_SUFFIX).
    "image_edit": "\n".join(
        (
            "<|im_start|>system\nYou are a promt engineer. Based on the provided source image (first image) "
            "and target image (second image), create an interesting text prompt that can be used together "
            "with the source image to create the target image:<|im_end|>",
            "<|im_start|>user\n{}",
        )
    ),
    # Defined by the official code but used by no pipeline (I2V uses "video"); kept for completeness.
    "image2video": "\n".join(
        (
            "<|im_start|>system\nYou are a promt engineer. Your task is to create a highly detailed and "
            "effective video description based on a provided input image.",
            _VIDEO_RULES[0],
            "Describe main characters actions.",
            *_VIDEO_RULES[1:],
            "<|im_start|>user\n{}<|im_end|>",
        )
    ),
}

# Template prefix lengths in Qwen2.5-VL tokens, as hard-coded by the official code. We compute the
# prefix length with the tokenizer actually loaded and compare (see template_crop_start).
OFFICIAL_CROP_START: dict[str, int] = {"video": 129, "image": 41, "image_edit": 55, "image2video": 132}

# Padded token counts after the crop (§6.1): 256 for video, 512 for image models. Editing has no fixed
# length: the prompt carries the image tokens and is padded to the longest prompt of the batch only.
DEFAULT_MAX_LENGTH: dict[str, int | None] = {
    "video": 256,
    "image": 512,
    "image_edit": None,
    "image2video": 256,
}

CLIP_MAX_LENGTH = 77

IM_END = "<|im_end|>"
IMAGE_PAD = "<|image_pad|>"
_EDIT_SUFFIX = "<|vision_start|>" + IMAGE_PAD + "<|vision_end|>" + IM_END

# The Qwen2.5 vocabulary: 151643 BPE tokens, then <|endoftext|>, <|im_start|>, <|im_end|>, ...
_QWEN_BASE_VOCAB = 151643
_QWEN_IM_START_ID = 151644


# --------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------


@dataclass
class TextEmbeddings:
    """Encoded prompts.

    tokens: (B, L, D) Qwen2.5-VL final hidden states after the template crop (D = 3584 for the 7B model),
        in the language model's dtype; positions past the prompt are padding.
    mask: (B, L) bool, True for real tokens (caption + ``<|im_end|>``), False for padding. Padding is
        always on the right.
    pooled: (B, P) CLIP pooled text vector (P = 768 for ViT-L/14), in the CLIP model's dtype (fp32).
    """

    tokens: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor

    def __post_init__(self) -> None:
        if self.tokens.ndim != 3 or self.mask.shape != self.tokens.shape[:2] or self.mask.dtype != torch.bool:
            raise ValueError(
                f"expected tokens (B, L, D) and a bool mask (B, L), got {tuple(self.tokens.shape)} and "
                f"{tuple(self.mask.shape)} {self.mask.dtype}"
            )
        if self.pooled.ndim != 2 or self.pooled.shape[0] != self.tokens.shape[0]:
            raise ValueError(f"expected pooled (B, P) with B={self.tokens.shape[0]}, got {tuple(self.pooled.shape)}")


# --------------------------------------------------------------------------------------------------
# Template crop
# --------------------------------------------------------------------------------------------------


def _is_qwen25_tokenizer(tokenizer) -> bool:
    """True for the real Qwen2.5 vocabulary (where the official crop constants apply)."""
    return tokenizer.vocab_size == _QWEN_BASE_VOCAB and (
        tokenizer.convert_tokens_to_ids("<|im_start|>") == _QWEN_IM_START_ID
    )


def template_crop_start(tokenizer, template: TemplateKind) -> int:
    """Number of tokens the template puts before the caption: the positions cropped off the output.

    Computed as the token count of the template text before ``{}``. For the real Qwen2.5 tokenizer the
    official code hard-codes these numbers (``OFFICIAL_CROP_START``: 129 / 41 / 55 / 132); there we
    return the official number, which is what the checkpoints were trained with, and log a warning if
    our count disagrees (a changed tokenizer, or an official miscount). Any other tokenizer, such as a
    tiny test tokenizer, gets the computed count.
    """
    prefix = TEMPLATES[template].split("{}")[0]
    computed = len(tokenizer(prefix, add_special_tokens=False)["input_ids"])
    if not _is_qwen25_tokenizer(tokenizer):
        return computed
    official = OFFICIAL_CROP_START[template]
    if computed != official:
        logger.warning(
            "the %r template prefix is %d tokens with this tokenizer, but the official code crops %d; "
            "using %d as the checkpoints were trained with it",
            template,
            computed,
            official,
            official,
        )
    return official


def _check_template(template: str) -> None:
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; choose one of {', '.join(TEMPLATES)}")


def _downscale_by_two(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) uint8 → (B, 3, H//2, W//2) uint8: bilinear with antialiasing, rounded.

    This is what torchvision's ``F.resize`` (the official call) does on a uint8 tensor; its native uint8
    kernel may round a few pixels to the neighbouring level.
    """
    half = F.interpolate(
        images.float(),
        size=(images.shape[-2] // 2, images.shape[-1] // 2),
        mode="bilinear",
        align_corners=False,
        antialias=True,
    )
    return half.round().clamp(0, 255).to(torch.uint8)


# --------------------------------------------------------------------------------------------------
# Encoder
# --------------------------------------------------------------------------------------------------


class TextEncoder:
    """Qwen2.5-VL + CLIP text encoders → :class:`TextEmbeddings`.

    ``qwen`` is either a ``Qwen2_5_VLTextModel`` (text-only templates) or a ``Qwen2_5_VLModel`` (needed
    for ``image_edit``, whose prompt contains the source image); ``image_processor`` is required only
    for the latter. Both models are used frozen, in eval mode.
    """

    def __init__(self, qwen, tokenizer, clip, clip_tokenizer, image_processor=None) -> None:
        self.qwen = qwen.eval().requires_grad_(False)
        self.clip = clip.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.clip_tokenizer = clip_tokenizer
        self.image_processor = image_processor
        # The fixed-offset crop needs right padding (and right truncation keeps the template prefix);
        # the official code relied on the tokenizer defaults. We set them explicitly.
        for tok in (tokenizer, clip_tokenizer):
            tok.padding_side = "right"
            tok.truncation_side = "right"
        self._crop: dict[str, int] = {}

    # ---------------------------------------------------------------------------------- loading

    @classmethod
    def from_pretrained(
        cls,
        qwen_path_or_id: str = "Qwen/Qwen2.5-VL-7B-Instruct",
        clip_path_or_id: str = "openai/clip-vit-large-patch14",
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        clip_dtype: torch.dtype | str = torch.float32,
        templates: Iterable[TemplateKind] = ("video", "image"),
        qwen_tokenizer: str | None = None,
        clip_tokenizer: str | None = None,
    ) -> TextEncoder:
        """Load both encoders from Hub ids or local folders.

        Tokenizers come from the model folders unless ``qwen_tokenizer`` / ``clip_tokenizer`` name
        other folders (the diffusers layout keeps them in ``tokenizer/`` and ``tokenizer_2/``).

        ``templates`` says which prompt kinds will be encoded. Text-only kinds load just the Qwen language
        model and tokenizer (no vision tower, no LM head: 7.1 of the checkpoint's 8.3 B parameters);
        ``"image_edit"`` also loads the vision tower and the image processor. ``dtype`` is the Qwen
        dtype (default: bf16 on accelerators, fp32 on CPU); CLIP stays fp32 like the official code.
        """
        from transformers import (
            AutoImageProcessor,
            AutoTokenizer,
            CLIPTextModel,
            Qwen2_5_VLModel,
            Qwen2_5_VLTextModel,
        )

        templates = tuple(templates)
        for template in templates:
            _check_template(template)
        device = resolve_device(device)
        dtype = parse_dtype(dtype, device)
        clip_dtype = parse_dtype(clip_dtype, device)

        if "image_edit" in templates:
            # The whole multimodal base model. Its class-specific key conversion maps the checkpoint's
            # legacy layout (model.* / visual.*) onto language_model.* / visual.*; only lm_head is unused.
            qwen, info = Qwen2_5_VLModel.from_pretrained(qwen_path_or_id, dtype=dtype, output_loading_info=True)
            # The official code asks for the fast (torchvision) processor; without torchvision we use the
            # PIL one, whose bicubic resize differs slightly.
            backend = "torchvision" if importlib.util.find_spec("torchvision") else "pil"
            processor_path = qwen_tokenizer or qwen_path_or_id
            image_processor = AutoImageProcessor.from_pretrained(processor_path, backend=backend)
        else:
            # Just the decoder. The checkpoint stores it under "model." (the base-model prefix), which
            # from_pretrained strips; the vision tower and the LM head are skipped.
            qwen, info = Qwen2_5_VLTextModel.from_pretrained(qwen_path_or_id, dtype=dtype, output_loading_info=True)
            image_processor = None
        if info["missing_keys"]:
            raise RuntimeError(
                f"{qwen_path_or_id}: the Qwen2.5-VL checkpoint lacks {len(info['missing_keys'])} weights of "
                f"{type(qwen).__name__}, e.g. {sorted(info['missing_keys'])[:3]}"
            )
        tokenizer = AutoTokenizer.from_pretrained(qwen_tokenizer or qwen_path_or_id)

        clip, clip_info = CLIPTextModel.from_pretrained(clip_path_or_id, dtype=clip_dtype, output_loading_info=True)
        if clip_info["missing_keys"]:
            raise RuntimeError(
                f"{clip_path_or_id}: the CLIP checkpoint lacks {len(clip_info['missing_keys'])} text-model "
                f"weights, e.g. {sorted(clip_info['missing_keys'])[:3]}"
            )
        clip_tok = AutoTokenizer.from_pretrained(clip_tokenizer or clip_path_or_id)
        return cls(qwen.to(device), tokenizer, clip.to(device), clip_tok, image_processor)

    @classmethod
    def from_spec(
        cls,
        spec: TextEncoderSpec,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
    ) -> TextEncoder:
        """Load the encoders a variant names (``variant.text``), for its template."""
        return cls.from_pretrained(
            spec.qwen_repo_id, spec.clip_repo_id, device=device, dtype=dtype, templates=(spec.template,)
        )

    # ---------------------------------------------------------------------------------- encoding

    def crop_start(self, template: TemplateKind) -> int:
        """Template prefix length in tokens for this tokenizer (cached); see :func:`template_crop_start`."""
        _check_template(template)
        if template not in self._crop:
            self._crop[template] = template_crop_start(self.tokenizer, template)
        return self._crop[template]

    @torch.no_grad()
    def encode(
        self,
        prompts: str | Sequence[str],
        template: TemplateKind = "video",
        max_length: int | None = None,
        images: torch.Tensor | None = None,
    ) -> TextEmbeddings:
        """Encode ``prompts`` as the official pipelines do.

        Text templates: ``template.format(prompt)`` is tokenized to ``max_length + crop_start`` tokens
        (truncated, right-padded), the language model sees ``input_ids`` only (plain causal attention, as
        in the official code: with right padding no real token can attend to a pad, so the pads do not
        change the real tokens' states), and the first ``crop_start`` positions of the final hidden
        states and of the attention mask are dropped → tokens (B, max_length, D), mask (B, max_length).
        ``max_length`` defaults to 256 for video and 512 for image templates.

        ``image_edit``: ``images`` is the source image per prompt, (B, 3, H, W) uint8, at the target
        resolution. It is downscaled by 2 and becomes the image block after the caption; the prompts are
        padded to the longest one only, and the model gets ids, mask, pixels and grid sizes.

        CLIP sees the raw prompt (77 tokens, truncated, padded) and contributes ``pooler_output``.
        """
        _check_template(template)
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompts must be a string or a non-empty list of strings")
        if template == "image_edit":
            if images is None:
                raise ValueError("the 'image_edit' template needs the source images (images=...)")
            if max_length is not None:
                raise ValueError("the 'image_edit' template has no fixed max_length; leave it None")
            tokens, mask = self._encode_edit(prompts, images)
        else:
            if images is not None:
                raise ValueError(f"images are only used by the 'image_edit' template, not {template!r}")
            max_length = DEFAULT_MAX_LENGTH[template] if max_length is None else max_length
            if max_length < 1:
                raise ValueError(f"max_length must be >= 1, got {max_length}")
            tokens, mask = self._encode_text(prompts, template, max_length)
        return TextEmbeddings(tokens=tokens, mask=mask, pooled=self.encode_pooled(prompts))

    def _encode_text(self, prompts: list[str], template: str, max_length: int) -> tuple[torch.Tensor, ...]:
        crop = self.crop_start(template)
        batch = self.tokenizer(
            [TEMPLATES[template].format(p) for p in prompts],
            max_length=max_length + crop,
            truncation=True,
            padding="max_length",
            padding_side="right",
            return_tensors="pt",
        )
        input_ids = batch["input_ids"].to(self.qwen.device)
        hidden = self.qwen(input_ids=input_ids).last_hidden_state  # (B, crop + L, D), after the final norm
        return hidden[:, crop:], batch["attention_mask"][:, crop:].to(hidden.device, torch.bool)

    def _encode_edit(self, prompts: list[str], images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.image_processor is None or not hasattr(self.qwen, "visual"):
            raise ValueError("this TextEncoder has no vision tower; load it with templates=(..., 'image_edit')")
        if images.ndim != 4 or images.shape[:2] != (len(prompts), 3) or images.dtype != torch.uint8:
            raise ValueError(
                f"images must be a uint8 tensor (B, 3, H, W) with B = {len(prompts)} prompts, got "
                f"{images.dtype} {tuple(images.shape)}"
            )
        vision = self.image_processor(images=list(_downscale_by_two(images.cpu())), return_tensors="pt")
        grid = vision["image_grid_thw"]  # (B, 3): patches along t, h, w
        # What the Qwen2.5-VL processor does: one <|image_pad|> per merged patch group.
        per_image = (grid.prod(-1) // self.image_processor.merge_size**2).tolist()
        texts = [
            TEMPLATES["image_edit"].format(p) + _EDIT_SUFFIX.replace(IMAGE_PAD, IMAGE_PAD * n)
            for p, n in zip(prompts, per_image, strict=True)
        ]
        batch = self.tokenizer(texts, padding=True, padding_side="right", return_tensors="pt")
        device = self.qwen.device
        input_ids = batch["input_ids"].to(device)
        image_token_id = self.tokenizer.convert_tokens_to_ids(IMAGE_PAD)
        hidden = self.qwen(
            input_ids=input_ids,
            attention_mask=batch["attention_mask"].to(device),
            pixel_values=vision["pixel_values"].to(device, self.qwen.dtype),
            image_grid_thw=grid.to(device),
            mm_token_type_ids=(input_ids == image_token_id).int(),  # 1 marks image tokens (3D RoPE)
        ).last_hidden_state
        crop = self.crop_start("image_edit")
        return hidden[:, crop:], batch["attention_mask"][:, crop:].to(device, torch.bool)

    @torch.no_grad()
    def encode_pooled(self, prompts: str | Sequence[str]) -> torch.Tensor:
        """CLIP ``pooler_output`` (B, P) for the raw prompts: final-LN state at the end-of-text token."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        batch = self.clip_tokenizer(
            prompts,
            max_length=CLIP_MAX_LENGTH,
            truncation=True,
            padding="max_length",
            padding_side="right",
            return_tensors="pt",
        ).to(self.clip.device)
        return self.clip(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).pooler_output

    # ---------------------------------------------------------------------------------- placement

    def to(self, device: torch.device | str) -> TextEncoder:
        """Move both models to ``device`` (dtypes unchanged)."""
        self.qwen.to(device)
        self.clip.to(device)
        return self
