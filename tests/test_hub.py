"""Resolving weight files: local files and folders in both layouts, and Hub repos from a fake cache.

Nothing reaches the network: every test runs with HF_HUB_OFFLINE=1 and a Hugging Face cache in
tmp_path, built with the real layout (``models--org--name/{blobs,refs,snapshots}``).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants

from kandinsky5.checkpoint import DIFFUSERS_INDEX, DIFFUSERS_WEIGHTS, CheckpointError, load_dit, save_dit
from kandinsky5.config import DiTConfig
from kandinsky5.hub import MissingWeightsError, resolve_dit_files
from kandinsky5.models.dit import CrossDiT
from kandinsky5.variants import get_variant

TINY = DiTConfig(
    model_dim=64,
    ff_dim=128,
    time_dim=32,
    num_text_blocks=1,
    num_visual_blocks=2,
    axes_dims=(8, 12, 12),
    in_text_dim=48,
    in_text_dim2=24,
    in_visual_dim=4,
    out_visual_dim=4,
)
LITE = get_variant("video-lite-5s-sft")
LITE_REPO, LITE_FILE = LITE.hub.repo_id, LITE.hub.filename
LITE_DIFFUSERS = LITE.hub.diffusers_repo_id
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty HF cache in tmp_path, offline mode on (env vars and huggingface_hub's constants)."""
    root = tmp_path / "hf-cache"
    root.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    # huggingface_hub reads both variables once, at import: patch what it already read.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root))
    return root


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny official checkpoint file (random weights)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    save_dit(CrossDiT(TINY), path)
    return path


def put_in_cache(cache: Path, repo_id: str, files: dict[str, Path]) -> Path:
    """Store ``files`` (repo path → source) as huggingface_hub does: blobs, snapshot symlinks, refs/main."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / COMMIT
    for name, source in files.items():
        blob = repo / "blobs" / hashlib.sha256(source.read_bytes()).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, blob)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


def diffusers_repo(tmp_path: Path, shard_size: int = 10**10) -> Path:
    """A diffusers-layout folder (``transformer/config.json`` + weights) with random weights."""
    torch.manual_seed(0)
    save_dit(CrossDiT(TINY), tmp_path / "repo", layout="diffusers", max_shard_size=shard_size)
    return tmp_path / "repo"


# --------------------------------------------------------------------------------------------------
# Local files and folders
# --------------------------------------------------------------------------------------------------


def test_local_file(weights: Path) -> None:
    resolved = resolve_dit_files(weights)
    assert resolved.files == [weights]
    assert (resolved.layout, resolved.config, resolved.variant) == ("official", None, None)
    resolved = resolve_dit_files(str(weights), variant="video-lite-5s-sft")
    assert (resolved.files, resolved.variant) == ([weights], "video-lite-5s-sft")


def test_official_folders(tmp_path: Path, weights: Path) -> None:
    (tmp_path / "top").mkdir()
    shutil.copy(weights, tmp_path / "top" / "dit.safetensors")
    assert resolve_dit_files(tmp_path / "top").files == [tmp_path / "top" / "dit.safetensors"]

    model_dir = tmp_path / "weights" / "model"
    model_dir.mkdir(parents=True)
    lite_file = model_dir / "kandinsky5lite_t2v_sft_5s.safetensors"
    shutil.copy(weights, lite_file)
    assert resolve_dit_files(tmp_path / "weights").files == [lite_file]

    # download_models.py puts every model in one model/ folder: the variant picks the file.
    shutil.copy(weights, model_dir / "kandinsky5lite_t2i.safetensors")
    with pytest.raises(CheckpointError, match="several checkpoints"):
        resolve_dit_files(tmp_path / "weights")
    resolved = resolve_dit_files(tmp_path / "weights", variant="video-lite-5s-sft")
    assert resolved.files == [lite_file]
    assert resolved.variant == "video-lite-5s-sft"


@pytest.mark.parametrize("shard_size", [10**10, 300_000], ids=["single", "sharded"])
def test_diffusers_folders(tmp_path: Path, shard_size: int) -> None:
    repo = diffusers_repo(tmp_path, shard_size)
    shards = 1 if shard_size == 10**10 else 3
    for source in (repo, repo / "transformer"):
        resolved = resolve_dit_files(source)
        assert resolved.layout == "diffusers" and resolved.config == TINY
        assert len(resolved.files) == shards
        assert all(f.parent == repo / "transformer" for f in resolved.files)
        load_dit(resolved.files, resolved.config, layout=resolved.layout)
    if shards == 1:  # the weight file itself, with config.json beside it
        assert resolve_dit_files(repo / "transformer" / DIFFUSERS_WEIGHTS).layout == "diffusers"


def test_missing_shard(tmp_path: Path) -> None:
    repo = diffusers_repo(tmp_path, shard_size=300_000)
    (repo / "transformer" / "diffusion_pytorch_model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing: diffusion_pytorch_model-00002-of-00003.safetensors"):
        resolve_dit_files(repo)


def test_bad_local_sources(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        resolve_dit_files(tmp_path / "absent")
    with pytest.raises(CheckpointError, match="no such file or folder, variant or Hub repo id: ./absent"):
        resolve_dit_files("./absent")
    with pytest.raises(CheckpointError, match="no DiT weights in"):
        resolve_dit_files(tmp_path)
    torch.save({"w": torch.zeros(2)}, tmp_path / "dit.pt")
    with pytest.raises(CheckpointError, match="pickle checkpoints can run code"):
        resolve_dit_files(tmp_path)
    with pytest.raises(CheckpointError, match="pickle checkpoints can run code"):
        resolve_dit_files(tmp_path / "dit.pt")


# --------------------------------------------------------------------------------------------------
# Hub repositories, offline, from the cache
# --------------------------------------------------------------------------------------------------


def test_official_repo_from_cache(cache: Path, weights: Path) -> None:
    snapshot = put_in_cache(cache, LITE_REPO, {LITE_FILE: weights})
    for source in (LITE_REPO, "video-lite-5s-sft"):
        resolved = resolve_dit_files(source)
        assert resolved.files == [snapshot / LITE_FILE]
        assert (resolved.layout, resolved.variant) == ("official", "video-lite-5s-sft")
    load_dit(resolved.files, TINY)  # the cached file is the tiny checkpoint


def test_unknown_repo_from_cache(cache: Path, weights: Path) -> None:
    snapshot = put_in_cache(cache, "someone/k5-finetune", {"model/finetune.safetensors": weights})
    resolved = resolve_dit_files("someone/k5-finetune")
    assert resolved.files == [snapshot / "model" / "finetune.safetensors"] and resolved.variant is None


@pytest.mark.parametrize("shard_size", [10**10, 300_000], ids=["single", "sharded"])
def test_diffusers_repo_from_cache(cache: Path, tmp_path: Path, shard_size: int) -> None:
    repo = diffusers_repo(tmp_path, shard_size)
    files = {f"transformer/{p.name}": p for p in (repo / "transformer").iterdir()}
    snapshot = put_in_cache(cache, LITE_DIFFUSERS, files)
    resolved = resolve_dit_files(LITE_DIFFUSERS)
    assert resolved.layout == "diffusers" and resolved.config == TINY
    assert resolved.variant == "video-lite-5s-sft"
    weight_files = {name.split("/")[1] for name in files} - {"config.json", DIFFUSERS_INDEX}
    assert {f.name for f in resolved.files} == weight_files
    assert all(f.parent == snapshot / "transformer" for f in resolved.files)


def test_offline_without_cache(cache: Path) -> None:
    with pytest.raises(MissingWeightsError) as info:
        resolve_dit_files("video-lite-5s-sft")
    message = str(info.value)
    assert f"weights of {LITE_REPO} are not on this machine" in message
    assert "HF_HUB_OFFLINE=1" in message and f"missing: {LITE_FILE}" in message
    assert "Run `kandinsky5 download video-lite-5s-sft` on a machine with network access" in message
    assert str(cache / "models--kandinskylab--Kandinsky-5.0-T2V-Lite-sft-5s") in message
    assert isinstance(info.value, CheckpointError) and "\n" not in message

    with pytest.raises(MissingWeightsError, match="missing: transformer/config.json, transformer/diffusion"):
        resolve_dit_files(LITE_DIFFUSERS)
    unknown = r"missing: model/\*\.safetensors\. Run `kandinsky5 download someone/x`"
    with pytest.raises(MissingWeightsError, match=unknown):
        resolve_dit_files("someone/x")


def test_incomplete_cached_snapshot(cache: Path, tmp_path: Path) -> None:
    repo = diffusers_repo(tmp_path, shard_size=300_000)
    kept = [p for p in (repo / "transformer").iterdir() if "-00003-of" not in p.name]
    put_in_cache(cache, LITE_DIFFUSERS, {f"transformer/{p.name}": p for p in kept})
    lost = "transformer/diffusion_pytorch_model-00003-of-00003.safetensors"
    with pytest.raises(MissingWeightsError, match=rf"incomplete\); missing: {lost}\. Run"):
        resolve_dit_files(LITE_DIFFUSERS)


def test_hf_home_is_honoured(tmp_path: Path, weights: Path) -> None:
    """A fresh interpreter picks the cache from HF_HOME, as huggingface_hub does."""
    home = tmp_path / "home"
    snapshot = put_in_cache(home / "hub", LITE_REPO, {LITE_FILE: weights})
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_HOME=str(home), HF_HUB_OFFLINE="1")
    code = "from kandinsky5.hub import resolve_dit_files as r; print(r('video-lite-5s-sft').files[0])"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == str(snapshot / LITE_FILE)
