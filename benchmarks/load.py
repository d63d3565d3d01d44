"""Peak memory and time of ``load_dit`` on a synthetic checkpoint of more than 1 GB.

Writes a Video-Lite-width DiT with 8 visual blocks (about 0.58B parameters, bf16 with fp32 time
embedding and modulation as the official files store them: about 1.3 GB) to a temp folder, then
loads it in a fresh interpreter per method and reports the peak RSS above the interpreter's
baseline (python + torch + kandinsky5 imported) divided by the file size. Goal for ``load_dit`` with
the file's dtypes: ratio <= 1.15, both right after loading and after every weight has been read.

Methods:
  load_dit             ours: meta-device model, tensors mapped from the file (no copy)
  load_dit fp32        ours with dtype=torch.float32: bf16 tensors are upcast (a copy by nature)
  init + load_file     the common way: CrossDiT(config) with random init, then
                       load_state_dict(safetensors.torch.load_file(path))

Numbers are for a warm page cache (the file was just written).

    python benchmarks/load.py [--visual-blocks 8] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from kandinsky5.checkpoint import load_dit, save_dit
from kandinsky5.config import DiTConfig
from kandinsky5.models.dit import CrossDiT

METHODS = ("load_dit", "load_dit fp32", "init + load_file")


def config(visual_blocks: int) -> DiTConfig:
    """Video Lite widths (§3.1) with fewer visual blocks."""
    return DiTConfig(model_dim=1792, ff_dim=7168, time_dim=512, num_text_blocks=2, num_visual_blocks=visual_blocks)


def write_checkpoint(path: Path, cfg: DiTConfig) -> int:
    """Save a random DiT in the official mixed precision; returns its parameter count."""
    with torch.device("meta"):
        model = CrossDiT(cfg).cast_(torch.bfloat16)
    model.to_empty(device="cpu")  # allocate bf16 / fp32 storage directly, no fp32 detour
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.uniform_(-0.02, 0.02, generator=generator)
    save_dit(model, path)
    return sum(p.numel() for p in model.parameters())


def peak_rss_bytes() -> int:
    """Peak RSS of this process image: VmHWM on Linux, else ru_maxrss.

    ru_maxrss survives fork + exec on Linux (a child starts from its parent's peak, here the
    process that wrote the checkpoint), while VmHWM belongs to the exec'd image alone.
    """
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def measure(method: str, path: Path, visual_blocks: int) -> dict[str, float]:
    """Runs in the fresh interpreter: load with ``method``, then read every weight."""
    cfg = config(visual_blocks)
    baseline = peak_rss_bytes()
    start = time.perf_counter()
    if method == "load_dit":
        model = load_dit(path, cfg)
    elif method == "load_dit fp32":
        model = load_dit(path, cfg, dtype=torch.float32)
    else:
        from safetensors.torch import load_file

        model = CrossDiT(cfg)
        model.load_state_dict(load_file(path))
    load_s = time.perf_counter() - start
    after_load = peak_rss_bytes()
    start = time.perf_counter()
    with torch.no_grad():
        checksum = sum(float(p.sum()) for p in model.parameters())  # faults in every page
    touch_s = time.perf_counter() - start
    return {
        "baseline": baseline,
        "after_load": after_load,
        "after_touch": peak_rss_bytes(),
        "load_s": load_s,
        "touch_s": touch_s,
        "checksum": checksum,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--visual-blocks", type=int, default=8)
    parser.add_argument("--dir", type=Path, default=None, help="where the temp checkpoint goes")
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child[0], Path(args.child[1]), args.visual_blocks)))
        return

    with tempfile.TemporaryDirectory(dir=args.dir, prefix="k5-load-bench-") as tmp:
        path = Path(tmp) / "dit.safetensors"
        cfg = config(args.visual_blocks)
        start = time.perf_counter()
        params = write_checkpoint(path, cfg)
        size = path.stat().st_size
        print(
            f"checkpoint: {params / 1e9:.3f}B parameters, {size / 1e9:.3f} GB "
            f"(written in {time.perf_counter() - start:.1f} s), torch {torch.__version__}\n"
        )
        rows = []
        for method in METHODS:
            command = [
                sys.executable,
                __file__,
                "--visual-blocks",
                str(args.visual_blocks),
                "--child",
                method,
                str(path),
            ]
            result = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
            rows.append((method, result))

    header = (
        "method",
        "load s",
        "read-all s",
        "baseline GB",
        "peak after load GB",
        "ratio",
        "peak after read-all GB",
        "ratio",
    )
    table = [header]
    for method, r in rows:
        table.append(
            (
                method,
                f"{r['load_s']:.2f}",
                f"{r['touch_s']:.2f}",
                f"{r['baseline'] / 1e9:.2f}",
                f"{r['after_load'] / 1e9:.2f}",
                f"{(r['after_load'] - r['baseline']) / size:.3f}",
                f"{r['after_touch'] / 1e9:.2f}",
                f"{(r['after_touch'] - r['baseline']) / size:.3f}",
            )
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    print("\nratio = (peak RSS - baseline RSS) / file bytes; goal for load_dit <= 1.15")


if __name__ == "__main__":
    main()
