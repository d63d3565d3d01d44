"""The training loop: flow matching on cached latents with AdamW, resumable bit for bit.

``train(config)`` reads the latent cache, builds or loads the DiT, and runs ``max_steps`` optimizer
steps. Every random draw of the loop (timesteps and noise) comes from one CPU generator whose state is
part of each checkpoint, and the data order is a function of ``(seed, epoch, position)``. A run killed
at any moment and restarted with the same config resumes from its latest checkpoint and, on the CPU,
writes exactly the loss sequence of an uninterrupted run.

Files under ``output_dir``: ``config.json`` (the config of the first start), ``metrics.csv`` (one row per
``log_every`` steps), ``checkpoints/step_XXXXXXX/`` (see checkpointing.py), ``final/`` (export.py; the
EMA weights when the run keeps an EMA) and, when configured, ``tensorboard/`` and ``validation/``.

Under torchrun the same loop runs in every process (distributed.py): rank 0 writes the files, and the
checkpoints are sharded (sharded_checkpoint.py).
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
from .distributed import Distributed, setup_distributed, unwrap
from .ema import EMA
from .export import export_final, final_files
from .loss import flow_matching_loss, interpolate, sample_timesteps
from .sharded_checkpoint import save_sharded

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
RESUME_SAFE_FIELDS = frozenset(
    {"max_steps", "log_every", "checkpoint_every", "keep_last_k", "output_dir", "device", "distributed", "tensorboard"}
    | {"validation_prompts", "validation_every", "validation_steps", "validation_size", "validation_num_frames"}
    | {"validation_guidance_scale", "validation_vae", "validation_text_encoders"}
)


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
    ``weights``, by default the variant's official checkpoint (for nano, the weights in the package).
    With ``lora_rank > 0`` peft adapters wrap the ``lora_targets`` and only they train; ``empty`` is then
    ignored, since a LoRA checkpoint holds the adapters only and the frozen base must be built as at the
    start.
    """
    if empty and not config.lora_rank:
        with torch.device("meta"):
            model = CrossDiT(config.dit_config)
        model = model.to_empty(device=device)
    elif config.init == "random":
        model = CrossDiT(config.dit_config).to(device)
    elif config.variant is not None:
        from ..api import load_transformer
        from .components import dit_source

        source = config.weights or dit_source(config.variant)  # nano: the package's own weights
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
    # On the CPU torch's default AdamW loops over the tensors in Python: 50 ms a step for the first nano's
    # 9.5 M parameters on one core, against 8 ms fused (benchmarks/train_step.py). Sharded (DTensor) parameters
    # keep the default.
    fused = all(type(p) is torch.nn.Parameter and p.device.type == "cpu" for _, p in trainable) or None
    return torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=config.lr, betas=config.betas, eps=config.adam_eps, fused=fused
    )


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
    *,
    draw_size: int | None = None,
    rows: list[int] | None = None,
) -> torch.Tensor:
    """Flow-matching loss of one batch; t and ε are drawn on the CPU from ``generator`` (t first).

    Distributed: ``batch`` holds the ``rows`` of a global batch of ``draw_size`` samples; t and ε are
    drawn for the whole global batch (the same draws on every rank) and this rank keeps its rows.
    """
    x0 = batch.latent.float()
    n = draw_size or x0.shape[0]
    t = sample_timesteps(n, generator, config.timestep_mean, config.timestep_std, config.resolved_shift)
    noise = torch.randn((n, *x0.shape[1:]), generator=generator, dtype=torch.float32)
    if rows is not None:
        t, noise = t[rows], noise[rows]
    batch = batch.to(device)
    x0, noise, t = x0.to(device), noise.to(device), t.to(device)
    x_t = interpolate(x0, noise, t)
    conditioning, loss_mask = Conditioning(), None
    if batch.condition is not None:  # I2V: clean first frame in x_t and the mask channel; loss on the others
        conditioning = Conditioning(first_frame=batch.condition.float())
        x_t = conditioning.splice_first_frame(x_t)
        loss_mask = torch.ones(x0.shape[:2], dtype=torch.bool, device=device)
        loss_mask[:, 0] = False
    dit_config = unwrap(model).config
    model_input = conditioning.model_input(x_t, dit_config.visual_cond)
    with _autocast(device, config.dtype):
        output = model(
            model_input,
            batch.tokens.float(),
            batch.pooled.float(),
            t * TIMESTEP_SCALE,
            batch.mask,
            config.resolved_rope_scale,
        )
    return flow_matching_loss(output, x0, noise, loss_mask, prediction=dit_config.prediction, t=t)


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


def _open_dataset(config: TrainConfig, parallel: Distributed) -> LatentDataset:
    try:
        return LatentDataset(config.cache_dir)
    except CacheError:
        if config.data_dir is None:
            raise
    if parallel.is_main:
        from .encode import encode_folder  # heavy: VAE and text encoders

        logger.info("encoding %s into the latent cache %s", config.data_dir, config.cache_dir)
        encode_folder(config)
    parallel.barrier()  # the other ranks wait for rank 0's cache
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
    parallel: Distributed | None = None,
) -> tuple[float, float | None, int]:
    """``grad_accum`` micro-batches, clipping and one AdamW step → (mean loss, grad norm, samples seen).

    Each micro-batch is one global batch of the sampler; with several processes each rank computes
    its share of it (a rank with an empty share runs one sample at weight 0, so collectives stay in step).
    """
    parallel = parallel or Distributed()
    optimizer.zero_grad(set_to_none=True)
    losses, samples = [], 0
    for k in range(config.grad_accum):
        indices = sampler.next_batch()
        if parallel.kind == "none":
            batch = collate([dataset[i] for i in indices])
            loss = micro_batch_loss(model, batch, generator, config, device)
            (loss / config.grad_accum).backward()
            losses.append(loss.item())
        else:
            rows = parallel.share(len(indices))
            taken = rows or [0]
            batch = collate([dataset[indices[i]] for i in taken])
            loss = micro_batch_loss(model, batch, generator, config, device, draw_size=len(indices), rows=taken)
            weight = parallel.loss_weight(rows, len(indices))
            with parallel.gradient_sync(model, enabled=k == config.grad_accum - 1):
                (loss * (weight / config.grad_accum)).backward()
            losses.append(parallel.global_mean(loss.item(), rows, len(indices)))
        samples += len(indices)
    grad_norm = None
    if config.max_grad_norm > 0:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    optimizer.step()
    scheduler.step()
    return sum(losses) / len(losses), grad_norm, samples


def train(config: TrainConfig) -> TrainResult:
    """Run (or resume) the training described by ``config``; see the module docstring."""
    device = resolve_device(config.device)
    parallel = setup_distributed(config, device)  # one process unless started by torchrun
    try:
        return _train(config, parallel, parallel.device(device))
    finally:
        parallel.close()


def _train(config: TrainConfig, parallel: Distributed, device: torch.device) -> TrainResult:
    output_dir = Path(config.output_dir)
    main = parallel.is_main
    dataset = _open_dataset(config, parallel)  # fails early (before any model loads) on a missing cache
    if dataset.num_skipped and main:
        summary = dataset.summary()
        logger.warning("%d items were left out of the cache: %s", summary.num_skipped, summary.skipped_reasons)
    sampler = BucketSampler(dataset.bucket_keys(), config.batch_size, config.seed)

    checkpoint = latest_checkpoint(output_dir)
    _seed_everything(config.seed)
    dit = build_model(config, device, empty=checkpoint is not None)
    model = parallel.wrap(dit, device)  # DDP / FSDP2 under torchrun; the DiT itself otherwise
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config)
    ema = EMA(dit, config.ema_decay) if config.ema_decay is not None else None
    noise_generator = torch.Generator().manual_seed(config.seed)
    generators = {"noise": noise_generator}

    step, last_loss, window = 0, None, [0.0, 0]  # window: loss sum and step count since the last log row
    if checkpoint is not None:
        state = load_checkpoint(
            checkpoint, dit, optimizer, scheduler, generators=generators, ema=None if ema is None else ema.state_dict()
        )
        step = state["step"]
        sampler.load_state_dict(state["sampler"])
        extra = state["extra"]
        last_loss, window = extra["last_loss"], list(extra["loss_window"])
        if main:
            _warn_config_changes(extra["config"], config)
            logger.info("resuming from %s (step %d)", checkpoint, step)
    elif main:
        output_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(output_dir / "config.json", lambda tmp: write_json_durable(tmp, config.to_dict()))
    start_step = step
    metrics = MetricsLog(output_dir / METRICS, step) if main else None
    board = None
    if config.tensorboard and main:
        from .tensorboard import TensorBoardLog

        board = TensorBoardLog(output_dir, step)
    validator = None
    if config.validation_prompts:
        from .validation import Validator

        validator = Validator(config, device, parallel)

    def save() -> None:
        if main:
            metrics.sync()
        extra = {"last_loss": last_loss, "loss_window": window, "config": config.to_dict()}
        nonlocal checkpoint
        common = dict(
            generators=generators, sampler=sampler.state_dict(), extra=extra, keep_last_k=config.keep_last_k,
            ema=None if ema is None else ema.state_dict(),
        )  # fmt: skip
        if parallel.kind == "none":
            lora = config.lora_rank > 0
            checkpoint = save_checkpoint(output_dir, step, dit, optimizer, scheduler, trainable_only=lora, **common)
        else:
            checkpoint = save_sharded(output_dir, step, dit, optimizer, scheduler, **common)

    progress = tqdm(
        total=config.max_steps, initial=step, unit="step", desc="training", dynamic_ncols=True, disable=not main
    )
    window_start, window_samples = time.perf_counter(), 0
    try:
        while step < config.max_steps:
            lr = optimizer.param_groups[0]["lr"]
            last_loss, grad_norm, samples = _optimizer_step(
                model, optimizer, scheduler, dataset, sampler, noise_generator, config, device, parallel
            )
            step += 1
            if not math.isfinite(last_loss):
                raise FloatingPointError(
                    f"loss is {last_loss} at step {step}; lower lr, raise warmup_steps or set max_grad_norm"
                )
            if ema is not None:
                ema.update()
            window, window_samples = [window[0] + last_loss, window[1] + 1], window_samples + samples
            progress.update(1)
            progress.set_postfix(loss=f"{last_loss:.4f}", lr=f"{lr:.2e}", refresh=False)

            if step % config.log_every == 0 or step == config.max_steps:
                elapsed = max(time.perf_counter() - window_start, 1e-9)
                if main:
                    metrics.write(step, window[0] / window[1], lr, grad_norm, window_samples / elapsed)
                if board is not None:
                    speeds = (window[1] / elapsed, window_samples / elapsed)
                    board.write(step, window[0] / window[1], lr, grad_norm, *speeds)
                window, window_start, window_samples = [0.0, 0], time.perf_counter(), 0
            if step % config.checkpoint_every == 0 or step == config.max_steps:
                if board is not None:
                    board.sync()
                save()
            if validator is not None and (step % config.validation_every == 0 or step == config.max_steps):
                validator.render(dit, step, ema)
                window_start = time.perf_counter()  # rendering time is not training throughput
    finally:
        progress.close()
        if metrics is not None:
            metrics.close()
        if board is not None:
            board.close()

    if step > start_step or not all(path.is_file() for path in final_files(config)):
        with ema.applied() if ema is not None else contextlib.nullcontext():
            full = parallel.gathered(dit, lambda: build_model(config, torch.device("cpu"), empty=True))
            if main:
                export_final(full, config)
        parallel.barrier()
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
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 reports
        log(f"trained {result.step} steps; last loss {result.loss!r}; checkpoint {result.checkpoint}")
        log(result.skipped.describe())  # the end-of-run bad-data summary (details in the cache's manifest)
    return 0
