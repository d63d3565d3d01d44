"""Checkpoint save/load: round trips in both layouts, dtype policy, and every bad-file error."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from kandinsky5 import atomic, checkpoint
from kandinsky5.checkpoint import (
    CheckpointError,
    config_from_diffusers,
    diffusers_config,
    load_dit,
    read_header,
    save_dit,
)
from kandinsky5.config import DiTConfig
from kandinsky5.models.dit import CrossDiT, keeps_fp32

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


def random_dit(config: DiTConfig = TINY, seed: int = 0) -> CrossDiT:
    """A CrossDiT whose every weight is random (the default init zeroes modulation and output)."""
    torch.manual_seed(seed)
    model = CrossDiT(config)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn_like(param) * 0.2)
    return model.eval()


def run(model: CrossDiT) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    c = model.config
    x = torch.randn(1, 1, 4, 4, c.visual_embed_dim, generator=g)
    text = torch.randn(1, 5, c.in_text_dim, generator=g)
    pooled = torch.randn(1, c.in_text_dim2, generator=g)
    with torch.no_grad():
        return model(x, text, pooled, torch.tensor([500.0]))


def assert_same_weights(a: CrossDiT, b: CrossDiT) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert torch.equal(sa[key], sb[key]), key


@pytest.fixture
def no_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if load_dit opens a file for reading tensors (it must raise before that)."""

    def refuse(*args, **kwargs):
        raise AssertionError("load_dit started reading weights before validating the checkpoint")

    monkeypatch.setattr(checkpoint, "safe_open", refuse)


# --------------------------------------------------------------------------------------------------
# Round trips
# --------------------------------------------------------------------------------------------------


def test_official_round_trip(tmp_path: Path) -> None:
    model = random_dit()
    path = tmp_path / "dit.safetensors"
    assert save_dit(model, path) == [path]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dit.safetensors"]  # no temp file left

    loaded = load_dit([path], TINY)
    assert not loaded.training
    assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
    assert_same_weights(model, loaded)
    assert torch.equal(run(model), run(loaded))


@pytest.mark.parametrize("max_shard_size", [checkpoint.DEFAULT_MAX_SHARD_BYTES, 300_000])
def test_diffusers_round_trip(tmp_path: Path, max_shard_size: int) -> None:
    model = random_dit()
    written = save_dit(model, tmp_path, layout="diffusers", max_shard_size=max_shard_size)
    folder = tmp_path / "transformer"
    config = config_from_diffusers(json.loads((folder / "config.json").read_text()))
    assert config == TINY

    index_path = folder / checkpoint.DIFFUSERS_INDEX
    if max_shard_size == 300_000:
        index = json.loads(index_path.read_text())
        shards = sorted(set(index["weight_map"].values()))
        assert len(shards) == 3 and shards[0] == "diffusion_pytorch_model-00001-of-00003.safetensors"
        assert set(index["weight_map"]) == set(model.state_dict())
        assert index["metadata"]["total_size"] == sum(p.numel() * 4 for p in model.parameters())
        files = [folder / s for s in shards]
    else:
        assert not index_path.exists()
        files = [folder / checkpoint.DIFFUSERS_WEIGHTS]
    assert set(files) < set(written)

    loaded = load_dit(files, config, layout="diffusers")
    assert_same_weights(model, loaded)
    # The weights are bit-equal (above); the outputs may differ in the last bits because memory-mapped
    # shards are not aligned like fresh tensors, and AVX2 matmul kernels sum differently then.
    torch.testing.assert_close(run(model), run(loaded), rtol=1e-5, atol=1e-5)


def test_diffusers_resave_removes_stale_shards(tmp_path: Path) -> None:
    model = random_dit()
    save_dit(model, tmp_path, layout="diffusers", max_shard_size=300_000)
    save_dit(model, tmp_path, layout="diffusers")
    names = sorted(p.name for p in (tmp_path / "transformer").iterdir())
    assert names == ["config.json", checkpoint.DIFFUSERS_WEIGHTS]


def test_loaded_model_saves_and_reloads(tmp_path: Path) -> None:
    """Weights loaded as views of a mapped file can be trained in place and saved again."""
    save_dit(random_dit(), tmp_path / "a.safetensors")
    before = (tmp_path / "a.safetensors").read_bytes()
    model = load_dit(tmp_path / "a.safetensors", TINY)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(1.0)
    assert (tmp_path / "a.safetensors").read_bytes() == before  # private mapping: the file is untouched
    save_dit(model, tmp_path / "a.safetensors")  # over the file the weights were mapped from
    assert_same_weights(model, load_dit(tmp_path / "a.safetensors", TINY))


def test_diffusers_reads_our_layout(tmp_path: Path) -> None:
    """diffusers' class takes our config.json and, strictly, our weights: the key mapping is the identity."""
    diffusers = pytest.importorskip("diffusers")
    model = random_dit()
    save_dit(model, tmp_path, layout="diffusers")
    folder = tmp_path / "transformer"
    config = json.loads((folder / "config.json").read_text())
    theirs = diffusers.Kandinsky5Transformer3DModel.from_config(config)
    theirs.load_state_dict(load_file(folder / checkpoint.DIFFUSERS_WEIGHTS), strict=True)
    reference = theirs.state_dict()
    for key, tensor in model.state_dict().items():
        assert torch.equal(tensor, reference[key]), key


# --------------------------------------------------------------------------------------------------
# dtype policy
# --------------------------------------------------------------------------------------------------


def test_bf16_file_keeps_fp32_islands(tmp_path: Path) -> None:
    model = random_dit()
    path = tmp_path / "bf16.safetensors"
    save_dit(model.to(torch.bfloat16), path)  # everything bf16, modulation included
    assert {info.dtype for info in read_header(path).values()} == {"BF16"}

    loaded = load_dit(path, TINY)
    for key, tensor in loaded.state_dict().items():
        assert tensor.dtype == (torch.float32 if keeps_fp32(key) else torch.bfloat16), key
    assert loaded.time_embeddings.in_layer.weight.dtype == torch.float32
    assert loaded.visual_transformer_blocks[0].visual_modulation.out_layer.weight.dtype == torch.float32

    upcast = load_dit(path, TINY, dtype=torch.float32)
    for key, tensor in upcast.state_dict().items():
        assert tensor.dtype == torch.float32
        assert torch.equal(tensor, model.state_dict()[key].float()), key


def test_dtype_override_on_fp32_file(tmp_path: Path) -> None:
    path = tmp_path / "fp32.safetensors"
    save_dit(random_dit(), path)
    loaded = load_dit(path, TINY, dtype=torch.bfloat16)
    for key, tensor in loaded.state_dict().items():
        assert tensor.dtype == (torch.float32 if keeps_fp32(key) else torch.bfloat16), key
    assert loaded.dtype == torch.bfloat16


def test_mixed_file_keeps_stored_dtypes(tmp_path: Path) -> None:
    """The official layout: bf16 weights with fp32 modulation, loaded as stored."""
    model = random_dit().cast_(torch.bfloat16)
    path = tmp_path / "mixed.safetensors"
    save_dit(model, path)
    assert_same_weights(model, load_dit(path, TINY))


# --------------------------------------------------------------------------------------------------
# Bad files: each raises CheckpointError before any weight is read
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def good_file(tmp_path: Path) -> Path:
    path = tmp_path / "good.safetensors"
    save_dit(random_dit(), path)
    return path


def test_missing_file(tmp_path: Path, no_loading: None) -> None:
    with pytest.raises(CheckpointError, match="checkpoint not found: .*absent.safetensors"):
        load_dit(tmp_path / "absent.safetensors", TINY)


@pytest.mark.parametrize("name", ["a.bin", "a.pt", "a.pth", "a.ckpt", "zip.safetensors", "raw.safetensors"])
def test_pickle_refused(tmp_path: Path, name: str, no_loading: None) -> None:
    path = tmp_path / name
    torch.save({"w": torch.zeros(3)}, path, _use_new_zipfile_serialization=not name.startswith("raw"))
    with pytest.raises(CheckpointError, match="pickle checkpoints can run code; convert to safetensors"):
        load_dit(path, TINY)


def _rewrite(path: Path, header: dict, data: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)


def _parts(path: Path) -> tuple[dict, bytes]:
    blob = path.read_bytes()
    n = int.from_bytes(blob[:8], "little")
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda blob: blob[:-100], "truncated: tensors need"),
        (lambda blob: blob[:200], "truncated or not a safetensors file"),
        (lambda blob: blob[:5], "too short"),
        (lambda blob: b"\x07" * 4096, "truncated or not a safetensors file"),
        (lambda blob: blob[:20] + b"\x00\xff" + blob[22:], "corrupt safetensors header"),
        (lambda blob: blob + b"\x00" * 16, "16 stray bytes"),
    ],
    ids=["cut-data", "cut-header", "tiny", "noise", "bad-json", "trailing"],
)
def test_corrupt_file(good_file: Path, corrupt, message: str, no_loading: None) -> None:
    good_file.write_bytes(corrupt(good_file.read_bytes()))
    with pytest.raises(CheckpointError, match=message) as info:
        load_dit(good_file, TINY)
    assert "\n" not in str(info.value)


def test_byte_count_must_match_shape(good_file: Path, no_loading: None) -> None:
    header, data = _parts(good_file)
    key = "out_layer.out_layer.bias"
    header[key]["shape"] = [header[key]["shape"][0] + 1]
    _rewrite(good_file, header, data)
    with pytest.raises(CheckpointError, match=rf"'{key}' is F32 \[17\] but spans 64 bytes"):
        load_dit(good_file, TINY)


def test_overlapping_tensors(good_file: Path, no_loading: None) -> None:
    header, data = _parts(good_file)
    keys = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])
    first, second = keys[:2]
    header[second]["data_offsets"] = header[first]["data_offsets"]
    header[second]["shape"] = header[first]["shape"]
    _rewrite(good_file, header, data)
    with pytest.raises(CheckpointError, match="overlaps or leaves a gap"):
        load_dit(good_file, TINY)


def test_integer_weights_refused(tmp_path: Path, no_loading: None) -> None:
    state = {k: v.to(torch.int32) if k.endswith("bias") else v for k, v in random_dit().state_dict().items()}
    save_file(state, tmp_path / "int.safetensors")
    with pytest.raises(CheckpointError, match="is I32; DiT weights must be floating point"):
        load_dit(tmp_path / "int.safetensors", TINY)


def test_key_in_two_shards(tmp_path: Path, no_loading: None) -> None:
    state = random_dit().state_dict()
    save_file(state, tmp_path / "a.safetensors")
    save_file({"out_layer.out_layer.bias": state["out_layer.out_layer.bias"]}, tmp_path / "b.safetensors")
    with pytest.raises(CheckpointError, match="'out_layer.out_layer.bias' also appears in another shard"):
        load_dit([tmp_path / "a.safetensors", tmp_path / "b.safetensors"], TINY)


# --------------------------------------------------------------------------------------------------
# A checkpoint of another variant
# --------------------------------------------------------------------------------------------------


def test_other_config_names_keys(tmp_path: Path, no_loading: None) -> None:
    bigger = DiTConfig(**{**TINY.__dict__, "num_visual_blocks": 4, "model_dim": 96, "in_visual_dim": 8})
    path = tmp_path / "bigger.safetensors"
    torch.manual_seed(0)
    save_dit(CrossDiT(bigger), path)
    with pytest.raises(CheckpointError) as info:
        load_dit(path, TINY, expected="nano")
    message = str(info.value)
    assert message.startswith("checkpoint does not match nano (model_dim=64, 1 text + 2 visual blocks")
    assert "unexpected keys: visual_transformer_blocks.2." in message
    assert "shape mismatches: time_embeddings.in_layer.weight file [32, 96] vs model [32, 64]" in message
    assert "... and" in message and "\n" not in message
    assert "matches no registered variant (visual_embeddings.in_layer.weight [96, 68])" in message


def test_missing_keys_listed(tmp_path: Path, no_loading: None) -> None:
    state = random_dit().state_dict()
    del state["out_layer.out_layer.bias"], state["text_embeddings.norm.weight"]
    save_file(state, tmp_path / "partial.safetensors")
    with pytest.raises(CheckpointError, match=r"2 missing keys: text_embeddings\.norm\.weight, out_layer"):
        load_dit(tmp_path / "partial.safetensors", TINY, expected="video-lite-5s-sft")


def test_family_is_recognised(tmp_path: Path, no_loading: None) -> None:
    """A Video Lite file (told apart by its patch-embedding shape and block count) is named."""
    lite = {"visual_embeddings.in_layer.weight": torch.zeros(1792, 4 * 33, dtype=torch.bfloat16)}
    lite.update({f"visual_transformer_blocks.{i}.feed_forward.in_layer.weight": torch.zeros(1) for i in range(32)})
    save_file(lite, tmp_path / "lite.safetensors")
    with pytest.raises(CheckpointError, match=r"the file looks like video-lite-5s-sft, .* and \d+ more$"):
        load_dit(tmp_path / "lite.safetensors", TINY, expected="nano")


# --------------------------------------------------------------------------------------------------
# Diffusers config and atomic saving
# --------------------------------------------------------------------------------------------------


def test_config_from_diffusers_ignores_extra_keys() -> None:
    raw = {**diffusers_config(TINY), "attention_type": "nabla", "attention_P": 0.9, "attention_wT": 11}
    assert config_from_diffusers(raw) == TINY
    edit = {**diffusers_config(TINY), "visual_cond": True, "in_visual_dim": 16}
    assert config_from_diffusers(edit).visual_embed_dim == 33
    # keys left out take diffusers' constructor defaults, not ours
    assert config_from_diffusers({"_class_name": "Kandinsky5Transformer3DModel"}).model_dim == 2048


def test_a_sample_predicting_config_records_its_prediction() -> None:
    """Official configs stay as diffusers writes them; nano's says that it predicts x0."""
    import dataclasses

    assert "prediction" not in diffusers_config(TINY)
    sample = dataclasses.replace(TINY, prediction="sample")
    raw = json.loads(json.dumps(diffusers_config(sample)))
    assert raw["prediction"] == "sample"
    assert config_from_diffusers(raw) == sample


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"_class_name": "WanTransformer3DModel"}, "not Kandinsky5Transformer3DModel"),
        ({"prediction": "noise"}, "prediction must be one of velocity, sample"),
        ({"axes_dims": [7, 12, 12]}, "not a valid Kandinsky 5 transformer config: axes_dims"),
        ({"model_dim": "wide"}, "not a valid Kandinsky 5 transformer config"),
    ],
)
def test_config_from_diffusers_errors(raw: dict, message: str) -> None:
    with pytest.raises(CheckpointError, match=message):
        config_from_diffusers(raw)


def test_failed_save_keeps_old_file(good_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = good_file.read_bytes()

    def broken_fsync(fd: int) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(atomic.os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        save_dit(random_dit(seed=1), good_file)
    assert good_file.read_bytes() == before
    assert [p.name for p in good_file.parent.iterdir()] == [good_file.name]


def test_header_reports_each_tensor(good_file: Path) -> None:
    header = read_header(good_file)
    model = random_dit()
    assert set(header) == set(model.state_dict())
    info = header["visual_embeddings.in_layer.weight"]
    assert info.dtype == "F32" and info.shape == (64, math.prod(TINY.patch_size) * 9)
