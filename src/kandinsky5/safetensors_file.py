"""The safetensors file format: header checks without reading data, streaming writes, atomic files.

We read headers ourselves so a truncated or corrupt file fails with a clear message before any weight
is touched, and write tensors one at a time because ``safetensors.torch.save_file`` first copies every
tensor into host memory (twice the model size for a 19B checkpoint). Files written here load with the
safetensors library itself (tested).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from .atomic import atomic_write, write_json_durable

__all__ = [
    "CheckpointError",
    "TensorInfo",
    "atomic_write",
    "read_header",
    "write_json",
    "write_safetensors",
]

PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"})
MAX_HEADER_BYTES = 100_000_000  # the limit the safetensors library itself enforces
# Bytes per element of every safetensors dtype; only the floating ones can hold DiT weights.
DTYPE_SIZES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "U16": 2,
    "I16": 2,
    "F16": 2,
    "BF16": 2,
    "U32": 4,
    "I32": 4,
    "F32": 4,
    "U64": 8,
    "I64": 8,
    "F64": 8,
}
FLOAT_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
DTYPE_NAMES = {dtype: name for name, dtype in FLOAT_DTYPES.items()}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message says which file and why, on one line."""


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as a safetensors header describes it; ``start``/``end`` are offsets in the data."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


def _looks_like_pickle(head: bytes) -> bool:
    # torch.save writes a zip archive (>= 1.6) or a raw pickle stream (protocol 2+ starts 0x80 <proto>).
    return head.startswith(b"PK\x03\x04") or (len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5)


def read_header(path: str | Path) -> dict[str, TensorInfo]:
    """Parse and check the header of a safetensors file without reading its tensor data.

    Checks: the file exists and is not a pickle; the 8-byte little-endian header length and the JSON
    header are sound; every tensor's byte count is numel x dtype size; tensors tile the data region
    without gaps or overlaps; the file is exactly 8 + header + data bytes long (catches truncation).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    refuse = f"{path}: pickle checkpoints can run code; convert to safetensors (safetensors.torch.save_file)"
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise CheckpointError(refuse)
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(9)
        header_len = int.from_bytes(head[:8], "little") if len(head) >= 8 else -1
        sound = len(head) == 9 and head[8:9] == b"{" and header_len <= min(size - 8, MAX_HEADER_BYTES)
        if not sound and _looks_like_pickle(head):
            raise CheckpointError(refuse)
        if len(head) < 9:
            raise CheckpointError(f"{path}: truncated: {size} bytes is too short for a safetensors file")
        if not sound:
            raise CheckpointError(
                f"{path}: truncated or not a safetensors file: the header claims {header_len} bytes "
                f"but the file holds {size} bytes"
            )
        f.seek(8)
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CheckpointError(f"{path}: corrupt safetensors header ({err})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")

    tensors: dict[str, TensorInfo] = {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
            valid = dtype in DTYPE_SIZES and all(isinstance(n, int) and n >= 0 for n in (*shape, start, end))
        except (TypeError, KeyError, ValueError):
            valid = False
        if not valid:
            raise CheckpointError(f"{path}: corrupt safetensors header entry for {key!r}: {entry!r}")
        if end - start != math.prod(shape) * DTYPE_SIZES[dtype]:
            raise CheckpointError(f"{path}: corrupt: {key!r} is {dtype} {list(shape)} but spans {end - start} bytes")
        tensors[key] = TensorInfo(dtype, shape, start, end)

    data_bytes, offset = size - 8 - header_len, 0
    for key, info in sorted(tensors.items(), key=lambda item: (item[1].start, item[1].end)):
        if info.start != offset:
            raise CheckpointError(f"{path}: corrupt: tensor data overlaps or leaves a gap at {key!r}")
        offset = info.end
    if offset > data_bytes:
        raise CheckpointError(
            f"{path}: truncated: tensors need {offset} bytes of data but only {data_bytes} are present"
        )
    if offset < data_bytes:
        raise CheckpointError(f"{path}: corrupt: {data_bytes - offset} stray bytes after the last tensor")
    return tensors


def nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def write_json(path: Path, content: dict) -> None:
    """Write a small JSON file (config, shard index) atomically."""
    atomic_write(path, lambda tmp: write_json_durable(tmp, content))


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Stream ``tensors`` into a safetensors file, one tensor in host memory at a time."""
    header, offset = {}, 0
    for key, t in tensors.items():
        header[key] = {
            "dtype": DTYPE_NAMES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + nbytes(t)],
        }
        offset += nbytes(t)
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # pad so tensor data starts 8-byte aligned, as safetensors does

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(len(raw).to_bytes(8, "little") + raw)
            for t in tensors.values():
                f.write(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().data)

    atomic_write(path, write)
