"""LoRA adapters for the CrossDiT: choose target layers, train through peft, save and load diffusers-format files.

A LoRA adds ``scale · B(A x)`` to the output of a linear layer ``y = W x + b``, with ``A`` (rank, in) and
``B`` (out, rank). Three jobs live here:

- **Training** (``add_lora``): peft wraps the chosen linears of an existing CrossDiT; only ``A`` and ``B``
  train. ``lora_targets`` name layers inside the transformer blocks (``TARGETS``).
- **Saving** (``save_lora``): one safetensors file in the diffusers Kandinsky 5 format, the keys that
  ``Kandinsky5T2VPipeline.load_lora_weights`` and ``Kandinsky5Transformer3DModel.load_lora_adapter`` read:
  ``transformer.<module>.lora_A.weight`` and ``transformer.<module>.lora_B.weight``, where ``<module>`` is
  the diffusers module name (the same as ours, see ``checkpoint.diffusers_key``). The file carries no
  alpha: ``alpha / rank`` is folded into ``B``, so every loader that assumes alpha = rank (diffusers
  without metadata, ComfyUI, ours) applies it at strength 1.
- **Inference** (``read_lora``, ``apply_loras``): a file in diffusers naming (with or without the
  ``transformer.`` prefix), peft naming (``base_model.model.<module>.lora_A.weight``, alpha from an
  ``adapter_config.json`` beside it or diffusers' ``lora_adapter_metadata``) or kohya's
  ``lora_down`` / ``lora_up`` / ``alpha``. Every key is checked against the DiT (name and shape)
  before any weight is read.

At inference we do not use peft and do not merge: ``apply_loras`` adds each LoRA through a forward hook
on its linear, for the length of a ``with`` block. The base weights are never written, so leaving the
block restores the base model exactly (no merge/unmerge rounding), several LoRAs with their own scales
simply add up, ``scale = 0`` skips a LoRA (bit-identical base output), and nothing about the model
(state dict, offload, saving) changes.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .atomic import atomic_write
from .checkpoint import diffusers_key, official_key
from .config import DiTConfig
from .safetensors_file import PICKLE_SUFFIXES, CheckpointError, read_header

__all__ = [
    "DEFAULT_TARGETS",
    "LoraError",
    "LoraLayer",
    "LoraWeights",
    "TARGETS",
    "add_lora",
    "apply_loras",
    "has_lora",
    "lora_state_dict",
    "read_lora",
    "save_lora",
    "target_errors",
    "target_modules",
]

# Linear layers inside a transformer block that a LoRA may target (module paths relative to the block).
_ATTENTION = ("to_query", "to_key", "to_value", "out_layer")
TARGETS = (
    *(f"self_attention.{p}" for p in _ATTENTION),
    *(f"cross_attention.{p}" for p in _ATTENTION),  # visual blocks only
    "feed_forward.in_layer",
    "feed_forward.out_layer",
)
DEFAULT_TARGETS = ("self_attention", "cross_attention", "feed_forward")  # every attention and feed-forward linear
_BLOCK = re.compile(r"^(text|visual)_transformer_blocks\.\d+\.(.+)$")

DIFFUSERS_PREFIX = "transformer."  # diffusers' pipelines keep the transformer's LoRA keys under this prefix
_PREFIXES = ("base_model.model.", "transformer.", "diffusion_model.")  # peft, diffusers, ComfyUI
_KEY = re.compile(r"^(?P<module>.+?)\.(?P<kind>lora_A|lora_B|lora_down|lora_up)\.weight$")
_PEFT_CONFIG = "adapter_config.json"
_FILE_NAMES = ("pytorch_lora_weights.safetensors", "adapter_model.safetensors")  # diffusers, peft folders


class LoraError(CheckpointError):
    """A LoRA file that cannot be used; the message names the file and the reason, on one line."""


# --------------------------------------------------------------------------------------------------
# Targets
# --------------------------------------------------------------------------------------------------


def _selects(entry: str, path: str) -> bool:
    """Does a ``lora_targets`` entry pick the in-block linear ``path``? Whole path, a prefix or a suffix."""
    return path == entry or path.startswith(entry + ".") or path.endswith("." + entry)


def target_errors(targets: Sequence[str]) -> list[str]:
    """Entries of ``lora_targets`` that select no layer, as messages (empty when all are fine)."""
    if not targets:
        return ["lora_targets: give at least one layer name, e.g. " + json.dumps(list(DEFAULT_TARGETS))]
    bad = [t for t in targets if not any(_selects(t, path) for path in TARGETS)]
    if not bad:
        return []
    return [f"lora_targets: {bad} select no layer; use names from {list(TARGETS)}, a prefix or a suffix of them"]


def target_modules(model: nn.Module, targets: Sequence[str]) -> list[str]:
    """Full module names of the linears in ``model``'s transformer blocks that ``targets`` select."""
    names = []
    for name, module in model.named_modules():
        match = _BLOCK.match(name)
        if isinstance(module, nn.Linear) and match and match[2] in TARGETS:
            if any(_selects(t, match[2]) for t in targets):
                names.append(name)
    return names


# --------------------------------------------------------------------------------------------------
# Training through peft, and saving
# --------------------------------------------------------------------------------------------------


def add_lora(model: nn.Module, rank: int, alpha: float, targets: Sequence[str] = DEFAULT_TARGETS) -> nn.Module:
    """Wrap the selected linears of ``model`` with peft LoRA layers (in place); only the adapters train.

    ``A`` starts Kaiming-uniform (from the global torch RNG) and ``B`` at zero, so the model's output is
    unchanged until the first step. The forward scale is ``alpha / rank``.
    """
    from peft import LoraConfig, inject_adapter_in_model

    names = target_modules(model, targets)
    if not names:
        raise ValueError(f"lora_targets {list(targets)} select no layer of this model")
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=names, lora_dropout=0.0, bias="none")
    return inject_adapter_in_model(config, model)


def lora_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The trained adapters of a peft-wrapped model in diffusers' Kandinsky 5 LoRA format (fp32 copies).

    Keys: ``transformer.<module>.lora_A.weight`` (rank, in) and ``...lora_B.weight`` (out, rank), with
    peft's ``alpha / rank`` folded into B. ``state``: full tensors by parameter name to read instead of
    the model's own (e.g. gathered from FSDP shards).
    """
    tensors = dict(model.named_parameters()) if state is None else state
    out: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if not isinstance(getattr(module, "lora_A", None), nn.ModuleDict) or not module.lora_A:
            continue
        (adapter,) = module.lora_A.keys()  # add_lora injects one adapter
        key = DIFFUSERS_PREFIX + diffusers_key(f"{name}.weight").removesuffix(".weight")
        down = tensors[f"{name}.lora_A.{adapter}.weight"].detach().float().cpu()
        up = tensors[f"{name}.lora_B.{adapter}.weight"].detach().float().cpu() * module.scaling[adapter]
        out[f"{key}.lora_A.weight"], out[f"{key}.lora_B.weight"] = down.contiguous(), up.contiguous()
    if not out:
        raise ValueError("the model holds no LoRA adapters (was add_lora called?)")
    return out


def has_lora(model: nn.Module) -> bool:
    """Does ``model`` hold peft LoRA layers (``add_lora``)?"""
    return any(isinstance(getattr(m, "lora_A", None), nn.ModuleDict) and m.lora_A for m in model.modules())


def save_lora(
    model: nn.Module,
    path: str | Path,
    description: dict | None = None,
    state: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Write the adapters of ``model`` to ``path`` (a ``.safetensors`` file) atomically; returns the path.

    ``description`` (JSON-able, e.g. rank, alpha, base variant) goes into the file's metadata under
    ``kandinsky5_lora``; loaders ignore it. ``state`` as in :func:`lora_state_dict`.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: a LoRA file must end in .safetensors")
    tensors = lora_state_dict(model, state)
    metadata = {"format": "pt", "kandinsky5_lora": json.dumps(description or {}, sort_keys=True)}
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoraLayer:
    """One adapted linear: output += scale · up(down(x)); down (rank, in), up (out, rank), fp32."""

    down: torch.Tensor
    up: torch.Tensor
    scale: float  # alpha / rank (1.0 when the file carries no alpha)


@dataclass(frozen=True)
class LoraWeights:
    """A LoRA file read and checked against a DiT: our module name → its layer."""

    path: Path
    layers: dict[str, LoraLayer]


def _lora_file(path: Path) -> Path:
    """The weight file: ``path`` itself, or the diffusers / peft file name inside a folder."""
    if path.is_dir():
        for name in _FILE_NAMES:
            if (path / name).is_file():
                return path / name
        raise LoraError(f"{path}: no {' or '.join(_FILE_NAMES)} in this folder")
    if not path.exists():
        raise LoraError(f"LoRA file not found: {path}")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise LoraError(f"{path}: pickle files can run code; LoRAs must be .safetensors")
    return path


def _module_name(key: str) -> str:
    """Strip the peft / diffusers / ComfyUI prefixes, then map diffusers naming to ours."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix) :], True
    return official_key(key + ".weight").removesuffix(".weight")


def _alphas(path: Path, metadata: dict[str, str] | None) -> tuple[float | None, dict[str, float], bool]:
    """(default alpha, alpha per module pattern, rsLoRA) from diffusers' metadata or peft's adapter_config.json."""
    config: dict = {}
    if metadata and "lora_adapter_metadata" in metadata:
        raw = json.loads(metadata["lora_adapter_metadata"])
        config = {k.removeprefix(DIFFUSERS_PREFIX): v for k, v in raw.items()}
    elif (path.parent / _PEFT_CONFIG).is_file():
        config = json.loads((path.parent / _PEFT_CONFIG).read_text(encoding="utf-8"))
    alpha = None if config.get("lora_alpha") is None else float(config["lora_alpha"])
    return alpha, dict(config.get("alpha_pattern") or {}), bool(config.get("use_rslora", False))


def _pattern_alpha(module: str, patterns: dict[str, float]) -> float | None:
    """peft's rule: a pattern applies when it matches the end of the module name at a dot boundary."""
    for pattern, alpha in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return float(alpha)
    return None


def read_lora(path: str | Path, config: DiTConfig, *, load: bool = True) -> LoraWeights:
    """Read a LoRA file and check every key against a CrossDiT of ``config`` (names and shapes).

    ``load=False`` checks the header only and returns empty layers (the CLI's check before any model
    loads). Raises :class:`LoraError` for a missing file, a file that is not safetensors, keys that are
    not LoRA weights or match no linear layer, and shapes that do not fit.
    """
    from .models import CrossDiT

    path = _lora_file(Path(path).expanduser())
    try:
        header = read_header(path)
    except CheckpointError as err:
        raise LoraError(str(err).replace("checkpoint not found", "LoRA file not found")) from None
    if not header:
        raise LoraError(f"{path}: holds no tensors")
    with torch.device("meta"):
        linears = {n: m for n, m in CrossDiT(config).named_modules() if isinstance(m, nn.Linear)}

    parts: dict[str, dict[str, str]] = {}  # module → {"down"|"up"|"alpha": key}
    foreign = []
    for key in header:
        if key.endswith(".alpha"):
            parts.setdefault(_module_name(key.removesuffix(".alpha")), {})["alpha"] = key
        elif match := _KEY.match(key):
            kind = "down" if match["kind"] in ("lora_A", "lora_down") else "up"
            parts.setdefault(_module_name(match["module"]), {})[kind] = key
        else:
            foreign.append(key)
    if foreign:
        raise LoraError(f"{path}: {len(foreign)} keys are not LoRA weights (lora_A/lora_B): {_few(foreign)}")
    unknown = [m for m in parts if m not in linears]
    if unknown:
        raise LoraError(
            f"{path}: {len(unknown)} LoRA modules match no layer of the DiT: {_few(unknown)}; "
            "expected names like visual_transformer_blocks.0.self_attention.to_query"
        )
    for module, found in parts.items():
        if "down" not in found or "up" not in found:
            raise LoraError(f"{path}: {module} needs both lora_A and lora_B weights")
        down, up, linear = header[found["down"]].shape, header[found["up"]].shape, linears[module]
        if len(down) != 2 or len(up) != 2 or down != (up[1], linear.in_features) or up[0] != linear.out_features:
            raise LoraError(
                f"{path}: {module} has lora_A {list(down)} and lora_B {list(up)}, but the layer maps "
                f"{linear.in_features} → {linear.out_features}; the LoRA was made for another model"
            )
    if not load:
        return LoraWeights(path, {})

    layers = {}
    try:
        with safe_open(path, framework="pt") as f:
            alpha, patterns, rslora = _alphas(path, f.metadata())
            for module, found in parts.items():
                down, up = f.get_tensor(found["down"]).float(), f.get_tensor(found["up"]).float()
                rank = down.shape[0]
                a = float(f.get_tensor(found["alpha"])) if "alpha" in found else None
                a = a if a is not None else _pattern_alpha(module, patterns)
                a = a if a is not None else alpha
                scale = 1.0 if a is None else a / (math.sqrt(rank) if rslora else rank)
                layers[module] = LoraLayer(down, up, scale)
    except (SafetensorError, json.JSONDecodeError, ValueError) as err:
        raise LoraError(f"{path}: {' '.join(str(err).split())}") from None
    return LoraWeights(path, layers)


def _few(items: Sequence[str], limit: int = 3) -> str:
    return ", ".join(items[:limit]) + (f" ... and {len(items) - limit} more" if len(items) > limit else "")


# --------------------------------------------------------------------------------------------------
# Applying at inference
# --------------------------------------------------------------------------------------------------


def _hook(down: torch.Tensor, up: torch.Tensor, scale: float):
    def add_delta(_module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0].to(down.dtype)
        return output + (F.linear(F.linear(x, down), up) * scale).to(output.dtype)

    return add_delta


@contextlib.contextmanager
def apply_loras(model: nn.Module, loras: Sequence[tuple[LoraWeights, float]]) -> Iterator[nn.Module]:
    """Within the block, ``model`` runs with every ``(weights, strength)`` LoRA added; afterwards it is
    the base model again, exactly (the weights are never modified).

    Each layer's output gains ``strength · scale · up(down(x))``, computed in the layer's dtype on its
    device (put the model on its device first). LoRAs with strength 0 are skipped entirely.
    """
    handles = []
    try:
        for weights, strength in loras:
            if strength == 0:
                continue
            for name, layer in weights.layers.items():
                linear = model.get_submodule(name)
                like = {"device": linear.weight.device, "dtype": linear.weight.dtype}
                hook = _hook(layer.down.to(**like), layer.up.to(**like), layer.scale * strength)
                handles.append(linear.register_forward_hook(hook))
        yield model
    finally:
        for handle in handles:
            handle.remove()
