"""The Kandinsky 5 networks; depends on torch and einops only."""

from .attention import VisualAttention, dense_attention
from .dit import CrossDiT, keeps_fp32

__all__ = ["CrossDiT", "VisualAttention", "dense_attention", "keeps_fp32"]
