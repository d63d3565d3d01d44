"""NABLA: neighbourhood-adaptive block-level attention (docs/kandinsky5.md §4).

Visual tokens are re-ordered into 64-token blocks (one frame's 8×8 tile each; the DiT does this when
the attention object says ``fractal = True``). Per layer and per head, each query block then attends
only to

* the key blocks that carry the top ``P`` of its *pooled* attention mass (block-mean q and k,
  softmax over key blocks, "topcdf" threshold), and
* a fixed sliding-tile (STA) neighbourhood of ``wT × wH × wW`` blocks around itself.

This module builds those masks and the ``NablaAttention`` object the DiT receives; the kernels
that compute the block-sparse attention live in ``attention.py``.
"""

from __future__ import annotations

import math

import torch
from einops import rearrange

from ..config import NablaConfig
from .attention import BLOCK, BLOCK_SPARSE_BACKENDS, DenseAttention, VisualAttention, attention

__all__ = [
    "TILE",
    "NablaAttention",
    "adaptive_block_mask",
    "check_fractal_grid",
    "fractal_flatten",
    "fractal_unflatten",
    "nabla_block_mask",
    "sta_mask",
    "visual_attention_for",
]

TILE = 8  # tokens per tile side; a block is one frame's TILE×TILE tile = 64 tokens
MAP_ELEMENTS = 1 << 25  # pooled-map entries per pass of adaptive_block_mask (~0.5 GB with its sort)


# ------------------------------------------------------------------------------- token order


def check_fractal_grid(grid: tuple[int, int, int]) -> None:
    """Token height and width must split into whole tiles (pixel sizes in multiples of 128)."""
    _, h, w = grid
    if h % TILE or w % TILE:
        raise ValueError(
            f"block-sparse attention needs a token grid divisible by {TILE}, got {h}x{w} tokens; "
            f"use a height and width that are multiples of {TILE * 16} pixels"
        )


def fractal_flatten(x: torch.Tensor) -> torch.Tensor:
    """(B, T, H, W, D) → (B, T·H·W, D): blocks in (t, h-tile, w-tile) raster order, each block
    one frame's 8×8 tile in row-major order."""
    check_fractal_grid(tuple(x.shape[1:4]))
    return rearrange(x, "b t (hb p) (wb q) d -> b (t hb wb p q) d", p=TILE, q=TILE)


def fractal_unflatten(x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """Exact inverse of ``fractal_flatten``: (B, S, D) → (B, T, H, W, D)."""
    t, h, w = grid
    return rearrange(x, "b (t hb wb p q) d -> b t (hb p) (wb q) d", t=t, hb=h // TILE, wb=w // TILE, p=TILE, q=TILE)


# ------------------------------------------------------------------------------------ masks


def sta_mask(
    grid_blocks: tuple[int, int, int], window: tuple[int, int, int], device: torch.device | None = None
) -> torch.Tensor:
    """Sliding-tile mask: block (t, h, w) attends (t', h', w') iff |t−t'| ≤ wT//2, |h−h'| ≤ wH//2
    and |w−w'| ≤ wW//2 (official ``fast_sta_nabla``).

    Args:
        grid_blocks: (T, Hb, Wb) blocks per axis; block index t·Hb·Wb + h·Wb + w (fractal order).
        window: (wT, wH, wW), odd sizes in blocks.
    Returns:
        (N, N) bool, N = T·Hb·Wb.
    """

    def near(size: int, width: int) -> torch.Tensor:  # (size, size): |i − j| ≤ width // 2
        i = torch.arange(size, device=device)
        return (i[:, None] - i[None, :]).abs() <= width // 2

    (t, hb, wb), (wt, wh, ww) = grid_blocks, window
    mt, mh, mw = near(t, wt), near(hb, wh), near(wb, ww)
    mask = mt[:, None, None, :, None, None] & mh[None, :, None, None, :, None] & mw[None, None, :, None, None, :]
    return mask.reshape(t * hb * wb, t * hb * wb)  # (T, Hb, Wb, T', Hb', Wb') → (N, N)


def _block_means(x: torch.Tensor) -> torch.Tensor:
    """(B, S, heads, D) → (B, heads, N, D): fp32 mean of each 64-token block."""
    b, s, h, d = x.shape
    return x.reshape(b, s // BLOCK, BLOCK, h, d).mean(2, dtype=torch.float32).transpose(1, 2)


def adaptive_block_mask(q: torch.Tensor, k: torch.Tensor, P: float) -> torch.Tensor:
    """NABLA's adaptive part (official ``nablaT_v2`` without the STA union).

    The block-mean queries and keys give a pooled attention map softmax(qa·kaᵀ / sqrt(D)) per head,
    one distribution over key blocks per query block. Each row keeps the key blocks whose ascending
    cumulative mass reaches 1 − P: the smallest blocks adding up to less than 1 − P are dropped, so
    the kept blocks hold at least P of the row's pooled mass. P = 1 keeps everything; a tiny P keeps
    only each row's most probable block.

    The map is computed in fp32 whatever the input dtype (the official code pools and multiplies in
    bf16; we choose fp32 so a threshold decision does not depend on the compute dtype), a few heads at
    a time so that long videos (Pro HD: 3,660 blocks) do not hold every head's N×N map and sort at once.

    Args:
        q, k: (B, S, heads, D), tokens in fractal order, S a multiple of 64.
        P: kept share of pooled mass, in (0, 1].
    Returns:
        (B, heads, N, N) bool, N = S / 64, True = attend.
    """
    qa, ka = _block_means(q), _block_means(k)  # (B, heads, N, D)
    batch, heads, n, dim = qa.shape
    mask = torch.empty(batch, heads, n, n, dtype=torch.bool, device=q.device)
    step = max(1, MAP_ELEMENTS // (batch * n * n))  # heads per pass
    for h in range(0, heads, step):
        scores = qa[:, h : h + step] @ ka[:, h : h + step].transpose(-1, -2) / math.sqrt(dim)
        ascending, order = torch.softmax(scores, dim=-1).sort(dim=-1)  # (B, step, N, N)
        keep = ascending.cumsum(dim=-1) >= 1.0 - P  # in sorted order
        mask[:, h : h + step] = torch.zeros_like(keep).scatter_(-1, order, keep)  # key-block order
    return mask


def nabla_block_mask(q: torch.Tensor, k: torch.Tensor, sta: torch.Tensor, P: float) -> torch.Tensor:
    """The full NABLA mask: adaptive (B, heads, N, N) OR the (N, N) sliding-tile mask."""
    return adaptive_block_mask(q, k, P) | sta


# ------------------------------------------------------------------------- the VisualAttention


class NablaAttention:
    """NABLA visual self-attention for one generation (one latent token grid).

    Built once per generation; every call (each visual block, each step, both CFG halves) computes
    the adaptive mask from that call's q and k, ORs in the sliding-tile mask built here, and runs
    the block-sparse kernel of ``backend``.

    Args:
        grid: the token grid (T, H, W) after patching; H and W must be multiples of 8.
        config: threshold P and window; the shipped default is P 0.9, window 11×3×3 blocks.
        backend: "auto" (flex on CUDA, cpu-sparse elsewhere), "flex", "cpu-sparse" or
            "masked-dense" (the O(S²) reference).
        record_stats: append the kept-block fraction of every call to ``stats``.
    """

    fractal = True

    def __init__(
        self,
        grid: tuple[int, int, int],
        config: NablaConfig | None = None,
        backend: str = "auto",
        record_stats: bool = False,
    ):
        grid = tuple(int(n) for n in grid)
        check_fractal_grid(grid)
        if backend != "auto" and backend not in BLOCK_SPARSE_BACKENDS:
            raise ValueError(f"unknown NABLA backend {backend!r}; use 'auto' or one of {BLOCK_SPARSE_BACKENDS}")
        self.grid = grid
        self.config = config if config is not None else NablaConfig()
        self.backend = backend
        self.record_stats = record_stats
        self.stats: list[float] = []  # kept-block fraction per call, in call order
        c = self.config
        self.sta = sta_mask((grid[0], grid[1] // TILE, grid[2] // TILE), (c.wT, c.wH, c.wW))  # (N, N)

    def block_mask(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """(B, S, heads, D) q and k → the (B, heads, N, N) NABLA block mask."""
        t, h, w = self.grid
        if q.shape[1] != t * h * w:
            raise ValueError(
                f"NablaAttention was built for a {t}x{h}x{w} token grid ({t * h * w} tokens) but got "
                f"{q.shape[1]} tokens; build one per generation from the latent token grid"
            )
        if self.sta.device != q.device:
            self.sta = self.sta.to(q.device)
        return nabla_block_mask(q, k, self.sta, self.config.P)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """(B, S, heads, D) ×3 in fractal order → (B, S, heads·D)."""
        mask = self.block_mask(q, k)
        if self.record_stats:
            self.stats.append(mask.float().mean().item())  # a device sync, hence opt-in
        return attention(q, k, v, block_mask=mask, backend=self.backend)

    def reset(self) -> None:
        """Forget the recorded stats (e.g. before the next generation)."""
        self.stats.clear()

    def stats_per_layer(self, num_layers: int) -> list[float]:
        """Mean kept-block fraction per visual block, given the DiT's ``num_visual_blocks``.

        Calls arrive layer by layer in every forward, so call i belongs to layer i mod num_layers.
        """
        if not self.stats:
            raise ValueError("no calls recorded; build NablaAttention with record_stats=True")
        if num_layers < 1 or len(self.stats) % num_layers:
            raise ValueError(
                f"recorded {len(self.stats)} calls, not a whole number of forwards of {num_layers} layers; "
                "pass the DiT's num_visual_blocks and record without gradient checkpointing"
            )
        per_layer = torch.tensor(self.stats, dtype=torch.float64).view(-1, num_layers)  # (forwards, layers)
        return per_layer.mean(0).tolist()


def visual_attention_for(
    kind: str,
    grid: tuple[int, int, int],
    nabla: NablaConfig | None = None,
    backend: str = "auto",
) -> VisualAttention | None:
    """The visual self-attention for one generation: switch NABLA on or off for any variant.

    Args:
        kind: "nabla" (block-sparse) or "dense".
        grid: the token grid (T, H, W) of the generation.
        nabla: threshold and window for "nabla"; None = the shipped default (P 0.9, 11×3×3).
        backend: for "nabla" a NABLA backend (see ``NablaAttention``); for "dense" "auto",
            "sdpa", "flash" or "sage".
    Returns:
        A ``NablaAttention``, a ``DenseAttention``, or None (= the DiT's own dense SDPA path).
    """
    if kind == "nabla":
        return NablaAttention(grid, nabla, backend)
    if kind == "dense":
        return None if backend == "sdpa" else DenseAttention(backend)
    raise ValueError(f"attention kind must be 'dense' or 'nabla', got {kind!r}")
