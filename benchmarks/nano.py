"""How long nano takes to make a clip on this machine: text → sampler → VAE decode → mp4.

    python benchmarks/nano.py [--runs 3] [--threads N] [--model nano]

Prints a table: loading, then per run the stages of one default generation (the model's own steps,
guidance and size) and saving the mp4, and finally the wall time of the whole command
``kandinsky5 generate PROMPT`` in a fresh process (imports and loading included). The issue's goal is
≤ 10 s for a clip end to end on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

PROMPT = "a red circle moves to the right on a white background"


def _timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--model", default="nano", help="nano or a nano folder")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from kandinsky5.api import Kandinsky5Nano

    model, load_s = _timed(lambda: Kandinsky5Nano.from_pretrained(args.model, variant="nano", device="cpu"))
    stages: dict[str, list[float]] = {"generate (text + sampler + decode)": [], "save mp4": [], "total": []}
    with tempfile.TemporaryDirectory() as tmp:
        for run in range(args.runs):
            video, gen_s = _timed(lambda run=run: model.generate(PROMPT, seed=run, progress=False))
            _, save_s = _timed(lambda run=run, video=video: video.save(Path(tmp) / f"{run}.mp4"))
            stages["generate (text + sampler + decode)"].append(gen_s)
            stages["save mp4"].append(save_s)
            stages["total"].append(gen_s + save_s)
        command = [sys.executable, "-m", "kandinsky5.cli", "generate", PROMPT, "-o", str(Path(tmp) / "cli.mp4")]
        if args.model != "nano":
            command += ["-m", args.model, "--variant", "nano"]
        _, cli_s = _timed(lambda: subprocess.run(command, check=True, capture_output=True))

    d = model.variant.sampling
    print(
        f"nano, {d.num_frames} frames {d.width}x{d.height}, {d.num_inference_steps} steps, guidance "
        f"{d.guidance_scale:g}; torch {torch.__version__}, {torch.get_num_threads()} threads; median of {args.runs}"
    )
    print(f"| stage | seconds |\n|---|---|\n| load (once) | {load_s:.2f} |")
    for name, values in stages.items():
        print(f"| {name} | {statistics.median(values):.2f} |")
    print(f"| `kandinsky5 generate` in a fresh process (import, load, generate, save) | {cli_s:.2f} |")


if __name__ == "__main__":
    main()
