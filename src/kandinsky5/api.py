"""The user-facing entry points. Generation classes join these as the pipeline lands."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from .checkpoint import CheckpointError, load_dit
from .devices import parse_dtype, resolve_device
from .hub import resolve_dit_files
from .models import CrossDiT
from .variants import get_variant

__all__ = ["load_transformer"]

logger = logging.getLogger(__name__)


def load_transformer(
    source: str | Path,
    variant: str | None = None,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
) -> CrossDiT:
    """Load the CrossDiT of an official checkpoint from a file, a folder, a variant name or a Hub repo.

    The architecture comes from the diffusers ``config.json`` when the files carry one, else from the
    variant (named by ``variant`` or recognised from the repo id). Defaults: the best device present,
    bf16 on accelerators and fp32 on the CPU; time embedding and modulation always stay fp32.
    """
    resolved = resolve_dit_files(source, variant)
    name = variant or resolved.variant
    config = resolved.config
    if name is not None:
        expected = get_variant(name).dit
        if config is not None and config != expected:
            raise CheckpointError(f"{source}: its config.json describes {config}, not variant {name!r}")
        config = expected
    if config is None:
        raise CheckpointError(
            f"{source}: cannot tell which architecture this file holds; pass variant= "
            "(see `kandinsky5 models`)"
        )
    device = resolve_device(device)
    model = load_dit(resolved.files, config, device=device, dtype=parse_dtype(dtype, device), expected=name)
    logger.info("loaded %s DiT (%s layout) on %s", name or "custom", resolved.layout, device)
    return model
