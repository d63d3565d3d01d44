"""Typed, validated configuration records shared by the model, the sampler and the registry.

Every record is a frozen dataclass checked in ``__post_init__``; an error says what to change.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["PREDICTIONS", "DiTConfig", "NablaConfig", "SamplingDefaults"]

PREDICTIONS = ("velocity", "sample")  # what a DiT's output is: ε − x0 (every official checkpoint) or x0


@dataclass(frozen=True)
class NablaConfig:
    """NABLA block-sparse attention settings (docs/kandinsky5.md §4).

    ``P`` is the share of pooled attention mass each query block keeps; ``wT, wH, wW`` is the
    sliding-tile window (in 64-token blocks) always kept around each block.
    """

    P: float = 0.9
    wT: int = 11
    wH: int = 3
    wW: int = 3

    def __post_init__(self) -> None:
        if not 0.0 < self.P <= 1.0:
            raise ValueError(f"NABLA threshold P must be in (0, 1], got {self.P}")
        for name in ("wT", "wH", "wW"):
            value = getattr(self, name)
            if value < 1 or value % 2 == 0:
                raise ValueError(f"NABLA window {name} must be a positive odd number, got {value}")


@dataclass(frozen=True)
class DiTConfig:
    """Architecture of the CrossDiT (the official ``DiffusionTransformer3D``).

    ``visual_cond`` selects the 33-channel input ``[x_t | condition | mask]``: true for every video
    checkpoint (T2V included) and for image editing (official ``instruct_type="channel"``).

    ``prediction`` says what the output means. Every official checkpoint predicts the velocity
    ``ε − x0``; "sample" (the clean latent x0) is nano's: when a patch carries as many numbers as the
    model is wide (nano: 16 channels × 4 × 4 = 256), a velocity network must carry the patch's noise
    through every block, a sample network only the low-dimensional clean content (docs/nano.md).
    """

    model_dim: int = 1792
    ff_dim: int = 7168
    time_dim: int = 512
    num_text_blocks: int = 2
    num_visual_blocks: int = 32
    axes_dims: tuple[int, int, int] = (16, 24, 24)  # RoPE pairs per axis (t, h, w); sum = head_dim
    patch_size: tuple[int, int, int] = (1, 2, 2)
    in_visual_dim: int = 16  # VAE latent channels
    out_visual_dim: int = 16
    in_text_dim: int = 3584  # Qwen2.5-VL-7B hidden size
    in_text_dim2: int = 768  # CLIP ViT-L/14 pooled size
    visual_cond: bool = True
    prediction: str = "velocity"  # or "sample"

    def __post_init__(self) -> None:
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {', '.join(PREDICTIONS)}, got {self.prediction!r}")
        if any(d <= 0 or d % 2 for d in self.axes_dims):
            raise ValueError(f"axes_dims must be positive even numbers (RoPE pairs), got {self.axes_dims}")
        if self.model_dim % self.head_dim:
            raise ValueError(
                f"model_dim {self.model_dim} must be a multiple of head_dim = sum(axes_dims) = {self.head_dim}"
            )
        if self.model_dim % 2:
            raise ValueError(f"model_dim must be even (sinusoidal time embedding), got {self.model_dim}")
        if any(p < 1 for p in self.patch_size):
            raise ValueError(f"patch_size entries must be >= 1, got {self.patch_size}")
        for name in ("ff_dim", "time_dim", "num_visual_blocks", "in_visual_dim", "out_visual_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_text_blocks < 0:
            raise ValueError(f"num_text_blocks must be >= 0, got {self.num_text_blocks}")

    @property
    def head_dim(self) -> int:
        return sum(self.axes_dims)

    @property
    def num_heads(self) -> int:
        return self.model_dim // self.head_dim

    @property
    def visual_embed_dim(self) -> int:
        """Channels entering the patch embedding: 2C + 1 with conditioning, else C."""
        return 2 * self.in_visual_dim + 1 if self.visual_cond else self.in_visual_dim


@dataclass(frozen=True)
class SamplingDefaults:
    """What ``generate`` uses when the caller does not say.

    ``shift`` is the official ``scheduler_scale``; ``rope_scale`` divides the RoPE angles per axis
    (position interpolation: (1, 2, 2) for SD video, (1, 3.16, 3.16) for HD, (1, 1, 1) for images).
    """

    num_inference_steps: int = 50
    guidance_scale: float = 5.0
    shift: float = 5.0
    height: int = 512
    width: int = 768
    num_frames: int = 121
    fps: int = 24
    rope_scale: tuple[float, float, float] = (1.0, 2.0, 2.0)
    negative_prompt: str = ""

    def __post_init__(self) -> None:
        if self.num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {self.num_inference_steps}")
        if self.guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0, got {self.guidance_scale}")
        if self.shift <= 0:
            raise ValueError(f"shift must be > 0, got {self.shift}")
        if self.num_frames < 1 or self.fps < 1:
            raise ValueError(f"num_frames and fps must be >= 1, got {self.num_frames}, {self.fps}")
        if self.height < 1 or self.width < 1:
            raise ValueError(f"height and width must be >= 1, got {self.height}x{self.width}")
        if any(s <= 0 for s in self.rope_scale):
            raise ValueError(f"rope_scale entries must be > 0, got {self.rope_scale}")
