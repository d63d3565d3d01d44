"""Safetensors checkpoints of the CrossDiT: validate, load on the meta device, save atomically.

Loading is three visible steps (docs/loading.md):

1. read every file's safetensors header ourselves and check it (sizes, offsets, file length), so a
   truncated or corrupt file fails before any weight is read;
2. build ``CrossDiT(config)`` on the meta device and compare the full key/shape set with the files;
3. stream the tensors one by one from memory-mapped files into the model (``assign``, no copy when
   the dtype already matches), so weights are never held twice.

Official checkpoints (``model/<name>.safetensors``) carry our state-dict keys without prefix. The
diffusers ``Kandinsky5Transformer3DModel`` uses the very same parameter names (checked against
diffusers 0.42.1), so the official ↔ diffusers key mapping below is the identity; it lives here and
nowhere else so that a future rename touches one function.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from .config import DiTConfig
from .models.dit import CrossDiT, keeps_fp32
from .safetensors_file import (
    FLOAT_DTYPES,
    CheckpointError,
    TensorInfo,
    nbytes,
    read_header,
    write_json,
    write_safetensors,
)

__all__ = [
    "CheckpointError",
    "Layout",
    "TensorInfo",
    "config_from_diffusers",
    "diffusers_config",
    "diffusers_key",
    "load_dit",
    "official_key",
    "read_header",
    "save_dit",
]

Layout = Literal["official", "diffusers"]

DIFFUSERS_CLASS = "Kandinsky5Transformer3DModel"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
DIFFUSERS_INDEX = "diffusion_pytorch_model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 10_000_000_000  # diffusers' default "10GB"


def _capped(items: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" ... and {len(items) - limit} more" if len(items) > limit else "")


# --------------------------------------------------------------------------------------------------
# Key and shape report
# --------------------------------------------------------------------------------------------------


def _guess_variants(shapes: dict[str, tuple[int, ...]]) -> str:
    """Which registered variants the file could be, from its patch embedding and block count (§2.9)."""
    from .variants import VARIANTS  # lazy: only needed to explain a mismatch

    probe = shapes.get("visual_embeddings.in_layer.weight")
    if probe is None:
        return ""
    blocks = {key.split(".")[1] for key in shapes if key.startswith("visual_transformer_blocks.")}
    names = [
        v.name
        for v in VARIANTS.values()
        if (v.dit.model_dim, math.prod(v.dit.patch_size) * v.dit.visual_embed_dim) == probe
        and v.dit.num_visual_blocks == len(blocks)
    ]
    if not names:
        return f"; it matches no registered variant (visual_embeddings.in_layer.weight {list(probe)})"
    return f"; the file looks like {_capped(names, 3)}"


def _check_keys(found: dict[str, tuple[int, ...]], model: nn.Module, expected: str | None) -> None:
    """Raise a CheckpointError listing missing/unexpected keys and shape mismatches, if any."""
    wanted = {key: tuple(t.shape) for key, t in model.state_dict().items()}
    missing = [key for key in wanted if key not in found]
    unexpected = [key for key in found if key not in wanted]
    mismatched = [
        f"{key} file {list(found[key])} vs model {list(shape)}"
        for key, shape in wanted.items()
        if key in found and found[key] != shape
    ]
    if not (missing or unexpected or mismatched):
        return
    c = model.config
    parts = [
        f"checkpoint does not match {expected or 'the requested config'} (model_dim={c.model_dim}, "
        f"{c.num_text_blocks} text + {c.num_visual_blocks} visual blocks, visual_cond={c.visual_cond})"
    ]
    if missing:
        parts.append(f"{len(missing)} missing keys: {_capped(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys: {_capped(unexpected)}")
    if mismatched:
        parts.append(f"{len(mismatched)} shape mismatches: {_capped(mismatched, 3)}")
    raise CheckpointError("; ".join(parts) + _guess_variants(found))


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def official_key(diffusers_name: str) -> str:
    """Our (official) state-dict key for a diffusers parameter name: the identity for Kandinsky 5."""
    return diffusers_name


def diffusers_key(official_name: str) -> str:
    """The diffusers parameter name for one of our state-dict keys: the identity for Kandinsky 5."""
    return official_name


def _assign(model: nn.Module, key: str, tensor: torch.Tensor) -> None:
    """Put ``tensor`` in place of the (meta) parameter or buffer called ``key``, without copying."""
    module_name, _, name = key.rpartition(".")
    module = model.get_submodule(module_name)
    old = getattr(module, name)
    if isinstance(old, nn.Parameter):
        setattr(module, name, nn.Parameter(tensor, requires_grad=old.requires_grad))
    else:
        module.register_buffer(name, tensor)


def load_dit(
    files: str | Path | Sequence[str | Path],
    config: DiTConfig,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    expected: str | None = None,
    layout: Layout = "official",
) -> CrossDiT:
    """Load a CrossDiT from one safetensors file or from shards, in eval mode on ``device``.

    Every header and the full key/shape set are checked before a single weight is read, so a bad
    checkpoint raises :class:`CheckpointError` and nothing is half-loaded. Tensors are then streamed
    from memory-mapped files: on CPU with a matching dtype the parameters are views of the mapped
    file (no copy). dtype policy per tensor: time embedding and modulation (``keeps_fp32``) → fp32;
    everything else → ``dtype`` if given, else the dtype stored in the file.

    ``expected`` names the variant in error messages; ``layout="diffusers"`` maps diffusers names.
    """
    paths = [Path(files)] if isinstance(files, (str, Path)) else [Path(f) for f in files]
    if not paths:
        raise CheckpointError("no checkpoint files given")
    headers = {path: read_header(path) for path in paths}
    to_official = official_key if layout == "diffusers" else (lambda key: key)

    found: dict[str, tuple[int, ...]] = {}
    for path, header in headers.items():
        for key, info in header.items():
            name = to_official(key)
            if name in found:
                raise CheckpointError(f"{path}: key {name!r} also appears in another shard")
            if info.dtype not in FLOAT_DTYPES:
                raise CheckpointError(f"{path}: {key!r} is {info.dtype}; DiT weights must be floating point")
            found[name] = info.shape

    with torch.device("meta"):
        model = CrossDiT(config)
    _check_keys(found, model, expected)

    device = torch.device(device)
    for path, header in headers.items():
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                for key in sorted(header, key=lambda k: header[k].start):  # file order: sequential reads
                    name = to_official(key)
                    target = torch.float32 if keeps_fp32(name) else (dtype or FLOAT_DTYPES[header[key].dtype])
                    _assign(model, name, f.get_tensor(key).to(device=device, dtype=target))  # no-op if same
        except SafetensorError as err:  # the file changed after validation
            raise CheckpointError(f"{path}: {err}") from None

    # CrossDiT computes RoPE and time frequencies on the fly, so it has no non-persistent buffers to
    # rebuild; a future one would be left on meta and must be recreated here.
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"load_dit left tensors on the meta device: {_capped(left)}; rebuild them here")
    return model.eval()


# --------------------------------------------------------------------------------------------------
# Diffusers config
# --------------------------------------------------------------------------------------------------

# Kandinsky5Transformer3DModel.__init__ defaults (diffusers 0.42.1), used for keys a config leaves out.
_DIFFUSERS_DEFAULTS = {
    "in_visual_dim": 4,
    "in_text_dim": 3584,
    "in_text_dim2": 768,
    "time_dim": 512,
    "out_visual_dim": 4,
    "patch_size": (1, 2, 2),
    "model_dim": 2048,
    "ff_dim": 5120,
    "num_text_blocks": 2,
    "num_visual_blocks": 32,
    "axes_dims": (16, 24, 24),
    "visual_cond": False,
}


def config_from_diffusers(config_json: dict) -> DiTConfig:
    """The DiTConfig of a diffusers ``transformer/config.json``.

    Keys only diffusers uses (attention type, NABLA settings, ``_diffusers_version``) are ignored;
    NABLA comes from the variant, not the weights.
    """
    name = config_json.get("_class_name", DIFFUSERS_CLASS)
    if name != DIFFUSERS_CLASS:
        raise CheckpointError(f"transformer config is for {name}, not {DIFFUSERS_CLASS}")
    values: dict = {}
    try:
        for key, default in _DIFFUSERS_DEFAULTS.items():
            value = config_json.get(key, default)
            if isinstance(default, tuple):
                values[key] = tuple(int(v) for v in value)
            else:
                values[key] = bool(value) if isinstance(default, bool) else int(value)
        return DiTConfig(**values, prediction=str(config_json.get("prediction", "velocity")))
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"not a valid Kandinsky 5 transformer config: {err}") from None


def diffusers_config(config: DiTConfig) -> dict:
    """The diffusers ``transformer/config.json`` content for ``config`` (dense attention).

    A sample-predicting DiT (nano) also records ``"prediction": "sample"``, a key diffusers ignores:
    its weights load there, but diffusers' pipeline would read the output as a velocity.
    """
    values = {
        key: list(v) if isinstance(v, tuple) else v
        for key, v in ((key, getattr(config, key)) for key in _DIFFUSERS_DEFAULTS)
    }
    extra = {} if config.prediction == "velocity" else {"prediction": config.prediction}
    return {
        "_class_name": DIFFUSERS_CLASS,
        "_diffusers_version": "0.42.1",
        **values,
        "attention_type": "regular",
        **extra,
    }


# --------------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------------


def _split(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Consecutive groups of at most ``max_bytes`` (a larger tensor gets a shard of its own)."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    for key, t in tensors.items():
        if shards[-1] and sum(map(nbytes, shards[-1].values())) + nbytes(t) > max_bytes:
            shards.append({})
        shards[-1][key] = t
    return shards


def save_dit(
    model: CrossDiT,
    path: str | Path,
    layout: Layout = "official",
    *,
    max_shard_size: int = DEFAULT_MAX_SHARD_BYTES,
    state: Mapping[str, torch.Tensor] | None = None,
) -> list[Path]:
    """Save ``model``'s weights atomically, each tensor in its current dtype; returns the files written.

    ``official``: ``path`` is the ``.safetensors`` file. ``diffusers``: ``path`` is the repository
    folder; writes ``transformer/config.json`` and ``diffusion_pytorch_model.safetensors``, or shards of
    at most ``max_shard_size`` bytes plus their index, and removes weight files of an earlier save.
    ``state``: the tensors to write instead of ``model.state_dict()`` (e.g. gathered from FSDP shards).
    """
    path, state = Path(path), dict(model.state_dict() if state is None else state)
    if layout == "official":
        write_safetensors(path, state)
        return [path]
    if layout != "diffusers":
        raise ValueError(f"layout must be 'official' or 'diffusers', got {layout!r}")

    folder = path / "transformer"
    shards = _split({diffusers_key(key): t for key, t in state.items()}, max_shard_size)
    n = len(shards)
    names = (
        [DIFFUSERS_WEIGHTS]
        if n == 1
        else [f"diffusion_pytorch_model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    )
    for name, shard in zip(names, shards, strict=True):
        write_safetensors(folder / name, shard)
    written = [folder / name for name in names]
    if n > 1:
        weight_map = {key: name for name, shard in zip(names, shards, strict=True) for key in shard}
        total = sum(map(nbytes, state.values()))
        write_json(folder / DIFFUSERS_INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
        written.append(folder / DIFFUSERS_INDEX)
    write_json(folder / "config.json", diffusers_config(model.config))
    written.append(folder / "config.json")
    for old in [*folder.glob("diffusion_pytorch_model*.safetensors"), *folder.glob(DIFFUSERS_INDEX)]:
        if old not in written:
            old.unlink()  # from an earlier save with another sharding
    return written
