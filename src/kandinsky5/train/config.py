"""``TrainConfig``: every training setting in one flat, frozen, validated record, loaded from TOML or YAML.

A config file holds the fields below as top-level keys. ``model`` is a variant name
(``model = "video-lite-5s-sft"``) or, for a model trained from scratch, a ``[model]`` table with the
fields of :class:`~kandinsky5.config.DiTConfig`. Unknown keys, wrong types and out-of-range values are all
reported before any work starts, each naming the field and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ..config import DiTConfig
from ..lora import DEFAULT_TARGETS, target_errors

__all__ = ["ConfigError", "TrainConfig", "load_config"]

Schedule = Literal["constant", "cosine"]
Init = Literal["pretrained", "random"]
Parallel = Literal["auto", "none", "ddp", "fsdp"]
DTYPES = ("float32", "bfloat16")


class ConfigError(ValueError):
    """A training config that cannot be used; the message names the field(s) and the fix."""


@dataclass(frozen=True)
class TrainConfig:
    """One training run. Paths may be relative (to the working directory).

    The optimisation loop is: ``max_steps`` optimizer steps, each over ``grad_accum`` micro-batches of
    ``batch_size`` samples drawn from the latent cache in ``cache_dir``.
    """

    # --- model ---------------------------------------------------------------------------------------
    model: str | DiTConfig  # a variant name (see `kandinsky5 models`) or a DiTConfig for from-scratch runs
    init: Init = "pretrained"  # "pretrained": start from `weights`; "random": fresh (seeded) initialisation
    weights: str | None = None  # file, folder or Hub repo to start from; None = the variant's official weights
    rope_scale: tuple[float, float, float] | None = None  # None = the variant's, (1, 1, 1) for a DiTConfig
    gradient_checkpointing: bool = False  # recompute block activations in backward: less memory, more compute

    # --- LoRA (lora_rank = 0: full fine-tune) ----------------------------------------------------------
    lora_rank: int = 0  # > 0: freeze the DiT and train rank-r adapters on the linears named by lora_targets
    lora_alpha: float | None = None  # adapter scale is lora_alpha / lora_rank; None = lora_rank (scale 1)
    lora_targets: tuple[str, ...] = DEFAULT_TARGETS  # layers inside each block; see kandinsky5.lora.TARGETS

    # --- data ----------------------------------------------------------------------------------------
    cache_dir: str = "cache"  # latent cache (safetensors shards + manifest.json), see train/data.py
    data_dir: str | None = None  # media + caption folder; encoded into cache_dir when the cache is missing
    buckets: tuple[tuple[int, int], ...] | None = None  # (height, width) pixel sizes for encoding data_dir;
    # each file goes to the bucket nearest its aspect ratio; None = the variant's resolutions
    max_frames: int | None = None  # frames kept per video when encoding data_dir (4k+1); None = variant's max
    shard_size: int = 256  # items per cache shard when encoding data_dir

    # --- optimisation --------------------------------------------------------------------------------
    batch_size: int = 1  # samples per micro-batch (one latent shape per micro-batch)
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-5
    weight_decay: float = 0.0  # AdamW decoupled decay, applied to matrices only (not biases or norms)
    betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0  # gradient clipping by global norm; 0 disables it
    warmup_steps: int = 0  # linear warm-up from lr/warmup_steps to lr
    lr_schedule: Schedule = "constant"  # after warm-up: constant, or cosine decay to lr·min_lr_ratio
    min_lr_ratio: float = 0.0
    max_steps: int = 1000
    seed: int = 0  # model init, data order, noise and timesteps all derive from it

    # --- flow matching -------------------------------------------------------------------------------
    # Kandinsky 5's training timestep distribution is not published (docs/kandinsky5.md §10.6). Ours:
    # SD3's logit-normal, u = sigmoid(N(mean, std²)), then the inference shift t = s·u / (1 + (s−1)·u).
    timestep_mean: float = 0.0
    timestep_std: float = 1.0
    timestep_shift: float | None = None  # None = the variant's sampling shift, 1.0 (no shift) for a DiTConfig

    # --- precision and device ------------------------------------------------------------------------
    dtype: str = "bfloat16"  # autocast dtype on CUDA ("float32" = off); weights and optimizer stay fp32
    device: str | None = None  # None = the best device present

    # --- logging and checkpoints ---------------------------------------------------------------------
    output_dir: str = "runs/train"  # metrics.csv and checkpoints/step_XXXXXXX/
    log_every: int = 10  # one metrics.csv row (mean loss of the window) every N steps
    checkpoint_every: int = 500  # also saved at the last step
    keep_last_k: int = 3  # older checkpoints are deleted after a successful save
    tensorboard: bool = False  # also write loss, lr, grad norm and speed to output_dir/tensorboard/

    # --- scale-out and weight averaging --------------------------------------------------------------
    distributed: Parallel = "auto"  # under torchrun: "ddp" or "fsdp" (FSDP2); "auto" = DDP with >1 process
    ema_decay: float | None = None  # keep an EMA of the weights (e.g. 0.999); used for validation and export

    # --- validation clips ----------------------------------------------------------------------------
    validation_prompts: tuple[str, ...] = ()  # rendered to output_dir/validation/step_XXXXXXX/*.mp4
    validation_every: int = 500  # steps between renders (and after the last step)
    validation_steps: int = 16  # sampler steps per clip
    validation_size: tuple[int, int] = (256, 256)  # (height, width) in pixels
    validation_num_frames: int = 17  # 4k+1; 1 renders a still (saved as a 1-frame mp4)
    validation_guidance_scale: float | None = None  # None = the variant's, 1.0 for a [model] table
    validation_vae: str | None = None  # folder or Hub repo with a vae/ subfolder; None = the variant's (nano: packaged)
    validation_text_encoders: tuple[str, str] | None = None  # (Qwen2.5-VL, CLIP) folders or repos; None = variant's

    def __post_init__(self) -> None:
        _normalize_and_check_types(self)
        errors = _value_errors(self)
        if errors:
            raise ConfigError("invalid training config:\n  " + "\n  ".join(errors))

    # --- derived values --------------------------------------------------------------------------------

    @property
    def variant(self):
        """The registered variant named by ``model``, or None for a DiTConfig."""
        from ..variants import get_variant

        return get_variant(self.model) if isinstance(self.model, str) else None

    @property
    def dit_config(self) -> DiTConfig:
        return self.model if isinstance(self.model, DiTConfig) else self.variant.dit

    @property
    def resolved_rope_scale(self) -> tuple[float, float, float]:
        if self.rope_scale is not None:
            return self.rope_scale
        return self.variant.sampling.rope_scale if self.variant is not None else (1.0, 1.0, 1.0)

    @property
    def resolved_lora_alpha(self) -> float:
        return float(self.lora_rank) if self.lora_alpha is None else self.lora_alpha

    @property
    def resolved_shift(self) -> float:
        if self.timestep_shift is not None:
            return self.timestep_shift
        return self.variant.sampling.shift if self.variant is not None else 1.0

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/TOML-able values (tuples become lists, a DiTConfig a table)."""
        return _plain(dataclasses.asdict(self))


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------


def _value_errors(c: TrainConfig) -> list[str]:
    errors = []

    def need(ok: bool, message: str) -> None:
        if not ok:
            errors.append(message)

    if isinstance(c.model, str):
        from ..variants import VARIANTS

        if c.model not in VARIANTS:
            close = difflib.get_close_matches(c.model, VARIANTS, n=3, cutoff=0.5)
            hint = f"did you mean {', '.join(map(repr, close))}? " if close else ""
            errors.append(f"model: unknown variant {c.model!r}; {hint}run `kandinsky5 models` for the list")
    elif c.init == "pretrained" and c.weights is None:
        errors.append('model: a [model] table has no official weights; set init = "random" or give weights = PATH')
    need(c.init == "pretrained" or c.weights is None, 'weights: only used with init = "pretrained"; remove it')
    if c.rope_scale is not None:
        need(all(s > 0 for s in c.rope_scale), f"rope_scale: entries must be > 0, got {list(c.rope_scale)}")

    for name in ("batch_size", "grad_accum", "max_steps", "log_every", "checkpoint_every", "keep_last_k", "shard_size"):
        value = getattr(c, name)
        need(value >= 1, f"{name}: must be >= 1, got {value}")
    need(c.warmup_steps >= 0, f"warmup_steps: must be >= 0, got {c.warmup_steps}")
    need(c.lr > 0, f"lr: must be > 0, got {c.lr}; typical fine-tuning values are 1e-5 to 1e-4")
    need(c.weight_decay >= 0, f"weight_decay: must be >= 0, got {c.weight_decay}")
    need(all(0 <= b < 1 for b in c.betas), f"betas: both must be in [0, 1), got {list(c.betas)}; e.g. [0.9, 0.999]")
    need(c.adam_eps > 0, f"adam_eps: must be > 0, got {c.adam_eps}")
    need(c.max_grad_norm >= 0, f"max_grad_norm: must be >= 0 (0 disables clipping), got {c.max_grad_norm}")
    need(0 <= c.min_lr_ratio <= 1, f"min_lr_ratio: must be in [0, 1], got {c.min_lr_ratio}")
    need(c.seed >= 0, f"seed: must be >= 0, got {c.seed}")
    need(c.timestep_std > 0, f"timestep_std: must be > 0, got {c.timestep_std}; SD3 uses 1.0")
    if c.timestep_shift is not None:
        need(c.timestep_shift > 0, f"timestep_shift: must be > 0 (1.0 = no shift), got {c.timestep_shift}")
    need(c.dtype in DTYPES, f"dtype: must be one of {', '.join(DTYPES)}, got {c.dtype!r}")
    if c.max_frames is not None:
        need(c.max_frames >= 1 and (c.max_frames - 1) % 4 == 0, f"max_frames: must be 4k+1, got {c.max_frames}")
    for height, width in c.buckets or ():
        need(
            height > 0 and width > 0 and height % 16 == 0 and width % 16 == 0,
            f"buckets: sizes must be positive multiples of 16 pixels (one DiT token), got {height}x{width}",
        )
    if c.buckets is not None:
        need(len(c.buckets) > 0, "buckets: give at least one [height, width] pair, or leave it out")
    need(c.lora_rank >= 0, f"lora_rank: must be >= 0 (0 = full fine-tune), got {c.lora_rank}")
    if c.lora_rank > 0:
        need(c.lora_alpha is None or c.lora_alpha > 0, f"lora_alpha: must be > 0, got {c.lora_alpha}")
        errors.extend(target_errors(c.lora_targets))
    else:
        need(c.lora_alpha is None, "lora_alpha: only used with lora_rank > 0; remove it or set lora_rank")
        need(
            c.lora_targets == DEFAULT_TARGETS, "lora_targets: only used with lora_rank > 0; remove it or set lora_rank"
        )
    if c.device is not None:
        need(
            c.device.split(":")[0] in ("cpu", "cuda", "mps"), f"device: use cpu, cuda, cuda:N or mps, not {c.device!r}"
        )
    if c.validation_guidance_scale is not None:
        scale = c.validation_guidance_scale
        need(scale > 0, f"validation_guidance_scale: must be > 0, got {scale}")
    if c.ema_decay is not None:
        need(0 <= c.ema_decay < 1, f"ema_decay: must be in [0, 1), got {c.ema_decay}; typical values are 0.999-0.9999")
    errors.extend(_validation_errors(c))
    if c.tensorboard and importlib.util.find_spec("tensorboard") is None:
        errors.append("tensorboard: the tensorboard package is not installed; pip install tensorboard, or set false")
    return errors


def _validation_errors(c: TrainConfig) -> list[str]:
    errors = []
    for name in ("validation_every", "validation_steps"):
        if getattr(c, name) < 1:
            errors.append(f"{name}: must be >= 1, got {getattr(c, name)}")
    if c.validation_num_frames < 1 or (c.validation_num_frames - 1) % 4:
        errors.append(f"validation_num_frames: must be 4k+1 (1, 5, ..., 17, ...), got {c.validation_num_frames}")
    height, width = c.validation_size
    if height <= 0 or width <= 0 or height % 16 or width % 16:
        errors.append(f"validation_size: must be positive multiples of 16 pixels, got {height}x{width}")
    if any(not prompt.strip() for prompt in c.validation_prompts):
        errors.append("validation_prompts: a prompt is empty")
    needs_sources = c.validation_prompts and not isinstance(c.model, str)
    if needs_sources and (c.validation_vae is None or c.validation_text_encoders is None):
        errors.append(
            "validation_prompts: a [model] table names no VAE or text encoders; set validation_vae and "
            "validation_text_encoders, or remove validation_prompts"
        )
    return errors


class _WrongType(ConfigError):
    """The value is not even of the field's kind (a string for an integer, ...)."""


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """``value`` checked against the annotation ``hint``; lists become tuples, ints become floats."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(name, value, option)
            except ConfigError as err:
                errors.append(err)
        specific = [e for e in errors if not isinstance(e, _WrongType)]  # the value had the right kind
        if specific:
            raise specific[0]
        raise _WrongType(errors[0] if len(errors) == 1 else f"{name}: expected {_type_name(hint)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{name}: must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise _WrongType(f"{name}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(f"{name}[{i}]", v, args[0]) for i, v in enumerate(value))
        if len(value) != len(args):
            raise _WrongType(f"{name}: expected a list of {len(args)} values, got {len(value)}: {list(value)}")
        return tuple(_coerce(f"{name}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if hint is DiTConfig:
        if isinstance(value, DiTConfig):
            return value
        if not isinstance(value, dict):
            raise _WrongType(f"{name}: expected a variant name or a [model] table of DiTConfig fields, got {value!r}")
        return _dit_config(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise _WrongType(f"{name}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _WrongType(f"{name}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _WrongType(f"{name}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if isinstance(value, Path):
            return str(value)
        if not isinstance(value, str):
            raise _WrongType(f"{name}: expected a string, got {value!r}")
        return value
    raise TypeError(f"no config check for {name}: {hint}")  # a field type this module does not handle yet


def _dit_config(table: dict[str, Any]) -> DiTConfig:
    hints = typing.get_type_hints(DiTConfig)
    unknown = sorted(set(table) - set(hints))
    if unknown:
        raise ConfigError(f"model: unknown DiTConfig fields {unknown}; known: {', '.join(hints)}")
    values = {key: _coerce(f"model.{key}", value, hints[key]) for key, value in table.items()}
    try:
        return DiTConfig(**values)
    except ValueError as err:
        raise ConfigError(f"model: {err}") from None


def _normalize_and_check_types(config: TrainConfig) -> None:
    hints = typing.get_type_hints(TrainConfig)
    errors = []
    for field in dataclasses.fields(config):
        try:
            value = _coerce(field.name, getattr(config, field.name), hints[field.name])
        except ConfigError as err:
            errors.append(str(err))
            continue
        object.__setattr__(config, field.name, value)  # frozen: normalise once, here
    if errors:
        raise ConfigError("invalid training config:\n  " + "\n  ".join(errors))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------


def _read(path: Path) -> dict[str, Any]:
    suffix = path.suffix.lower()
    if suffix == ".toml":
        try:
            import tomllib
        except ImportError:  # Python 3.10
            import tomli as tomllib

        with path.open("rb") as f:
            try:
                return tomllib.load(f)
            except tomllib.TOMLDecodeError as err:
                raise ConfigError(f"{path}: not valid TOML ({err})") from None
    if suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ConfigError(f"{path}: reading YAML needs PyYAML (pip install pyyaml), or use a .toml file") from None
        with path.open(encoding="utf-8") as f:
            try:
                content = yaml.safe_load(f)
            except yaml.YAMLError as err:
                raise ConfigError(f"{path}: not valid YAML ({err})") from None
        if content is None:
            return {}
        if not isinstance(content, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of config fields")
        return content
    raise ConfigError(f"{path}: unknown config format {suffix!r}; use .toml (or .yaml with PyYAML installed)")


def load_config(path: str | Path, **overrides: Any) -> TrainConfig:
    """Read a ``TrainConfig`` from a ``.toml`` or ``.yaml`` file; ``overrides`` replace file values.

    Raises :class:`ConfigError` listing every unknown key (with close matches) before anything else.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"training config not found: {path}")
    values = {**_read(path), **overrides}
    known = [f.name for f in dataclasses.fields(TrainConfig)]
    unknown = [key for key in values if key not in known]
    if unknown:
        lines = []
        for key in unknown:
            close = difflib.get_close_matches(key, known, n=1)
            lines.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ConfigError(
            f"{path}: unknown config keys: {', '.join(lines)}; the known keys are documented in docs/training.md"
        )
    if "model" not in values:
        raise ConfigError(f'{path}: missing "model": a variant name (e.g. "video-lite-5s-sft") or a [model] table')
    try:
        return TrainConfig(**values)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
