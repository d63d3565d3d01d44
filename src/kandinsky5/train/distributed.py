"""Several processes, one run: the process group, DDP or FSDP2 wrapping, and each rank's share of a batch.

Launch with ``torchrun --nproc_per_node N -m kandinsky5.cli train CONFIG`` (or any launcher that sets
torchrun's ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``). Every rank
draws the same global batch from the same sampler and the same timesteps and noise from the same
generator, then computes the loss of its own rows only. Each rank's loss is weighted so that the
averaged gradient is the gradient of the global batch mean: N processes follow the trajectory of one
process on the same global batch, up to the order of floating-point sums.

FSDP2 (``fully_shard``) shards every transformer block and then the root, as in torchtitan's
``parallelize.py``; the last block keeps its parameters gathered after the forward pass, since the
backward pass needs them at once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from .config import ConfigError, TrainConfig

__all__ = ["Distributed", "free_local_port", "setup_distributed", "unwrap"]

logger = logging.getLogger(__name__)

Kind = Literal["none", "ddp", "fsdp"]


def _env_world_size() -> int:
    value = os.environ.get("WORLD_SIZE", "1")
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"WORLD_SIZE must be an integer, got {value!r}; launch with torchrun") from None


@dataclass(frozen=True)
class Distributed:
    """Where this process stands in the run. ``kind == "none"``: one process (rank 0 of 1)."""

    kind: Kind = "none"
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # this run created the process group and destroys it at the end

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the files (metrics, config, validation clips, export) and logs progress."""
        return self.rank == 0

    def device(self, requested: torch.device) -> torch.device:
        """One CUDA device per local rank; other device types are used as requested."""
        if self.kind != "none" and requested.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return requested

    # --- the model -----------------------------------------------------------------------------------

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """DDP or FSDP2 around ``model`` (in place for FSDP: its class changes, its names do not)."""
        if self.kind == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        if self.kind == "fsdp":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh(device.type, (self.world_size,))
            blocks = [*model.text_transformer_blocks, *model.visual_transformer_blocks]
            for i, block in enumerate(blocks):
                fully_shard(block, mesh=mesh, reshard_after_forward=i < len(blocks) - 1)
            fully_shard(model, mesh=mesh)
        return model

    @contextlib.contextmanager
    def gradient_sync(self, model: nn.Module, enabled: bool) -> Iterator[None]:
        """Skip the gradient all-reduce for all but the last micro-batch of an accumulated step."""
        if enabled or self.kind == "none":
            yield
        elif self.kind == "ddp":
            with model.no_sync():
                yield
        else:
            model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                model.set_requires_gradient_sync(True)

    # --- the batch -----------------------------------------------------------------------------------

    def share(self, batch_size: int) -> list[int]:
        """The positions of a global batch this rank computes: rank, rank + world, ... (may be empty)."""
        return list(range(self.rank, batch_size, self.world_size))

    def loss_weight(self, rows: Sequence[int], batch_size: int) -> float:
        """Factor on this rank's mean loss so that the ranks' averaged gradient is the global mean's."""
        return len(rows) * self.world_size / batch_size

    def global_mean(self, local_mean: float, rows: Sequence[int], batch_size: int) -> float:
        """The mean loss over the global batch from each rank's mean over its rows."""
        if self.kind == "none":
            return local_mean
        total = torch.tensor([local_mean * len(rows) / batch_size], dtype=torch.float64)
        torch.distributed.all_reduce(total)
        return float(total)

    def gathered(self, model: nn.Module, build_empty: Callable[[], nn.Module]) -> nn.Module | None:
        """The whole model for writing it out: ``model`` itself unless FSDP shards it; then the shards are
        gathered (collective) into a fresh ``build_empty()`` model on rank 0, and other ranks get None."""
        if self.kind != "fsdp":
            return model
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.is_main:
            return None
        full = build_empty()
        full.load_state_dict(state)
        return full

    def barrier(self) -> None:
        if self.kind != "none":
            torch.distributed.barrier()

    def close(self) -> None:
        if self.owns_group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def free_local_port() -> int:
    """A TCP port on 127.0.0.1 that is free now: ``MASTER_PORT`` for ranks launched on this machine."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def setup_distributed(config: TrainConfig, device: torch.device) -> Distributed:
    """The run's process layout from the config and torchrun's environment; joins or creates the group.

    ``distributed = "auto"`` picks DDP when started by torchrun with several processes, one process
    otherwise. A process group created elsewhere (already initialised) is used and left open.
    """
    initialized = torch.distributed.is_available() and torch.distributed.is_initialized()
    world = torch.distributed.get_world_size() if initialized else _env_world_size()
    kind = config.distributed
    if kind == "auto":
        kind = "ddp" if world > 1 else "none"
    if world <= 1:
        if kind != "none":
            logger.info("distributed = %r with one process: training without a process group", kind)
        return Distributed()
    if kind == "none":
        raise ConfigError(
            f'distributed: "none" but {world} processes were started (WORLD_SIZE); use "ddp" or "fsdp", '
            "or start a single process"
        )
    if not torch.distributed.is_available():
        raise ConfigError("distributed: this PyTorch build has no torch.distributed")
    if not initialized:
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.distributed.init_process_group(backend)
    rank = torch.distributed.get_rank()
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    logger.info("rank %d of %d (%s)", rank, world, kind)
    return Distributed(kind, rank, world, local_rank, owns_group=not initialized)


def unwrap(model: nn.Module) -> nn.Module:
    """The DiT inside a DDP wrapper (FSDP2 wraps in place, so its model is the DiT itself)."""
    return getattr(model, "module", model)
