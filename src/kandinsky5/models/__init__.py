"""The Kandinsky 5 networks; depends on torch and einops only.

The kernel dispatcher is ``kandinsky5.models.attention.attention`` (not re-exported: the name would hide
the module).
"""

from .attention import DenseAttention, VisualAttention, dense_attention
from .dit import CrossDiT, keeps_fp32
from .nabla import NablaAttention, visual_attention_for

__all__ = [
    "CrossDiT",
    "DenseAttention",
    "NablaAttention",
    "VisualAttention",
    "dense_attention",
    "keeps_fp32",
    "visual_attention_for",
]
