"""Find a CrossDiT's weight files: a local file or folder, a variant name, or a Hub repository.

Hub downloads go through huggingface_hub, so its cache and settings apply (``HF_HOME``,
``HF_HUB_CACHE``, ``HF_TOKEN``, ``HF_HUB_OFFLINE=1``); only the transformer files are fetched. When the
files are neither on disk nor downloadable, :class:`MissingWeightsError` says which files are missing
and how to get them. Nothing here runs code from a repository.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from huggingface_hub import constants, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
)
from huggingface_hub.file_download import repo_folder_name

from .checkpoint import (
    DIFFUSERS_INDEX,
    DIFFUSERS_WEIGHTS,
    CheckpointError,
    Layout,
    config_from_diffusers,
)
from .config import DiTConfig
from .safetensors_file import PICKLE_SUFFIXES
from .variants import VARIANTS, Variant, get_variant, variant_for_repo

__all__ = ["MissingWeightsError", "ResolvedCheckpoint", "resolve_dit_files"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
DIFFUSERS_PATTERNS = [
    "transformer/config.json",
    f"transformer/{DIFFUSERS_INDEX}",
    "transformer/diffusion_pytorch_model*.safetensors",
]
OFFICIAL_PATTERNS = ["model/*.safetensors", "*.safetensors"]


@dataclass(frozen=True)
class ResolvedCheckpoint:
    """Local weight files of one DiT, ready for :func:`kandinsky5.checkpoint.load_dit`.

    ``files`` is one file or the shards in order; ``config`` comes from a diffusers ``config.json``
    (None for official files: use the variant's config); ``variant`` is the registered name if known.
    """

    files: list[Path]
    layout: Layout
    config: DiTConfig | None = None
    variant: str | None = None


class MissingWeightsError(CheckpointError):
    """The weights are neither on this machine nor downloadable (offline, no network, not cached)."""


class _NotFound(CheckpointError):
    """Expected files are absent from a folder; ``names`` are their paths relative to the repo root."""

    def __init__(self, message: str, names: list[str]):
        super().__init__(message)
        self.names = names


def resolve_dit_files(
    source: str | Path,
    variant: str | None = None,
    *,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
) -> ResolvedCheckpoint:
    """Local files of a DiT checkpoint, downloading only the transformer weights when needed.

    ``source`` is a ``.safetensors`` file; a folder in official layout (``model/*.safetensors`` or one
    ``*.safetensors``) or diffusers layout (``transformer/`` with ``config.json`` and weights, or that
    ``transformer/`` folder itself); a registered variant name; or a Hub repo id (official or
    ``-Diffusers``). ``variant`` names the variant when ``source`` does not tell; it also picks the
    file in a folder holding several checkpoints.
    """
    known = get_variant(variant) if variant is not None else None
    if isinstance(source, Path) or Path(source).expanduser().exists():
        return _resolve_local(Path(source).expanduser(), known)
    if source in VARIANTS:
        known = known or VARIANTS[source]
        if known.hub is None:
            raise CheckpointError(f"variant {known.name!r} has no Hub weights; pass a file or folder")
        return _resolve_repo(known.hub.repo_id, known, revision, cache_dir)
    if _REPO_ID.match(source) and not source.startswith("."):
        return _resolve_repo(source, known or variant_for_repo(source), revision, cache_dir)
    raise CheckpointError(f"no such file or folder, variant or Hub repo id: {source}")


# --------------------------------------------------------------------------------------------------
# Local files
# --------------------------------------------------------------------------------------------------


def _resolve_local(path: Path, known: Variant | None) -> ResolvedCheckpoint:
    name = known.name if known else None
    if path.is_file():
        if path.suffix.lower() in PICKLE_SUFFIXES:
            raise CheckpointError(f"{path}: pickle checkpoints can run code; convert to safetensors")
        if path.name == DIFFUSERS_WEIGHTS and (path.parent / "config.json").is_file():
            return _resolve_diffusers(path.parent, name)
        return ResolvedCheckpoint([path], "official", None, name)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint not found: {path}")
    if (path / "transformer").is_dir():
        return _resolve_diffusers(path / "transformer", name)
    if (path / "config.json").is_file() and any(path.glob("diffusion_pytorch_model*")):
        return _resolve_diffusers(path, name)
    return ResolvedCheckpoint([_official_file(path, known)], "official", None, name)


def _official_file(folder: Path, known: Variant | None) -> Path:
    """The one checkpoint in ``folder/model/`` or at the top of ``folder``."""
    candidates = sorted((folder / "model").glob("*.safetensors")) or sorted(folder.glob("*.safetensors"))
    if known is not None and known.hub is not None:
        wanted = Path(known.hub.filename).name
        candidates = [c for c in candidates if c.name == wanted] or candidates
    if len(candidates) == 1:
        return candidates[0]
    if candidates:
        names = ", ".join(c.name for c in candidates)
        raise CheckpointError(f"{folder} holds several checkpoints ({names}); pass one file or a variant")
    pickles = [p.name for d in (folder, folder / "model") for p in d.glob("*") if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise CheckpointError(
            f"{folder} holds only {', '.join(pickles)}: pickle checkpoints can run code; convert to safetensors"
        )
    wanted_name = known.hub.filename if known and known.hub else "model/<name>.safetensors"
    raise _NotFound(
        f"no DiT weights in {folder}: expected {wanted_name}, one *.safetensors file, or a diffusers "
        "transformer/ folder",
        [wanted_name],
    )


def _read_json(path: Path) -> dict:
    try:
        content = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: unreadable JSON ({err})") from None
    if not isinstance(content, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return content


def _resolve_diffusers(folder: Path, name: str | None) -> ResolvedCheckpoint:
    """A diffusers ``transformer/`` folder: ``config.json`` plus one weight file or indexed shards."""
    if not (folder / "config.json").is_file():
        raise _NotFound(f"{folder}: diffusers folder without config.json", ["transformer/config.json"])
    config = config_from_diffusers(_read_json(folder / "config.json"))
    if (folder / DIFFUSERS_INDEX).is_file():
        weight_map = _read_json(folder / DIFFUSERS_INDEX).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{folder / DIFFUSERS_INDEX}: no weight_map")
        shards = sorted(set(weight_map.values()))
    elif (folder / DIFFUSERS_WEIGHTS).is_file():
        shards = [DIFFUSERS_WEIGHTS]
    else:
        raise _NotFound(
            f"{folder}: no {DIFFUSERS_WEIGHTS} and no {DIFFUSERS_INDEX}",
            [f"transformer/{DIFFUSERS_WEIGHTS} (or shards + {DIFFUSERS_INDEX})"],
        )
    missing = [shard for shard in shards if not (folder / shard).is_file()]
    if missing:
        raise _NotFound(
            f"{folder}: {len(missing)} shard(s) listed in the index are missing: {', '.join(missing)}",
            [f"transformer/{shard}" for shard in missing],
        )
    return ResolvedCheckpoint([folder / shard for shard in shards], "diffusers", config, name)


# --------------------------------------------------------------------------------------------------
# Hub repositories
# --------------------------------------------------------------------------------------------------


def _resolve_repo(
    repo_id: str, known: Variant | None, revision: str | None, cache_dir: str | Path | None
) -> ResolvedCheckpoint:
    hub, name = (known.hub if known else None), (known.name if known else None)
    options = {"revision": revision, "cache_dir": cache_dir}
    logger.info("resolving the DiT of %s (HF cache %s)", repo_id, cache_dir or constants.HF_HUB_CACHE)
    try:
        if repo_id.lower().endswith("-diffusers") or (hub and _same_repo(hub.diffusers_repo_id, repo_id)):
            expected = ["transformer/config.json", "transformer/diffusion_pytorch_model*.safetensors"]
            folder = Path(snapshot_download(repo_id, allow_patterns=DIFFUSERS_PATTERNS, **options))
            return _resolve_diffusers(folder / "transformer", name)
        if hub and _same_repo(hub.repo_id, repo_id):
            expected = [hub.filename]
            path = Path(hf_hub_download(repo_id, hub.filename, **options))
            return ResolvedCheckpoint([path], "official", None, name)
        expected = ["model/*.safetensors"]
        folder = Path(snapshot_download(repo_id, allow_patterns=OFFICIAL_PATTERNS, **options))
        return ResolvedCheckpoint([_official_file(folder, known)], "official", None, name)
    except _NotFound as err:  # a cached snapshot that lacks some files
        raise _missing(repo_id, err.names, name, "the cached snapshot is incomplete", cache_dir) from None
    except _HUB_ERRORS as err:
        raise _hub_error(err, repo_id, expected, name, cache_dir) from None


# What huggingface_hub raises for a file it cannot provide (LocalEntryNotFoundError: not cached, offline).
_HUB_ERRORS = (EntryNotFoundError, OfflineModeIsEnabled, HfHubHTTPError)


def _hub_error(
    err: Exception, repo_id: str, expected: list[str], variant: str | None, cache_dir: str | Path | None
) -> CheckpointError:
    """One clear error for whatever huggingface_hub raised while fetching ``expected`` from ``repo_id``."""
    if isinstance(err, (LocalEntryNotFoundError, OfflineModeIsEnabled)):
        reason = "HF_HUB_OFFLINE=1 is set" if constants.is_offline_mode() else _first_line(err)
        return _missing(repo_id, expected, variant, reason, cache_dir)
    if isinstance(err, RepositoryNotFoundError):
        return CheckpointError(
            f"cannot access {repo_id}: it does not exist, is private or is gated "
            "(log in with `hf auth login` and accept its licence on the Hub)"
        )
    return CheckpointError(f"cannot download {repo_id}: {_first_line(err)}")


def _same_repo(a: str | None, b: str) -> bool:
    return a is not None and a.lower() == b.lower()


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _missing(
    repo_id: str, names: list[str], variant: str | None, reason: str, cache_dir: str | Path | None
) -> MissingWeightsError:
    cache = Path(cache_dir or constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model")
    return MissingWeightsError(
        f"weights of {repo_id} are not on this machine and cannot be downloaded ({reason}); "
        f"missing: {', '.join(names)}. Run `kandinsky5 download {variant or repo_id}` on a machine with "
        f"network access, or put the files in the Hugging Face cache at {cache}/snapshots/<commit>/ "
        "with refs/main naming that commit (HF_HUB_CACHE or HF_HOME choose the cache)"
    )


# --------------------------------------------------------------------------------------------------
# Whole pipelines: DiT + VAE + text encoders
# --------------------------------------------------------------------------------------------------

# Folder names of each component in the two published layouts. "official" is what the official
# download script writes next to model/ (text_encoder2 without underscore, the FLUX VAE in flux/vae).
DIFFUSERS_FOLDERS = {
    "vae": "vae",
    "text_encoder": "text_encoder",
    "tokenizer": "tokenizer",
    "text_encoder_2": "text_encoder_2",
    "tokenizer_2": "tokenizer_2",
}
_WEIGHTS_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]  # never *.bin / *.pt


@dataclass(frozen=True)
class PipelineFiles:
    """Local folders of every component a variant needs (no text folders for nano: its encoder is a package)."""

    dit: ResolvedCheckpoint
    vae: Path  # folder holding the VAE's config.json and weights
    text_encoder: Path | None = None  # Qwen2.5-VL weights
    tokenizer: Path | None = None
    text_encoder_2: Path | None = None  # CLIP text model
    tokenizer_2: Path | None = None


def resolve_pipeline_files(
    source: str | Path, variant: Variant, *, cache_dir: str | Path | None = None
) -> PipelineFiles:
    """Every component of ``variant`` from a local folder or the Hub, in one pass.

    Local folders may use the diffusers layout (``transformer/ vae/ text_encoder/ tokenizer/
    text_encoder_2/ tokenizer_2/``) or the official one (``model/ vae/ text_encoder/ text_encoder2/``,
    ``flux/vae/`` for images). From the Hub, an official repo brings the DiT and the VAE and text
    encoders come from their own repos (``variant.vae_repo_id``, ``variant.text``); a ``-Diffusers``
    repo brings everything. Whatever is missing is reported together in one ``MissingWeightsError``.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        return _local_pipeline(path, variant)
    repo = variant.hub.repo_id if str(source) in VARIANTS and variant.hub else str(source)
    if repo.lower().endswith("-diffusers"):
        folders = ["transformer", *DIFFUSERS_FOLDERS.values()]
        return _local_pipeline(_fetch(repo, [f"{f}/*" for f in folders], cache_dir, variant.name), variant)

    missing: list[str] = []

    def collect(fetch: Callable[[], T]) -> T | None:
        try:
            return fetch()
        except MissingWeightsError as err:
            missing.append(str(err))
            return None

    dit = collect(lambda: resolve_dit_files(repo, variant.name, cache_dir=cache_dir))
    vae_patterns = [f"{variant.vae_subfolder}/*"]
    vae = collect(lambda: _fetch(variant.vae_repo_id, vae_patterns, cache_dir, variant.name))
    qwen = collect(lambda: _fetch(variant.text.qwen_repo_id, _WEIGHTS_PATTERNS, cache_dir, variant.name))
    clip = collect(lambda: _fetch(variant.text.clip_repo_id, _WEIGHTS_PATTERNS, cache_dir, variant.name))
    if missing:
        raise MissingWeightsError(" | ".join(missing))
    return PipelineFiles(dit, vae / variant.vae_subfolder, qwen, qwen, clip, clip)


def _local_pipeline(root: Path, variant: Variant) -> PipelineFiles:
    dit = resolve_dit_files(root, variant.name)
    if (root / "transformer").is_dir():
        folders = {key: root / name for key, name in DIFFUSERS_FOLDERS.items()}
    else:
        vae = root / "flux" / "vae" if variant.vae == "flux" and (root / "flux" / "vae").is_dir() else root / "vae"
        folders = {
            "vae": vae,
            "text_encoder": root / "text_encoder",
            "tokenizer": root / "text_encoder",
            "text_encoder_2": root / "text_encoder2",
            "tokenizer_2": root / "text_encoder2",
        }
    if variant.text.kind == "minilm":
        folders = {"vae": folders["vae"]}
    missing = [
        str(folder) for folder in dict.fromkeys(folders.values()) if not (folder / _config_name(folder)).is_file()
    ]
    if missing:
        raise MissingWeightsError(
            f"{root} lacks component folders for {variant.name}: {', '.join(missing)}; get them with "
            f"`kandinsky5 download {variant.name} --to {root}` on a machine with network access"
        )
    return PipelineFiles(dit, **folders)


def _config_name(folder: Path) -> str:
    """The file that proves a component folder is there (tokenizers may lack config.json)."""
    return "config.json" if not folder.name.startswith("tokenizer") else "tokenizer_config.json"


def _fetch(repo_id: str, patterns: list[str], cache_dir: str | Path | None, variant: str) -> Path:
    """A snapshot of ``repo_id`` restricted to ``patterns``, from the cache or the network."""
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, cache_dir=cache_dir))
    except _HUB_ERRORS as err:
        raise _hub_error(err, repo_id, patterns, variant, cache_dir) from None
