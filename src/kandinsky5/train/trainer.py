"""The training loop: flow matching on cached latents with AdamW, resumable bit for bit.

``train(config)`` reads the latent cache, builds or loads the DiT, and runs ``max_steps`` optimizer
steps. Every random draw of the loop (timesteps and noise) comes from one CPU generator whose state is
part of each checkpoint, and the data order is a function of ``(seed, epoch, position)``. A run killed
at any moment and restarted with the same config resumes from its latest checkpoint and, on the CPU,
writes exactly the loss sequence of an uninterrupted run.

Files under ``output_dir``: ``config.json`` (the config of the first start), ``metrics.csv`` (one row per
``log_every`` steps) and ``checkpoints/step_XXXXXXX/`` (see checkpointing.py).
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.optim.lr_scheduler import LambdaLR
from tqdm.auto import tqdm

from ..atomic import atomic_write, write_json_durable
from ..devices import resolve_device
from ..lora import add_lora
from ..models.dit import CrossDiT
from ..pipeline import Conditioning
from ..sampling import TIMESTEP_SCALE
from .checkpointing import latest_checkpoint, load_checkpoint, save_checkpoint
from .config import TrainConfig, load_config
from .data import BucketSampler, CacheError, CacheSummary, LatentBatch, LatentDataset, collate
from .export import export_final, final_files
from .loss import flow_matching_loss, interpolate, sample_timesteps

__all__ = [
    "TrainResult",
    "build_model",
    "build_optimizer",
    "build_scheduler",
    "lr_factor",
    "main_train",
    "micro_batch_loss",
    "read_metrics",
    "train",
]

logger = logging.getLogger(__name__)

METRICS = "metrics.csv"
METRICS_COLUMNS = ("step", "loss", "lr", "grad_norm", "samples_per_s")
# Config fields that may change between a run and its resume without changing the trajectory.
RESUME_SAFE_FIELDS = frozenset({"max_steps", "log_every", "checkpoint_every", "keep_last_k", "output_dir", "device"})


@dataclass(frozen=True)
class TrainResult:
    """How a run ended.

    step: optimizer steps done (== max_steps unless interrupted); loss: mean loss of the last step
    (None if no step was ever run); checkpoint: the last checkpoint folder; skipped: items of the data
    set left out of the latent cache and why.
    """

    step: int
    loss: float | None
    output_dir: Path
    checkpoint: Path | None
    skipped: CacheSummary


# --------------------------------------------------------------------------------------------------
# Model, optimizer, schedule
# --------------------------------------------------------------------------------------------------


def build_model(config: TrainConfig, device: torch.device, *, empty: bool = False) -> CrossDiT:
    """The DiT to train, in fp32 on ``device``, in train mode.

    ``empty``: allocate without initialising (the caller loads a checkpoint over every tensor).
    Otherwise ``init="random"`` uses the (already seeded) global torch RNG and ``"pretrained"`` loads
    ``weights``, by default the variant's official checkpoint. With ``lora_rank > 0`` peft adapters wrap
    the ``lora_targets`` and only they train; ``empty`` is then ignored, since a LoRA checkpoint holds the
    adapters only and the frozen base must be built as at the start.
    """
    if empty and not config.lora_rank:
        with torch.device("meta"):
            model = CrossDiT(config.dit_config)
        model = model.to_empty(device=device)
    elif config.init == "random":
        model = CrossDiT(config.dit_config).to(device)
    elif config.variant is not None:
        from ..api import load_transformer

        source = config.weights or config.variant.name
        model = load_transformer(source, config.variant.name, device=device, dtype=torch.float32)
    else:
        from ..checkpoint import load_dit
        from ..hub import resolve_dit_files

        files = resolve_dit_files(config.weights).files
        model = load_dit(files, config.dit_config, device=device, dtype=torch.float32)
    if config.lora_rank:
        add_lora(model, config.lora_rank, config.resolved_lora_alpha, config.lora_targets)
    model.gradient_checkpointing = config.gradient_checkpointing
    return model.train()


def build_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (biases and norm weights are not decayed)."""
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    decay = [p for _, p in trainable if p.ndim >= 2]
    no_decay = [p for _, p in trainable if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr, betas=config.betas, eps=config.adam_eps)


def lr_factor(step: int, config: TrainConfig) -> float:
    """LR multiplier for optimizer step ``step`` (0-based): linear warm-up, then constant or cosine."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.lr_schedule == "constant":
        return 1.0
    decay_steps = max(1, config.max_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / decay_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return config.min_lr_ratio + (1.0 - config.min_lr_ratio) * cosine


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig) -> LambdaLR:
    def factor(step: int) -> float:  # a plain function, so the scheduler state stays JSON
        return lr_factor(step, config)

    return LambdaLR(optimizer, factor)


# --------------------------------------------------------------------------------------------------
# One micro-batch
# --------------------------------------------------------------------------------------------------


def _autocast(device: torch.device, dtype: str):
    if device.type == "cuda" and dtype == "bfloat16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()  # CPU (and MPS) train in fp32


def micro_batch_loss(
    model: CrossDiT,
    batch: LatentBatch,
    generator: torch.Generator,
    config: TrainConfig,
    device: torch.device,
) -> torch.Tensor:
    """Flow-matching loss of one batch; t and ε are drawn on the CPU from ``generator`` (t first)."""
    x0 = batch.latent.float()
    t = sample_timesteps(x0.shape[0], generator, config.timestep_mean, config.timestep_std, config.resolved_shift)
    noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32)
    batch = batch.to(device)
    x0, noise, t = x0.to(device), noise.to(device), t.to(device)
    x_t = interpolate(x0, noise, t)
    conditioning, loss_mask = Conditioning(), None
    if batch.condition is not None:  # I2V: clean first frame in x_t and the mask channel; loss on the others
        first = batch.condition.float()
        x_t = torch.cat([first[:, None], x_t[:, 1:]], dim=1)
        conditioning = Conditioning(first_frame=first)
        loss_mask = torch.ones(x0.shape[:2], dtype=torch.bool, device=device)
        loss_mask[:, 0] = False
    model_input = conditioning.model_input(x_t, model.config.visual_cond)
    with _autocast(device, config.dtype):
        velocity = model(
            model_input,
            batch.tokens.float(),
            batch.pooled.float(),
            t * TIMESTEP_SCALE,
            batch.mask,
            config.resolved_rope_scale,
        )
    return flow_matching_loss(velocity, x0, noise, loss_mask)


# --------------------------------------------------------------------------------------------------
# Metrics file
# --------------------------------------------------------------------------------------------------


class MetricsLog:
    """``metrics.csv``: a header and one flushed line per logged step.

    On resume the file is first cut back (atomically) to the rows at or before the checkpoint step, so
    rows of steps that are about to be redone never appear twice; a torn last line is dropped too.
    """

    def __init__(self, path: Path, resume_step: int):
        self.path = path
        kept = self._rows_up_to(resume_step) if resume_step > 0 else []
        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(METRICS_COLUMNS)
        writer.writerows(kept)
        atomic_write(path, lambda tmp: tmp.write_text(text.getvalue(), encoding="utf-8"))
        self._file = path.open("a", encoding="utf-8", newline="")
        self._writer = csv.writer(self._file, lineterminator="\n")

    def _rows_up_to(self, step: int) -> list[list[str]]:
        if not self.path.is_file():
            return []
        rows = []
        with self.path.open(encoding="utf-8", newline="") as f:
            for row in list(csv.reader(f))[1:]:
                if len(row) == len(METRICS_COLUMNS) and row[0].isdigit() and int(row[0]) <= step:
                    rows.append(row)
        return rows

    def write(self, step: int, loss: float, lr: float, grad_norm: float | None, samples_per_s: float) -> None:
        norm = "" if grad_norm is None else repr(grad_norm)
        self._writer.writerow([step, repr(loss), repr(lr), norm, f"{samples_per_s:.3f}"])
        self._file.flush()

    def sync(self) -> None:
        """Make the rows written so far durable (done before each checkpoint)."""
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


def read_metrics(output_dir: str | Path) -> list[dict[str, str]]:
    """The rows of a run's ``metrics.csv`` as dicts (column → text)."""
    with (Path(output_dir) / METRICS).open(encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------


def _open_dataset(config: TrainConfig) -> LatentDataset:
    try:
        return LatentDataset(config.cache_dir)
    except CacheError:
        if config.data_dir is None:
            raise
    from .encode import encode_folder  # heavy: VAE and text encoders

    logger.info("encoding %s into the latent cache %s", config.data_dir, config.cache_dir)
    encode_folder(config)
    return LatentDataset(config.cache_dir)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def _warn_config_changes(saved: dict, config: TrainConfig) -> None:
    current = config.to_dict()
    safe = RESUME_SAFE_FIELDS - ({"max_steps"} if config.lr_schedule == "cosine" else set())  # cosine spans max_steps
    changed = sorted(k for k in current if k not in safe and saved.get(k) != current[k])
    if changed:
        logger.warning(
            "resuming with changed config fields %s: the optimizer and schedule state come from the "
            "checkpoint and the run is no longer an exact continuation",
            changed,
        )


def _optimizer_step(
    model: CrossDiT,
    optimizer: torch.optim.Optimizer,
    scheduler: LambdaLR,
    dataset: LatentDataset,
    sampler: BucketSampler,
    generator: torch.Generator,
    config: TrainConfig,
    device: torch.device,
) -> tuple[float, float | None, int]:
    """``grad_accum`` micro-batches, clipping and one AdamW step → (mean loss, grad norm, samples seen)."""
    optimizer.zero_grad(set_to_none=True)
    losses, samples = [], 0
    for _ in range(config.grad_accum):
        batch = collate([dataset[i] for i in sampler.next_batch()])
        loss = micro_batch_loss(model, batch, generator, config, device)
        (loss / config.grad_accum).backward()
        losses.append(loss.item())
        samples += batch.latent.shape[0]
    grad_norm = None
    if config.max_grad_norm > 0:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm))
    optimizer.step()
    scheduler.step()
    return sum(losses) / len(losses), grad_norm, samples


def train(config: TrainConfig) -> TrainResult:
    """Run (or resume) the training described by ``config``; see the module docstring."""
    output_dir = Path(config.output_dir)
    device = resolve_device(config.device)
    dataset = _open_dataset(config)  # fails early (before any model loads) on a missing cache
    if dataset.num_skipped:
        summary = dataset.summary()
        logger.warning("%d items were left out of the cache: %s", summary.num_skipped, summary.skipped_reasons)
    sampler = BucketSampler(dataset.bucket_keys(), config.batch_size, config.seed)

    checkpoint = latest_checkpoint(output_dir)
    _seed_everything(config.seed)
    model = build_model(config, device, empty=checkpoint is not None)
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config)
    noise_generator = torch.Generator().manual_seed(config.seed)
    generators = {"noise": noise_generator}

    step, last_loss, window = 0, None, [0.0, 0]  # window: loss sum and step count since the last log row
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, model, optimizer, scheduler, generators=generators)
        step = state["step"]
        sampler.load_state_dict(state["sampler"])
        extra = state["extra"]
        last_loss, window = extra["last_loss"], list(extra["loss_window"])
        _warn_config_changes(extra["config"], config)
        logger.info("resuming from %s (step %d)", checkpoint, step)
    else:
        output_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(output_dir / "config.json", lambda tmp: write_json_durable(tmp, config.to_dict()))
    metrics = MetricsLog(output_dir / METRICS, step)
    start_step = step

    def save() -> None:
        metrics.sync()
        extra = {"last_loss": last_loss, "loss_window": window, "config": config.to_dict()}
        nonlocal checkpoint
        checkpoint = save_checkpoint(
            output_dir, step, model, optimizer, scheduler,
            generators=generators, sampler=sampler.state_dict(), extra=extra, keep_last_k=config.keep_last_k,
            trainable_only=config.lora_rank > 0,
        )  # fmt: skip

    progress = tqdm(total=config.max_steps, initial=step, unit="step", desc="training", dynamic_ncols=True)
    window_start, window_samples = time.perf_counter(), 0
    try:
        while step < config.max_steps:
            lr = optimizer.param_groups[0]["lr"]
            last_loss, grad_norm, samples = _optimizer_step(
                model, optimizer, scheduler, dataset, sampler, noise_generator, config, device
            )
            step += 1
            if not math.isfinite(last_loss):
                raise FloatingPointError(
                    f"loss is {last_loss} at step {step}; lower lr, raise warmup_steps or set max_grad_norm"
                )
            window, window_samples = [window[0] + last_loss, window[1] + 1], window_samples + samples
            progress.update(1)
            progress.set_postfix(loss=f"{last_loss:.4f}", lr=f"{lr:.2e}", refresh=False)

            if step % config.log_every == 0 or step == config.max_steps:
                elapsed = time.perf_counter() - window_start
                metrics.write(step, window[0] / window[1], lr, grad_norm, window_samples / max(elapsed, 1e-9))
                window, window_start, window_samples = [0.0, 0], time.perf_counter(), 0
            if step % config.checkpoint_every == 0 or step == config.max_steps:
                save()
    finally:
        progress.close()
        metrics.close()

    if step > start_step or not all(path.is_file() for path in final_files(config)):
        export_final(model, config)
    return TrainResult(
        step=step, loss=last_loss, output_dir=output_dir, checkpoint=checkpoint, skipped=dataset.summary()
    )


def main_train(path: str | Path, log: Callable[[str], None] = print) -> int:
    """Entry point of ``kandinsky5 train CONFIG``: load and check the config, train, report; returns 0.

    Config and cache errors raise :class:`~kandinsky5.train.config.ConfigError` /
    :class:`~kandinsky5.train.data.CacheError` (both ``ValueError``) with a message meant for the user.
    """
    config = load_config(path)
    result = train(config)
    log(f"trained {result.step} steps; last loss {result.loss!r}; checkpoint {result.checkpoint}")
    if result.skipped.num_skipped:
        log(f"{result.skipped.num_skipped} data items skipped: {result.skipped.skipped_reasons}")
    return 0
