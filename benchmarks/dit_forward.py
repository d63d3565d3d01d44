"""DiT forward time: kandinsky5.CrossDiT vs diffusers' Kandinsky5Transformer3DModel.

Both models get the same random weights and inputs; the table reports median wall time per forward
and the ratio ours / diffusers (goal ≤ 0.8). CPU unless --device says otherwise.

    python benchmarks/dit_forward.py [--repeats 5] [--threads 2] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass

import torch

from kandinsky5.config import DiTConfig
from kandinsky5.models import CrossDiT, keeps_fp32


@dataclass(frozen=True)
class Case:
    name: str
    config: DiTConfig
    grid: tuple[int, int, int]  # latent (T, H, W)
    text_len: int


CASES = [
    Case(
        "nano 256d x6, 5x16x16 lat",
        DiTConfig(
            model_dim=256,
            ff_dim=1024,
            time_dim=128,
            num_text_blocks=1,
            num_visual_blocks=6,
            axes_dims=(8, 12, 12),
            in_text_dim=384,
            in_text_dim2=384,
        ),
        (5, 16, 16),
        32,
    ),
    Case(
        "mid 512d x4, 4x32x32 lat",
        DiTConfig(
            model_dim=512,
            ff_dim=2048,
            time_dim=256,
            num_text_blocks=1,
            num_visual_blocks=4,
            axes_dims=(16, 24, 24),
            in_text_dim=1024,
            in_text_dim2=768,
        ),
        (4, 32, 32),
        128,
    ),
    Case(
        "Lite width 1792d x2, 2x32x48",
        DiTConfig(model_dim=1792, ff_dim=7168, time_dim=512, num_text_blocks=1, num_visual_blocks=2),
        (2, 32, 48),
        256,
    ),
]


def reference_model(config: DiTConfig):
    from diffusers import Kandinsky5Transformer3DModel

    c = config
    return Kandinsky5Transformer3DModel(
        in_visual_dim=c.in_visual_dim,
        in_text_dim=c.in_text_dim,
        in_text_dim2=c.in_text_dim2,
        time_dim=c.time_dim,
        out_visual_dim=c.out_visual_dim,
        patch_size=c.patch_size,
        model_dim=c.model_dim,
        ff_dim=c.ff_dim,
        num_text_blocks=c.num_text_blocks,
        num_visual_blocks=c.num_visual_blocks,
        axes_dims=c.axes_dims,
        visual_cond=c.visual_cond,
    )


def cast_like_checkpoint(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """bf16 weights with fp32 time embedding and modulation, as the official checkpoints store them."""
    for name, param in model.named_parameters():
        param.data = param.data.to(torch.float32 if keeps_fp32(name) else dtype)


def median_times(fns, repeats: int) -> list[float]:
    """Median wall time of each function, run interleaved so machine drift hits all alike."""
    times: list[list[float]] = [[] for _ in fns]
    for fn in fns:
        fn()  # warm-up
    for _ in range(repeats):
        for fn, bucket in zip(fns, times, strict=True):
            start = time.perf_counter()
            fn()
            bucket.append(time.perf_counter() - start)
    return [statistics.median(bucket) for bucket in times]


def run_case(case: Case, dtype: torch.dtype, device: str, repeats: int) -> tuple[float, float, float]:
    torch.manual_seed(0)
    c = case.config
    ref = reference_model(c)
    ours = CrossDiT(c)
    state = {k: torch.randn_like(v) * 0.02 for k, v in ref.state_dict().items()}
    ref.load_state_dict(state)
    ours.load_state_dict(state)
    for model in (ref, ours):
        cast_like_checkpoint(model, dtype)
        model.to(device).eval()
    t, h, w = case.grid
    x = torch.randn(1, t, 2 * h, 2 * w, c.visual_embed_dim, device=device, dtype=dtype)
    text = torch.randn(1, case.text_len, c.in_text_dim, device=device, dtype=dtype)
    pooled = torch.randn(1, c.in_text_dim2, device=device, dtype=dtype)
    time_ = torch.tensor([500.0], device=device)
    pos = [torch.arange(n, device=device) for n in case.grid]
    text_pos = torch.arange(case.text_len, device=device)

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    with torch.inference_mode():

        def run_ref():
            ref(
                x,
                text,
                time_,
                pooled,
                visual_rope_pos=pos,
                text_rope_pos=text_pos,
                scale_factor=(1, 2, 2),
                return_dict=False,
            )
            sync()

        def run_ours():
            ours(x, text, pooled, time_, rope_scale=(1, 2, 2))
            sync()

        a = ref(
            x,
            text,
            time_,
            pooled,
            visual_rope_pos=pos,
            text_rope_pos=text_pos,
            scale_factor=(1, 2, 2),
            return_dict=False,
        )
        b = ours(x, text, pooled, time_, rope_scale=(1, 2, 2))
        diff = (a.float() - b.float()).abs().max().item()
        t_ours, t_ref = median_times([run_ours, run_ref], repeats)
    return t_ours, t_ref, diff


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}")
    print(f"{'case':32} {'dtype':9} {'ours ms':>9} {'diffusers ms':>13} {'ratio':>7} {'max|diff|':>10}")
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        for case in CASES:
            t_ours, t_ref, diff = run_case(case, dtype, args.device, args.repeats)
            print(
                f"{case.name:32} {dtype_name:9} {t_ours * 1e3:9.1f} {t_ref * 1e3:13.1f} "
                f"{t_ours / t_ref:7.2f} {diff:10.2e}"
            )


if __name__ == "__main__":
    main()
