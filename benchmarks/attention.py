"""NABLA on the CPU: block-sparse attention time against dense SDPA.

Part 1, the kernel: one attention call, batch 1, 8 heads of 64, fp32, over a synthetic block mask with
NABLA's structure (a sliding-tile window plus random adaptive blocks per head and row) at ~10 % of
blocks kept. "nabla" = building the adaptive mask from q and k (the per-call cost NABLA always pays)
+ the cpu-sparse kernel on the synthetic mask; the ratio is nabla / dense (goal ≤ 0.15 at 16k).
With --flex, compiled flex_attention on the same mask is timed too (the compile, ~15-60 s, is not).

Part 2, end to end: one forward of a small CrossDiT (256 wide, 4 heads of 64, 2 visual blocks) on a
10 s-shaped token grid (16×32×48 tokens), dense against NablaAttention. The weights are random, so
the pooled attention maps are flat and P = 0.9 keeps most blocks; trained models concentrate their
attention (that is what NABLA exploits), which the low-P row imitates.

Runs are interleaved (dense, nabla, dense, ...) and the best of each is reported.

    python benchmarks/attention.py [--threads N] [--repeats 3] [--skip-32k] [--skip-dit] [--flex]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch

from kandinsky5.config import DiTConfig, NablaConfig
from kandinsky5.models import CrossDiT, dense_attention
from kandinsky5.models.attention import BLOCK, _flex_attention, block_sparse_attention
from kandinsky5.models.nabla import TILE, NablaAttention, adaptive_block_mask, sta_mask

HEADS, HEAD_DIM, DENSITY = 8, 64, 0.10
# name, token grid (T, H, W), sliding-tile window in blocks
KERNEL_CASES = [
    ("4k", (4, 32, 32), (1, 3, 3)),
    ("16k", (16, 32, 32), (3, 3, 3)),
    ("32k", (32, 32, 32), (3, 3, 3)),
]


def interleaved_best(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Best wall time of each function, run in turn ``repeats`` times after one warm-up each.

    The minimum, not the median: on a shared machine the other jobs only ever add time, and the
    block-sparse kernel (more memory-bound, many more parallel regions) loses more to them than dense
    SDPA, so medians measure the neighbours as much as the kernels.
    """
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: min(values) for name, values in times.items()}


def synthetic_mask(grid: tuple[int, int, int], window: tuple[int, int, int], gen: torch.Generator) -> torch.Tensor:
    """(1, heads, N, N): the sliding-tile mask plus random blocks per (head, row), DENSITY kept overall."""
    sta = sta_mask((grid[0], grid[1] // TILE, grid[2] // TILE), window)  # (N, N)
    n = sta.shape[0]
    fill = ((DENSITY * n - sta.sum(-1, keepdim=True)) / (n - sta.sum(-1, keepdim=True))).clamp(0, 1)  # (N, 1)
    extra = torch.rand(HEADS, n, n, generator=gen) < fill
    return (sta | extra)[None]


def kernel_case(grid: tuple[int, int, int], window: tuple[int, int, int], repeats: int, flex: bool) -> str:
    """One table row: dense SDPA against mask building + cpu-sparse (and compiled flex) on a
    synthetic ~10 % mask."""
    gen = torch.Generator().manual_seed(0)
    seq = grid[0] * grid[1] * grid[2]
    q, k, v = (torch.randn(1, seq, HEADS, HEAD_DIM, generator=gen) for _ in range(3))
    mask = synthetic_mask(grid, window, gen)
    fns = {
        "dense": lambda: dense_attention(q, k, v),
        "mask": lambda: adaptive_block_mask(q, k, 0.9),
        "sparse": lambda: block_sparse_attention(q, k, v, mask),
    }
    if flex:
        fns["flex"] = lambda: _flex_attention(q, k, v, mask)
    best = interleaved_best(fns, repeats)
    ratio = (best["mask"] + best["sparse"]) / best["dense"]
    row = (
        f"{seq:>7} {'x'.join(map(str, grid)):>10} {mask.float().mean().item():>6.1%} {best['dense']:>8.3f} "
        f"{best['mask']:>7.3f} {best['sparse']:>9.3f} {ratio:>12.3f}"
    )
    if flex:
        row += f" {best['flex']:>7.3f} {(best['mask'] + best['flex']) / best['dense']:>11.3f}"
    return row


def kernel_table(repeats: int, skip_32k: bool, flex: bool) -> None:
    print(f"\nkernel: batch 1, {HEADS} heads x {HEAD_DIM}, fp32, ~{DENSITY:.0%} of blocks kept")
    header = f"{'tokens':>7} {'grid':>10} {'kept':>6} {'dense s':>8} {'mask s':>7} {'sparse s':>9} {'nabla/dense':>12}"
    if flex:
        header += f" {'flex s':>7} {'flex/dense':>11}"
    print(header)
    print("-" * len(header))
    for name, grid, window in KERNEL_CASES:
        if not (skip_32k and name == "32k"):
            print(kernel_case(grid, window, repeats, flex), flush=True)


def dit_table(repeats: int) -> None:
    config = DiTConfig(
        model_dim=256,
        ff_dim=1024,
        time_dim=128,
        num_text_blocks=1,
        num_visual_blocks=2,
        axes_dims=(16, 24, 24),
        in_text_dim=384,
        in_text_dim2=384,
    )
    model = CrossDiT(config, round_qk_to_bf16=False).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # random weights everywhere: the official init zeroes the gates
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) / param.shape[-1] ** 0.5)
    latent = (16, 64, 96)  # (T, H, W) latents → 16×32×48 tokens after the 1×2×2 patch
    grid = (latent[0], latent[1] // 2, latent[2] // 2)
    x = torch.randn(1, *latent, config.visual_embed_dim, generator=gen)
    text = torch.randn(1, 32, config.in_text_dim, generator=gen)
    pooled = torch.randn(1, config.in_text_dim2, generator=gen)
    time_ = torch.tensor([500.0])
    runs = {
        "dense": None,
        "nabla P=0.9 11x3x3": NablaAttention(grid, NablaConfig(P=0.9), "cpu-sparse", record_stats=True),
        "nabla P=0.2 11x3x3": NablaAttention(grid, NablaConfig(P=0.2), "cpu-sparse", record_stats=True),
    }

    def forward(attention):
        def run():
            with torch.no_grad():
                model(x, text, pooled, time_, visual_attention=attention)

        return run

    best = interleaved_best({name: forward(att) for name, att in runs.items()}, repeats)
    seq = grid[0] * grid[1] * grid[2]
    print(
        f"\nCrossDiT forward: 256 wide, {config.num_heads} heads x {config.head_dim}, "
        f"{config.num_visual_blocks} visual blocks, {'x'.join(map(str, grid))} tokens ({seq}), batch 1, fp32"
    )
    header = f"{'attention':<20} {'kept':>6} {'forward s':>10} {'vs dense':>9}"
    print(header)
    print("-" * len(header))
    for name, attention in runs.items():
        kept = "100%" if attention is None else f"{statistics.mean(attention.stats):.1%}"
        print(f"{name:<20} {kept:>6} {best[name]:>10.3f} {best[name] / best['dense']:>9.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-32k", action="store_true", help="leave out the 32k-token case")
    parser.add_argument("--skip-dit", action="store_true", help="leave out the end-to-end DiT table")
    parser.add_argument("--flex", action="store_true", help="also time compiled flex_attention (needs a C++ compiler)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"torch {torch.__version__}, CPU, {torch.get_num_threads()} threads, block {BLOCK} tokens, load {load}")
    kernel_table(args.repeats, args.skip_32k, args.flex)
    if not args.skip_dit:
        dit_table(args.repeats)


if __name__ == "__main__":
    main()
