"""The one module that names devices and picks dtypes.

Defaults: the best accelerator present (CUDA, then Apple MPS), else the CPU; bf16 on accelerators
(the official checkpoints are bf16), fp32 on the CPU (bf16 matmuls are slow on most CPUs).
Every default can be overridden by the caller.
"""

from __future__ import annotations

import torch

__all__ = ["default_device", "default_dtype", "parse_dtype", "resolve_device"]

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_device(device: torch.device | str | None) -> torch.device:
    """``None`` → ``default_device()``; a name is checked to exist, with a clear error otherwise."""
    if device is None:
        return default_device()
    try:
        resolved = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"unknown device {device!r}; use 'cpu', 'cuda', 'cuda:1' or 'mps'") from err
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available; use 'cpu'")
    if resolved.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ValueError(f"device {device!r} requested but MPS is not available; use 'cpu'")
    return resolved


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "cpu" else torch.bfloat16


def parse_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    """Accept a torch dtype, a name such as "bf16", or None for the device default."""
    if dtype is None:
        return default_dtype(device)
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[dtype.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(sorted(_DTYPES))}") from None
