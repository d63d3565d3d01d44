"""Checkpoints of runs with several processes, through torch.distributed.checkpoint (DCP).

The folder has the name and the JSON of a single-process checkpoint (checkpointing.py), with the
tensors in DCP's format instead of safetensors::

    step_XXXXXXX/
      dcp/            model, optimizer and EMA state, each rank writing its own shards (.distcp files)
                      and rank 0 the global metadata (.metadata, written last)
      rng.safetensors rank 0's RNG states (every rank holds the same ones)
      state.json      written last, with "layout": "torch.distributed.checkpoint"

Tensors are keyed by parameter name whatever the wrapping (DDP, FSDP2 or none), and DCP reshards on
load, so a checkpoint saved by 2 processes resumes with 1, 2 or 4. The folder is written under a
hidden temporary name on a file system all ranks share, and renamed by rank 0 once every rank has
finished its part, so a crash leaves either the whole checkpoint or none.
"""

from __future__ import annotations

import logging
import os
import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn

from ..atomic import atomic_write, fsync_path, write_json_durable
from ..safetensors_file import CheckpointError
from .checkpointing import (
    _TEMP_PREFIX,
    CHECKPOINTS,
    FORMAT,
    RNG,
    SHARDED,
    STATE,
    VERSION,
    _is_complete,
    _jsonable_scheduler,
    _prune,
    _remove_dir,
    _remove_leftovers,
    _rng_state,
    step_dir_name,
)

__all__ = ["load_sharded", "save_sharded"]

logger = logging.getLogger(__name__)

DCP_DIR = "dcp"


def _state(model: nn.Module, optimizer: torch.optim.Optimizer | None, ema: Mapping[str, torch.Tensor] | None):
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if optimizer is None:
        state: dict[str, Any] = {"model": get_model_state_dict(model)}
    else:
        model_state, optimizer_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optimizer": optimizer_state}
    if ema is not None:
        state["ema"] = dict(ema)
    return state


def save_sharded(
    output_dir: str | Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    *,
    generators: Mapping[str, torch.Generator] | None = None,
    sampler: Mapping[str, int] | None = None,
    extra: Mapping[str, Any] | None = None,
    keep_last_k: int | None = None,
    ema: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Collective: every rank calls it with its (wrapped) model. Returns the checkpoint folder."""
    import torch.distributed.checkpoint as dcp

    main = dist.get_rank() == 0
    root = Path(output_dir) / CHECKPOINTS
    final = root / step_dir_name(step)
    temp = root / f"{_TEMP_PREFIX}{final.name}-sharded"
    if main:
        root.mkdir(parents=True, exist_ok=True)
        _remove_leftovers(root)
        if final.exists() and not _is_complete(final):
            _remove_dir(final)
    dist.barrier()
    if final.exists():
        logger.info("checkpoint %s already exists; not written again", final)
        return final
    if main:
        temp.mkdir()
    dist.barrier()
    try:
        dcp.save(_state(model, optimizer, ema), checkpoint_id=temp / DCP_DIR)  # ends with every rank done
        if main:
            rng_tensors, rng_meta = _rng_state(generators or {})
            atomic_write(temp / RNG, lambda tmp: save_file(rng_tensors, str(tmp)))
            state = {
                "format": FORMAT,
                "version": VERSION,
                "layout": SHARDED,
                "world_size": dist.get_world_size(),
                "step": step,
                "files": [f"{DCP_DIR}/.metadata", RNG],
                "scheduler": None if scheduler is None else _jsonable_scheduler(scheduler),
                "sampler": dict(sampler or {}),
                "rng": rng_meta,
                "extra": dict(extra or {}),
            }
            atomic_write(temp / STATE, lambda tmp: write_json_durable(tmp, state))
            fsync_path(temp / DCP_DIR)
            fsync_path(temp)
            os.rename(temp, final)
            fsync_path(root)
            _prune(root, keep_last_k)
            logger.info("saved checkpoint %s", final)
    except BaseException:
        if main:
            shutil.rmtree(temp, ignore_errors=True)
        raise
    dist.barrier()
    return final


def load_sharded(
    folder: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    ema: Mapping[str, torch.Tensor] | None = None,
) -> None:
    """Load the tensors of a DCP checkpoint into ``model`` (wrapped or not), ``optimizer`` and ``ema``.

    Collective when a process group is initialised; otherwise a plain single-process load.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    path = folder / DCP_DIR
    saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    if ema is not None and not any(key.startswith("ema.") for key in saved):
        raise CheckpointError(f"{folder}: saved without EMA weights; set ema_decay as in that run, or start anew")
    state = _state(model, optimizer, ema)
    with warnings.catch_warnings():  # DCP warns that it loads without a process group: that is the intent here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        dcp.load(state, checkpoint_id=path)
    if optimizer is None:
        set_model_state_dict(model, state["model"])
    else:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
