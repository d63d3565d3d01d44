"""One training step (flow-matching loss, backward, clipping, AdamW) on random weights at real shapes.

Cases: the nano DiT on the CPU (a batch of 17×64×64 clips: 5×16×16 latents), and, with CUDA, the Lite
video DiT width (1792, 32 blocks) on one 256×256×17 clip (a 5×32×32 latent) with bf16 autocast and
gradient checkpointing, trained fully and, when peft is installed, as a rank-32 LoRA. The table gives the
median step time, samples per second and the peak memory: the process's peak RSS on the CPU (it only
grows, so the CPU case runs first) and ``torch.cuda.max_memory_allocated`` on CUDA. A second table times
the AdamW update alone on the nano DiT's parameters on the CPU: torch's default there (a Python loop over
the tensors) against the fused kernel that ``build_optimizer`` picks for CPU parameters.

    python benchmarks/train_step.py [--steps 5] [--threads 2] [--batch 8] [--no-cuda]
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import statistics
import sys
import time
from dataclasses import dataclass

import torch

from kandinsky5.config import DiTConfig
from kandinsky5.nano.recipe import NANO_DIT
from kandinsky5.train.config import TrainConfig
from kandinsky5.train.data import LatentBatch
from kandinsky5.train.trainer import build_model, build_optimizer, micro_batch_loss
from kandinsky5.variants import LITE_VIDEO_DIT

TEXT_TOKENS = 32  # nano's MiniLM length; the Lite models read up to 256 Qwen tokens
LITE_TEXT_TOKENS = 128


@dataclass(frozen=True)
class Case:
    name: str
    dit: DiTConfig
    latent: tuple[int, int, int]  # (T, H, W) latent grid
    batch: int
    text_tokens: int
    device: str
    lora_rank: int = 0


def _batch(case: Case) -> LatentBatch:
    g = torch.Generator().manual_seed(0)
    c = case.dit
    b, (t, h, w) = case.batch, case.latent
    return LatentBatch(
        keys=tuple(f"s{i}" for i in range(b)),
        latent=torch.randn(b, t, h, w, c.in_visual_dim, generator=g),
        tokens=torch.randn(b, case.text_tokens, c.in_text_dim, generator=g),
        mask=torch.ones(b, case.text_tokens, dtype=torch.bool),
        pooled=torch.randn(b, c.in_text_dim2, generator=g),
    )


def _config(case: Case) -> TrainConfig:
    values = dict(model=case.dit, init="random", device=case.device, gradient_checkpointing=case.device == "cuda")
    if case.lora_rank:
        values["lora_rank"] = case.lora_rank
    return TrainConfig(**values)


def _peak_rss_mib() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def run(case: Case, steps: int) -> dict[str, float | str]:
    """Median seconds per optimizer step over ``steps`` timed steps (after one warm-up step)."""
    device = torch.device(case.device)
    config = _config(case)
    torch.manual_seed(0)
    model = build_model(config, device)
    optimizer = build_optimizer(model, config)
    batch, generator = _batch(case), torch.Generator().manual_seed(0)
    params = [p for p in model.parameters() if p.requires_grad]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(steps + 1):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        micro_batch_loss(model, batch, generator, config, device).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:  # the first step allocates the optimizer state and warms the kernels up
            times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    if device.type == "cuda":
        memory = f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB (CUDA)"
    else:
        memory = f"{_peak_rss_mib():.0f} MiB (RSS)"
    trainable = sum(p.numel() for p in params) / 1e6
    del model, optimizer
    return {"seconds": seconds, "samples_per_s": case.batch / seconds, "memory": memory, "trainable_m": trainable}


def adamw_update_ms(fused: bool, steps: int) -> float:
    """Median milliseconds of one AdamW ``step()`` on the nano DiT's CPU parameters (random gradients)."""
    torch.manual_seed(0)
    params = [p for p in build_model(TrainConfig(model=NANO_DIT, init="random"), torch.device("cpu")).parameters()]
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=fused or None)
    optimizer.step()  # allocates the state
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8, help="nano clips per step")
    parser.add_argument("--no-cuda", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    cases = [Case("nano, 17x64x64 clips", NANO_DIT, (5, 16, 16), args.batch, TEXT_TOKENS, "cpu")]
    if torch.cuda.is_available() and not args.no_cuda:
        lite = dataclasses.replace(LITE_VIDEO_DIT, visual_cond=False)
        cases.append(Case("Lite full, 256x256x17", lite, (5, 32, 32), 1, LITE_TEXT_TOKENS, "cuda"))
        try:
            import peft  # noqa: F401

            cases.append(Case("Lite LoRA r32, 256x256x17", lite, (5, 32, 32), 1, LITE_TEXT_TOKENS, "cuda", 32))
        except ImportError:
            print("peft is not installed: no LoRA case")

    print(f"{'case':<28} {'device':>6} {'trainable':>10} {'s/step':>8} {'samples/s':>10} {'peak memory':>20}")
    for case in cases:
        r = run(case, args.steps)
        print(
            f"{case.name:<28} {case.device:>6} {r['trainable_m']:>9.1f}M {r['seconds']:>8.3f} "
            f"{r['samples_per_s']:>10.2f} {r['memory']:>20}"
        )
    default, fused = (adamw_update_ms(f, 4 * args.steps) for f in (False, True))
    print(f"\n{'AdamW update, nano DiT (CPU)':<28} {'default':>10} {'fused':>10} {'ratio':>8}")
    print(f"{'':<28} {default:>8.1f}ms {fused:>8.1f}ms {fused / default:>8.2f}")


if __name__ == "__main__":
    main()
