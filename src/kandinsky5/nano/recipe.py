"""The nano recipe: train nano from scratch (VAE, latent cache, DiT) and export it in the diffusers layout.

    python -m kandinsky5.nano.recipe OUT_DIR [--quick] [--vae-steps N] [--dit-steps N] [--clips N] [--dit-processes N]

Five stages, each resumable, the whole run a function of ``--seed`` (docs/nano.md, "Training nano"):

a. ``OUT_DIR/vae``: the causal video VAE (:func:`kandinsky5.nano.vae_training.train_vae`); a finished
   one with the same settings is reused.
b. ``OUT_DIR/cache``: the latent cache of the project trainer (:func:`kandinsky5.train.build_cache`) for
   N world clips and N/4 still images of the train split (images are 1-frame clips, for T2I). Every
   ``i2v_every``-th clip also stores the latent of its first frame, so the trainer runs the I2V path on
   that share of the data; every ``uncond_every``-th sample gets the empty prompt, so CFG has a trained
   unconditional branch. Shards already written are reused.
b2. ``OUT_DIR/decoder``: the VAE's decoder alone, fine-tuned on whole clips and images from posterior
   means (:data:`kandinsky5.nano.vae_training.DECODER_FINETUNE`). The encoder, so the latent space of
   the cache, does not change; the exported VAE is this one.
c. ``OUT_DIR/dit``: the project trainer (:func:`kandinsky5.train.train`) on a from-scratch
   :data:`NANO_DIT`, with timesteps shifted towards noise (``timestep_shift`` 3: with shift 1 only ~1.4 %
   of the samples have t > 0.9, where the object must come from the text; docs/nano.md) and an EMA of the
   weights, which is what it exports. It resumes from its latest checkpoint by itself. It runs as
   ``dit_processes`` one-thread DDP ranks (gloo) spawned by the recipe: on 2 cores two such ranks train
   ~1.5x faster than one process with two threads (measured), and N ranks follow the trajectory of one
   process.
d. ``OUT_DIR/nano``: ``transformer/`` (:func:`kandinsky5.checkpoint.save_dit`, diffusers layout) and
   ``vae/`` (diffusers ``save_pretrained``), written beside and renamed into place.

Latents are cached as the posterior *mean* (``sample=False``), not a sample: the cache holds one
encoding per clip for the whole run, so a sample would be one frozen draw of noise, not an augmentation,
and would only blur the targets. (``kandinsky5.train.encode`` samples, like the official code does.)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..atomic import atomic_write, atomic_write_folder, write_json_durable
from ..config import DiTConfig
from ..media import vae_input_from_frames
from ..variants import NANO_DIT, NANO_ROPE_SCALE, NANO_SHIFT
from .vae_training import DECODER_BATCH, DECODER_FINETUNE, VaeReport, train_vae

__all__ = [
    "NANO_DIT",
    "QUICK",
    "RecipeReport",
    "RecipeSettings",
    "build_nano_cache",
    "dit_train_config",
    "train_dit",
    "export_nano",
    "main",
    "run_recipe",
    "settings_from_args",
    "summary_lines",
]

logger = logging.getLogger(__name__)

MAX_EXPORT_BYTES = 50_000_000  # what the package may hold for nano (DiT + VAE)
# The trainer has no caption dropout, so some items are cached with the empty prompt instead: they train
# the unconditional velocity that classifier-free guidance pushes away from (negative_prompt ""). The
# cache skips blank captions, hence a marker that encode_text turns into "".
UNCONDITIONAL = "<empty prompt>"
NANO_DIR, SOURCE = "nano", "source.json"


@dataclass(frozen=True)
class RecipeSettings:
    """Step counts, data size and optimisation of one recipe run (defaults: the full run, under 3 h on 2 cores)."""

    seed: int = 0
    # --- VAE -----------------------------------------------------------------------------------------
    vae_steps: int = 4000
    vae_batch_size: int = 4  # crops per step; full-clip steps take 2 clips
    decoder_steps: int = 1200  # stage b2: the decoder alone on whole clips, from posterior means
    # --- data ----------------------------------------------------------------------------------------
    clips: int = 4000  # world clips (17×64×64) in the cache
    images: int | None = None  # still images in the cache; None = clips // 4
    i2v_every: int = 4  # every n-th clip also stores its first-frame latent (trained as I2V)
    uncond_every: int = 10  # every n-th clip and image is stored with the empty prompt (CFG's negative)
    shard_size: int = 256
    # --- DiT (kandinsky5.train) ----------------------------------------------------------------------
    dit_steps: int = 22000
    dit_batch_size: int = 16  # per sample seen, 16 learns faster than 32 (docs/nano.md)
    dit_lr: float = 3e-3  # at 128 wide, 3e-3 beat 1.5e-3 and 5e-4 (docs/nano.md)
    dit_warmup_steps: int = 200  # capped at a tenth of the steps
    timestep_shift: float = NANO_SHIFT  # towards noise, where the layout is decided (docs/nano.md)
    dit_ema_decay: float | None = 0.999  # the export is the EMA of the weights; None exports the last weights
    dit_processes: int = 2  # one-thread DDP ranks for the DiT stage (1 = train in this process)
    checkpoint_every: int = 500
    quick: bool = False  # CI mode: smaller held-out evaluation of the VAE

    def __post_init__(self) -> None:
        counts = ("vae_steps", "vae_batch_size", "decoder_steps", "clips", "i2v_every", "uncond_every", "shard_size")
        for name in (*counts, "dit_steps", "dit_batch_size", "dit_processes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.images is not None and self.images < 0:
            raise ValueError(f"images must be >= 0, got {self.images}")

    @property
    def num_images(self) -> int:
        return self.clips // 4 if self.images is None else self.images


# CI mode: a minute or two on 2 cores, enough to see both losses fall.
QUICK = RecipeSettings(
    vae_steps=24,
    vae_batch_size=4,
    decoder_steps=4,
    clips=48,
    images=16,
    shard_size=32,
    dit_steps=150,
    dit_batch_size=8,
    dit_lr=1e-3,
    dit_warmup_steps=10,
    checkpoint_every=50,
    dit_processes=1,
    dit_ema_decay=None,  # an average over 150 steps would still be mostly the random start
    quick=True,
)


@dataclass(frozen=True)
class RecipeReport:
    """What a recipe run produced.

    vae: the VAE's report; cache_samples / cache_conditions: cached samples and how many carry an I2V
    condition; dit_first_loss / dit_last_loss: mean flow-matching loss over the first / last quarter of
    the logged steps; dit_seconds_per_step: wall time per step in this session (None when no step ran);
    export_dir: the diffusers folder; export_bytes: file sizes of "transformer", "vae" and "total";
    dit_dtype: the dtype the DiT was exported in.
    """

    vae: VaeReport
    decoder: VaeReport
    cache_samples: int
    cache_conditions: int
    dit_params: int
    dit_steps: int
    dit_first_loss: float
    dit_last_loss: float
    dit_seconds_per_step: float | None
    export_dir: Path
    export_bytes: dict[str, int]
    dit_dtype: str
    seconds: dict[str, float]

    def to_json(self) -> dict[str, Any]:
        record = dataclasses.asdict(self)
        record["vae"], record["decoder"] = self.vae.to_json(), self.decoder.to_json()
        record["export_dir"] = str(self.export_dir)
        return record


# --------------------------------------------------------------------------------------------------
# b. The latent cache
# --------------------------------------------------------------------------------------------------


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _vae_weights(folder: Path) -> Path:
    files = sorted(folder.glob("*.safetensors"))
    if len(files) != 1:
        raise FileNotFoundError(f"expected one VAE weight file in {folder}, found {[f.name for f in files]}")
    return files[0]


def _check_source(cache_dir: Path, source: dict[str, Any]) -> None:
    """Record what the cache is built from; refuse to mix latents of another VAE or another data set."""
    path = cache_dir / SOURCE
    if path.is_file():
        previous = json.loads(path.read_text(encoding="utf-8"))
        if previous != source:
            changed = sorted(k for k in source.keys() | previous.keys() if source.get(k) != previous.get(k))
            raise ValueError(
                f"{cache_dir} was built from other settings ({', '.join(changed)} changed): its latents do not "
                f"match this run; use a new OUT_DIR, or delete {cache_dir} and {cache_dir.parent / 'dit'}"
            )
        return
    atomic_write(path, lambda tmp: write_json_durable(tmp, source))


class _ClipEncoder:
    """``encode_video_fn`` for ``build_cache``: media ``(kind, i)`` → the latent of world sample i.

    ``build_cache`` asks for one item at a time, in order; on a miss this encodes the next ``batch``
    samples of that kind together and hands them out one by one (a batch of 4 clips costs about as
    much as one clip on the CPU). Latents are posterior means; clips with ``i % i2v_every ==
    i2v_every - 1`` also get the latent of their first frame encoded alone, as I2V encodes its image.
    """

    def __init__(self, vae, settings: RecipeSettings, batch: int = 4):
        self.vae, self.settings, self.batch = vae, settings, batch
        self._ready: dict[tuple[str, int], Any] = {}

    def __call__(self, media: tuple[str, int]):
        if media not in self._ready:
            self._ready.clear()  # anything left belongs to a shard that was reused
            self._encode_from(*media)
        return self._ready.pop(media)

    @torch.no_grad()
    def _encode_from(self, kind: str, first: int) -> None:
        from ..train import EncodedVideo
        from .world import sample_clip, sample_image

        seed, every = self.settings.seed, self.settings.i2v_every
        count = self.settings.clips if kind == "video" else self.settings.num_images
        indices = range(first, min(first + self.batch, count))
        sample = sample_clip if kind == "video" else sample_image
        pixels = vae_input_from_frames(np.stack([sample((seed, i)).frames for i in indices]))  # (B, 3, T, 64, 64)
        latents = self.vae.encode(pixels, sample=False, tiling=False)  # (B, T', 16, 16, 16)
        firsts = self.vae.encode(pixels[:, :, :1], sample=False, tiling=False) if kind == "video" else None
        for b, i in enumerate(indices):
            condition = firsts[b, 0] if firsts is not None and i % every == every - 1 else None
            self._ready[(kind, i)] = EncodedVideo(latent=latents[b], condition=condition)


def build_nano_cache(cache_dir: Path, vae_dir: Path, settings: RecipeSettings) -> dict[str, int]:
    """Encode the world's train split into ``cache_dir`` (reusing finished shards); returns sample counts."""
    from ..train import DataItem, build_cache
    from ..train.data import read_manifest
    from ..vae import VideoVAE
    from .text import NanoTextEncoder
    from .world import dataset

    seed = settings.seed
    source = {
        "vae_sha256": _file_digest(_vae_weights(vae_dir)),
        "seed": seed,
        "clips": settings.clips,
        "images": settings.num_images,
        "i2v_every": settings.i2v_every,
        "uncond_every": settings.uncond_every,
    }
    _check_source(cache_dir, source)
    with contextlib.suppress(ValueError):
        manifest = read_manifest(cache_dir)
        if manifest["num_items"] == settings.clips + settings.num_images:
            logger.info("reusing the latent cache in %s", cache_dir)
            return _counts(manifest)

    from diffusers import AutoencoderKLHunyuanVideo

    # VideoVAE logs once that nano's scaling_factor is its own (not the official VAE's).
    encode_video = _ClipEncoder(VideoVAE(AutoencoderKLHunyuanVideo.from_pretrained(vae_dir)), settings)
    text_encoder = NanoTextEncoder.from_pretrained()

    def encode_text(caption: str):
        return text_encoder.encode(["" if caption == UNCONDITIONAL else caption])

    def caption(i: int, sample) -> str:
        every = settings.uncond_every
        return UNCONDITIONAL if i % every == every - 1 else sample.caption

    logger.info("captioning %d clips and %d images", settings.clips, settings.num_images)
    items = [
        DataItem(f"video/{i:06d}", ("video", i), caption(i, clip))
        for i, clip in enumerate(dataset(settings.clips, seed=seed, split="train", kind="video"))
    ]
    items += [
        DataItem(f"image/{i:06d}", ("image", i), caption(i, image))
        for i, image in enumerate(dataset(settings.num_images, seed=seed, split="train", kind="image"))
    ]
    build_cache(items, encode_video, encode_text, cache_dir, shard_size=settings.shard_size)
    return _counts(read_manifest(cache_dir))


def _counts(manifest: dict[str, Any]) -> dict[str, int]:
    samples = manifest["samples"]
    return {"samples": len(samples), "conditions": sum(bool(s["condition"]) for s in samples)}


# --------------------------------------------------------------------------------------------------
# c. The DiT
# --------------------------------------------------------------------------------------------------


def dit_train_config(out_dir: Path, settings: RecipeSettings):
    """The :class:`~kandinsky5.train.TrainConfig` of stage c."""
    from ..train import TrainConfig

    return TrainConfig(
        model=NANO_DIT,
        init="random",
        cache_dir=str(out_dir / "cache"),
        output_dir=str(out_dir / "dit"),
        batch_size=settings.dit_batch_size,
        lr=settings.dit_lr,
        weight_decay=0.01,
        warmup_steps=min(settings.dit_warmup_steps, settings.dit_steps // 10),
        lr_schedule="cosine",
        min_lr_ratio=0.1,
        max_steps=settings.dit_steps,
        seed=settings.seed,
        timestep_shift=settings.timestep_shift,
        ema_decay=settings.dit_ema_decay,
        rope_scale=NANO_ROPE_SCALE,
        log_every=max(1, min(10, settings.dit_steps // 40)),
        checkpoint_every=settings.checkpoint_every,
        keep_last_k=2,
    )


def train_dit(config, processes: int) -> tuple[int, Path]:
    """Stage c: the trainer here (``processes`` = 1) or in ``processes`` one-thread DDP ranks
    spawned here, which join over gloo on a free local port. Returns the step reached and the trained
    DiT's official-layout weight file from ``final/`` (the EMA when there is one; DDP checkpoints are
    sharded, that file never is)."""
    from ..train import train
    from ..train.distributed import free_local_port
    from ..train.export import final_files

    if processes == 1:
        step = train(config).step
    else:
        ranks_config = dataclasses.replace(config, distributed="ddp")
        torch.multiprocessing.spawn(_dit_rank, args=(ranks_config, processes, free_local_port()), nprocs=processes)
        step = _checkpoint_step(Path(config.output_dir))
    return step, final_files(config)[0]  # a full DiT (no LoRA): official/model.safetensors first


def _dit_rank(rank: int, config, world: int, port: int) -> None:
    """One spawned rank of :func:`train_dit`: torchrun's environment, one thread, the trainer."""
    from ..train import train

    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    train(config)


def _loss_ends(output_dir: Path) -> tuple[float, float]:
    """Mean logged loss of the first and of the last quarter of the rows of ``metrics.csv``."""
    from ..train.trainer import read_metrics

    losses = [float(row["loss"]) for row in read_metrics(output_dir)]
    window = max(1, len(losses) // 4)
    return float(np.mean(losses[:window])), float(np.mean(losses[-window:]))


def _checkpoint_step(output_dir: Path) -> int:
    from ..train import latest_checkpoint

    folder = latest_checkpoint(output_dir)
    return 0 if folder is None else int(folder.name.split("_")[1])


# --------------------------------------------------------------------------------------------------
# d. Export
# --------------------------------------------------------------------------------------------------


def export_nano(dit_weights: Path, vae_dir: Path, dest: Path) -> tuple[dict[str, int], torch.dtype]:
    """Write ``dest/transformer`` and ``dest/vae`` (diffusers layout) beside ``dest``, then rename into place.

    The DiT's bulk is stored in bf16 (time embedding and modulation stay fp32, as in the official
    checkpoints): it halves what the package and every retrain add to the repository, and nano computes in
    fp32 on the CPU anyway. Raises ValueError above ``MAX_EXPORT_BYTES``. Returns the file sizes and the
    DiT's export dtype.
    """
    from ..checkpoint import load_dit, save_dit
    from ..safetensors_file import nbytes

    model = load_dit(dit_weights, NANO_DIT, dtype=torch.float32)
    dtype = torch.bfloat16
    model.cast_(dtype)
    total = _vae_weights(vae_dir).stat().st_size + sum(nbytes(t) for t in model.state_dict().values())
    if total > MAX_EXPORT_BYTES:
        raise ValueError(f"nano would take {total / 1e6:.1f} MB, more than the {MAX_EXPORT_BYTES / 1e6:.0f} MB allowed")

    def write(tmp: Path) -> None:
        save_dit(model, tmp, layout="diffusers")
        shutil.copytree(vae_dir, tmp / "vae")

    atomic_write_folder(dest, write)
    sizes = {part: sum(f.stat().st_size for f in (dest / part).iterdir()) for part in ("transformer", "vae")}
    sizes["total"] = sizes["transformer"] + sizes["vae"]
    return sizes, dtype


# --------------------------------------------------------------------------------------------------
# The whole recipe
# --------------------------------------------------------------------------------------------------


def run_recipe(out_dir: str | Path, settings: RecipeSettings = RecipeSettings()) -> RecipeReport:
    """Run (or resume) stages a–d in ``out_dir``; see the module docstring."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}

    start = time.perf_counter()
    vae = train_vae(out_dir / "vae", settings.vae_steps, settings.vae_batch_size, settings.seed, settings.quick)
    seconds["vae"] = time.perf_counter() - start

    start = time.perf_counter()
    counts = build_nano_cache(out_dir / "cache", vae.path, settings)
    seconds["cache"] = time.perf_counter() - start

    start = time.perf_counter()
    decoder = train_vae(
        out_dir / "decoder", settings.decoder_steps, DECODER_BATCH, settings.seed, settings.quick,
        config=DECODER_FINETUNE, init_from=vae.path,
    )  # fmt: skip
    seconds["decoder"] = time.perf_counter() - start

    config = dit_train_config(out_dir, settings)
    before = _checkpoint_step(Path(config.output_dir))
    start = time.perf_counter()
    dit_step, dit_weights = train_dit(config, settings.dit_processes)
    seconds["dit"] = time.perf_counter() - start
    done_now = dit_step - before
    first, last = _loss_ends(Path(config.output_dir))

    start = time.perf_counter()
    sizes, dtype = export_nano(dit_weights, decoder.path, out_dir / NANO_DIR)
    seconds["export"] = time.perf_counter() - start

    report = RecipeReport(
        vae=vae,
        decoder=decoder,
        cache_samples=counts["samples"],
        cache_conditions=counts["conditions"],
        dit_params=_num_parameters(NANO_DIT),
        dit_steps=dit_step,
        dit_first_loss=first,
        dit_last_loss=last,
        dit_seconds_per_step=seconds["dit"] / done_now if done_now > 0 else None,
        export_dir=out_dir / NANO_DIR,
        export_bytes=sizes,
        dit_dtype=str(dtype).removeprefix("torch."),
        seconds=seconds,
    )
    atomic_write(out_dir / "report.json", lambda tmp: write_json_durable(tmp, report.to_json()))
    return report


def _num_parameters(config: DiTConfig) -> int:
    from ..models.dit import CrossDiT

    with torch.device("meta"):
        return sum(p.numel() for p in CrossDiT(config).parameters())


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m kandinsky5.nano.recipe",
        description="Train nano from scratch (VAE, latent cache, DiT) and export it to OUT_DIR/nano. "
        "Rerunning the same command continues where it stopped.",
    )
    parser.add_argument("out_dir", metavar="OUT_DIR", type=Path, help="working and output folder")
    parser.add_argument("--quick", action="store_true", help="CI mode: tiny step counts, a minute or two on a CPU")
    full, quick = RecipeSettings(), QUICK
    parser.add_argument("--vae-steps", type=int, help=f"VAE steps (default {full.vae_steps}; quick {quick.vae_steps})")
    parser.add_argument("--dit-steps", type=int, help=f"DiT steps (default {full.dit_steps}; quick {quick.dit_steps})")
    parser.add_argument(
        "--clips",
        type=int,
        help=f"world clips in the cache, plus a quarter as many images (default {full.clips}; quick {quick.clips})",
    )
    parser.add_argument(
        "--dit-processes",
        type=int,
        help=f"one-thread DDP ranks for the DiT stage; 1 trains in this process (default {full.dit_processes}; "
        f"quick {quick.dit_processes})",
    )
    parser.add_argument("--seed", type=int, default=0, help="everything derives from it (default 0)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (tiny models often run faster on 1)")
    return parser


def settings_from_args(args: argparse.Namespace) -> RecipeSettings:
    base = QUICK if args.quick else RecipeSettings()
    changes = {
        "vae_steps": args.vae_steps,
        "dit_steps": args.dit_steps,
        "clips": args.clips,
        "dit_processes": args.dit_processes,
    }
    changes = {k: v for k, v in changes.items() if v is not None}
    if "clips" in changes and base.images is not None:
        changes["images"] = changes["clips"] // 4
    return dataclasses.replace(base, seed=args.seed, **changes)


@contextlib.contextmanager
def _log_to_stderr() -> Iterator[None]:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S"))
    root, package = logging.getLogger(), logging.getLogger("kandinsky5")
    level = package.level
    root.addHandler(handler)
    package.setLevel(logging.INFO)
    try:
        yield
    finally:
        package.setLevel(level)
        root.removeHandler(handler)


def summary_lines(report: RecipeReport) -> list[str]:
    vae, mb = report.vae, lambda n: f"{n / 1e6:.1f} MB"
    per_step = report.dit_seconds_per_step
    return [
        f"VAE: {vae.params / 1e6:.2f} M params, {vae.steps} steps; training loss {vae.first_loss:.4f} -> "
        f"{vae.last_loss:.4f} (first vs last quarter of the crop phase); held-out L1 {vae.heldout_l1_start:.4f} -> "
        f"{vae.heldout_l1:.4f}; held-out PSNR {vae.psnr:.2f} dB clips, {vae.psnr_image:.2f} dB images; "
        f"scaling_factor {vae.scaling_factor:.4f}; {vae.seconds_per_step['crops']:.2f} s/step on crops, "
        f"{vae.seconds_per_step['full']:.2f} s/step on full clips",
        f"cache: {report.cache_samples} samples, {report.cache_conditions} with an I2V first-frame condition",
        f"DiT: {report.dit_params / 1e6:.2f} M params, {report.dit_steps} steps, loss {report.dit_first_loss:.4f} -> "
        f"{report.dit_last_loss:.4f} (first vs last quarter)"
        + ("" if per_step is None else f"; {per_step:.3f} s/step"),
        f"export: {report.export_dir} (transformer {mb(report.export_bytes['transformer'])} {report.dit_dtype}, "
        f"vae {mb(report.export_bytes['vae'])}; total {mb(report.export_bytes['total'])})",
        f"decoder fine-tune: {report.decoder.steps} steps; held-out PSNR {report.decoder.psnr:.2f} dB clips, "
        f"{report.decoder.psnr_image:.2f} dB images",
        "time: " + ", ".join(f"{stage} {s:.0f} s" for stage, s in report.seconds.items()),
    ]


def main(argv: Sequence[str] | None = None, log: Callable[[str], None] = print) -> int:
    """``python -m kandinsky5.nano.recipe``: run the recipe, print a summary; returns the exit status."""
    args = _parser().parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    with _log_to_stderr():
        report = run_recipe(args.out_dir, settings_from_args(args))
    for line in summary_lines(report):
        log(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
