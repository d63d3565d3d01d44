import pytest
import torch

import kandinsky5
from kandinsky5.checkpoint import CheckpointError, save_dit
from kandinsky5.config import DiTConfig
from kandinsky5.models import CrossDiT

TINY = DiTConfig(
    model_dim=32,
    ff_dim=64,
    time_dim=16,
    num_text_blocks=1,
    num_visual_blocks=1,
    axes_dims=(4, 6, 6),
    in_text_dim=24,
    in_text_dim2=12,
    in_visual_dim=4,
    out_visual_dim=4,
)


def test_public_names_resolve_lazily():
    assert kandinsky5.load_transformer is kandinsky5.api.load_transformer
    assert kandinsky5.get_variant("video-lite-5s-sft").task == "t2v"
    with pytest.raises(AttributeError):
        kandinsky5.no_such_name  # noqa: B018


def test_load_transformer_from_a_diffusers_folder(tmp_path):
    torch.manual_seed(0)
    model = CrossDiT(TINY)
    for p in model.parameters():
        p.data.normal_()
    save_dit(model, tmp_path / "repo", layout="diffusers")
    loaded = kandinsky5.load_transformer(tmp_path / "repo", device="cpu")
    assert loaded.config == TINY
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_official_file_needs_a_variant_to_know_its_architecture(tmp_path):
    save_dit(CrossDiT(TINY), tmp_path / "tiny.safetensors")
    with pytest.raises(CheckpointError, match="pass variant="):
        kandinsky5.load_transformer(tmp_path / "tiny.safetensors")
    with pytest.raises(CheckpointError, match="video-lite-5s-sft"):
        kandinsky5.load_transformer(tmp_path / "tiny.safetensors", variant="video-lite-5s-sft")
