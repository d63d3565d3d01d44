"""Training checkpoints without pickle: tensors in safetensors, everything else in JSON, folders committed atomically.

One checkpoint is one folder ``output_dir/checkpoints/step_XXXXXXX/``::

    model.safetensors       the DiT weights (official key names: loads with kandinsky5.checkpoint.load_dit);
                            in LoRA runs only the trainable adapter tensors (the frozen base comes from the config)
    optimizer.safetensors   optimizer state tensors, keyed "<parameter name>/<state key>" (e.g. ".../exp_avg")
    rng.safetensors         torch CPU and CUDA RNG states and the trainer's own generators
    ema.safetensors         only with EMA: the moving averages of the trainable weights, by parameter name
    state.json              written last: step, optimizer hyper-parameters, LR scheduler, sampler position,
                            Python and NumPy RNG states, trainer extras, and the list of files above

The folder is written under a hidden temporary name, every file fsynced, then renamed into place, so a
kill or a full disk at any moment leaves either the complete new checkpoint or none (the previous ones
are untouched). ``latest_checkpoint`` returns the newest folder that passes a completeness check.

A run of several processes writes the same folder with torch.distributed.checkpoint instead
(``sharded_checkpoint.py``); ``load_checkpoint`` reads both kinds.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import secrets
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..atomic import atomic_write, fsync_path, write_json_durable
from ..safetensors_file import CheckpointError, read_header, write_safetensors

__all__ = [
    "CHECKPOINTS",
    "list_checkpoints",
    "latest_checkpoint",
    "load_checkpoint",
    "save_checkpoint",
]

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"  # sub-folder of output_dir
STATE = "state.json"
MODEL, OPTIMIZER, RNG, EMA = "model.safetensors", "optimizer.safetensors", "rng.safetensors", "ema.safetensors"
FORMAT, VERSION = "kandinsky5-train-checkpoint", 1
SHARDED = "torch.distributed.checkpoint"  # state.json "layout" of checkpoints written by several processes
_STEP_DIR = re.compile(r"^step_(\d{7,})$")
_TEMP_PREFIX, _TRASH_PREFIX = ".tmp-", ".trash-"


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


# --------------------------------------------------------------------------------------------------
# Optimizer and RNG state as tensors + JSON
# --------------------------------------------------------------------------------------------------


def _parameter_names(model: nn.Module) -> dict[int, str]:
    return {id(p): name for name, p in model.named_parameters()}


def _model_tensors(model: nn.Module, trainable_only: bool) -> dict[str, torch.Tensor]:
    """The model tensors a checkpoint holds: the whole state dict, or only the parameters that train."""
    if not trainable_only:
        return model.state_dict()
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def _split_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer state → (tensors keyed "name/key", JSON with param groups by name and non-tensor state)."""
    names = _parameter_names(model)
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    groups = []
    for group in optimizer.param_groups:
        group_names = [names[id(p)] for p in group["params"]]
        groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": group_names})
        for p, name in zip(group["params"], group_names, strict=True):
            for key, value in optimizer.state.get(p, {}).items():
                if isinstance(value, torch.Tensor):
                    tensors[f"{name}/{key}"] = value
                else:
                    scalars.setdefault(name, {})[key] = value
    return tensors, {"param_groups": groups, "scalars": scalars}


def _restore_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, path: Path, meta: dict) -> None:
    names = _parameter_names(model)
    current = [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]
    saved = [g["params"] for g in meta["param_groups"]]
    if current != saved:
        raise CheckpointError(
            f"{path}: the optimizer was saved for other parameters (trainable set or grouping changed); "
            "resume with the same model and config, or start a new output_dir"
        )
    index = {name: i for i, name in enumerate(n for group in current for n in group)}
    state: dict[int, dict[str, Any]] = {}
    with safe_open(path, framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 - safe_open handles are not iterable
            name, _, entry = key.rpartition("/")
            state.setdefault(index[name], {})[entry] = f.get_tensor(key)
    for name, values in meta["scalars"].items():
        state.setdefault(index[name], {}).update(values)
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in meta["param_groups"]]
    for group in groups:
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _rng_state(generators: Mapping[str, torch.Generator]) -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = state
    for name, generator in generators.items():
        tensors[f"generator.{name}"] = generator.get_state()
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    meta = {
        "python": [version, list(mt), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }
    return tensors, meta


def _restore_rng(path: Path, meta: dict, generators: Mapping[str, torch.Generator]) -> None:
    with safe_open(path, framework="pt") as f:
        saved = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
    torch.set_rng_state(saved["torch_cpu"])
    cuda = [saved[f"cuda.{i}"] for i in range(len([k for k in saved if k.startswith("cuda.")]))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    elif cuda:
        logger.warning("checkpoint holds %d CUDA RNG states; not restored on this machine", len(cuda))
    for name, generator in generators.items():
        key = f"generator.{name}"
        if key not in saved:
            raise CheckpointError(f"{path}: no state for the {name!r} generator")
        generator.set_state(saved[key])
    version, mt, gauss = meta["python"]
    random.setstate((version, tuple(mt), gauss))
    kind, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


# --------------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------------


def _remove_dir(path: Path) -> None:
    """Delete a folder so that no half-deleted copy is ever visible under its real name."""
    trash = path.with_name(f"{_TRASH_PREFIX}{path.name}-{secrets.token_hex(4)}")
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _remove_leftovers(folder: Path) -> None:
    """Temporary and half-deleted folders of an earlier, interrupted process."""
    for path in folder.iterdir():
        if path.is_dir() and path.name.startswith((_TEMP_PREFIX, _TRASH_PREFIX)):
            shutil.rmtree(path, ignore_errors=True)


def save_checkpoint(
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
    trainable_only: bool = False,
    ema: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``checkpoints/step_XXXXXXX`` atomically and keep only the newest ``keep_last_k`` checkpoints.

    ``generators`` are trainer-owned RNGs (noise, timesteps) saved by name; ``sampler`` the data
    sampler position; ``extra`` any JSON-able trainer values; ``ema`` the EMA weights by parameter
    name. Returns the checkpoint folder. On failure
    (e.g. OSError for a full disk) the temporary folder is removed, the error re-raised, and the
    previous checkpoints stay as they were.

    ``trainable_only``: save only the parameters that train (LoRA adapters); the frozen base is rebuilt
    from the run's config on resume, and ``load_checkpoint`` loads such a file into those parameters.
    """
    root = Path(output_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(root)
    final = root / step_dir_name(step)
    if final.exists():
        if _is_complete(final):
            logger.info("checkpoint %s already exists; not written again", final)
            _prune(root, keep_last_k)
            return final
        _remove_dir(final)

    temp = root / f"{_TEMP_PREFIX}{final.name}-{secrets.token_hex(4)}"
    temp.mkdir()
    try:
        write_safetensors(temp / MODEL, _model_tensors(model, trainable_only))
        optimizer_tensors, optimizer_meta = _split_optimizer(model, optimizer)
        write_safetensors(temp / OPTIMIZER, optimizer_tensors)
        rng_tensors, rng_meta = _rng_state(generators or {})
        atomic_write(temp / RNG, lambda tmp: save_file(rng_tensors, str(tmp)))
        if ema is not None:
            write_safetensors(temp / EMA, dict(ema))
        state = {
            "format": FORMAT,
            "version": VERSION,
            "step": step,
            "model_tensors": "trainable" if trainable_only else "all",
            "files": [MODEL, OPTIMIZER, RNG] + ([EMA] if ema is not None else []),
            "optimizer": optimizer_meta,
            "scheduler": None if scheduler is None else _jsonable_scheduler(scheduler),
            "sampler": dict(sampler or {}),
            "rng": rng_meta,
            "extra": dict(extra or {}),
        }
        atomic_write(temp / STATE, lambda tmp: write_json_durable(tmp, state))
        fsync_path(temp)
        os.rename(temp, final)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    fsync_path(root)
    _prune(root, keep_last_k)
    logger.info("saved checkpoint %s", final)
    return final


def _jsonable_scheduler(scheduler: torch.optim.lr_scheduler.LRScheduler) -> dict:
    state = scheduler.state_dict()
    if any(v is not None for v in state.get("lr_lambdas", [])):
        raise TypeError("LR lambdas with state (callable objects) cannot be saved as JSON; use plain functions")
    return state


def _prune(root: Path, keep_last_k: int | None) -> None:
    if keep_last_k is None:
        return
    if keep_last_k < 1:
        raise ValueError(f"keep_last_k must be >= 1, got {keep_last_k}")
    for old in list_checkpoints(root.parent)[:-keep_last_k]:
        _remove_dir(old)


# --------------------------------------------------------------------------------------------------
# Finding and loading
# --------------------------------------------------------------------------------------------------


def _read_state(folder: Path) -> dict:
    state = json.loads((folder / STATE).read_text(encoding="utf-8"))
    if state.get("format") != FORMAT or state.get("version") != VERSION:
        raise CheckpointError(f"{folder}: not a version-{VERSION} training checkpoint")
    return state


def _is_complete(folder: Path) -> bool:
    """state.json parses and every file it lists exists; safetensors files have sound headers of the right length."""
    try:
        state = _read_state(folder)
        for name in state["files"]:
            if name.endswith(".safetensors"):
                read_header(folder / name)
            elif not (folder / name).is_file():
                return False
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return True


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Every ``step_XXXXXXX`` folder under ``output_dir/checkpoints``, oldest first (complete or not)."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint folder of a run, or None; incomplete folders are skipped (logged)."""
    for folder in reversed(list_checkpoints(output_dir)):
        if _is_complete(folder):
            return folder
        logger.warning("ignoring incomplete checkpoint %s", folder)
    return None


def load_checkpoint(
    folder: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    *,
    generators: Mapping[str, torch.Generator] | None = None,
    restore_rng: bool = True,
    ema: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Load a checkpoint into live objects; returns its JSON state (``step``, ``sampler``, ``extra``, ...).

    Model weights are copied tensor by tensor into ``model`` (strict: the key sets must be equal).
    With ``restore_rng`` the global Python, NumPy and torch RNGs and ``generators`` are set as saved.
    ``ema``: tensors by parameter name that receive the saved EMA weights. A checkpoint written by
    several processes (torch.distributed.checkpoint) loads at any world size, a single process included.
    """
    folder = Path(folder)
    if not _is_complete(folder):
        raise CheckpointError(f"{folder}: incomplete or damaged checkpoint; use latest_checkpoint() to pick one")
    state = _read_state(folder)
    if state.get("layout") == SHARDED:
        from .sharded_checkpoint import load_sharded

        load_sharded(folder, model, optimizer, ema)
        _restore_rest(folder, state, scheduler, generators, restore_rng)
        return state
    if _is_sharded(model):
        raise CheckpointError(
            f'{folder}: written by a single process; resume it with distributed = "none" or "ddp" '
            "(FSDP resumes from checkpoints written by several processes only)"
        )

    targets = _model_tensors(model, state.get("model_tensors") == "trainable")
    with safe_open(folder / MODEL, framework="pt") as f:
        saved = set(f.keys())
        missing, unexpected = sorted(set(targets) - saved), sorted(saved - set(targets))
        if missing or unexpected:
            raise CheckpointError(
                f"{folder / MODEL}: does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        with torch.no_grad():
            for key, target in targets.items():
                value = f.get_tensor(key)
                if value.shape != target.shape:
                    raise CheckpointError(f"{folder / MODEL}: {key} is {list(value.shape)}, model {list(target.shape)}")
                target.copy_(value)

    if optimizer is not None:
        _restore_optimizer(model, optimizer, folder / OPTIMIZER, state["optimizer"])
    if ema is not None:
        _restore_ema(folder, state, ema)
    _restore_rest(folder, state, scheduler, generators, restore_rng)
    return state


def _is_sharded(model: nn.Module) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def _restore_ema(folder: Path, state: dict, ema: Mapping[str, torch.Tensor]) -> None:
    if EMA not in state["files"]:
        raise CheckpointError(f"{folder}: saved without EMA weights; set ema_decay as in that run, or start anew")
    with safe_open(folder / EMA, framework="pt") as f:
        saved = set(f.keys())
        if saved != set(ema):
            raise CheckpointError(f"{folder / EMA}: the EMA was saved for other parameters")
        with torch.no_grad():
            for key, target in ema.items():
                target.copy_(f.get_tensor(key))


def _restore_rest(
    folder: Path,
    state: dict,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    generators: Mapping[str, torch.Generator] | None,
    restore_rng: bool,
) -> None:
    """The LR schedule and the RNGs, stored the same way by both checkpoint kinds."""
    if scheduler is not None:
        if state["scheduler"] is None:
            raise CheckpointError(f"{folder}: saved without an LR scheduler")
        scheduler.load_state_dict(state["scheduler"])
    if restore_rng:
        _restore_rng(folder / RNG, state["rng"], generators or {})
