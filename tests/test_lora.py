"""LoRA: targets, peft training layers, the diffusers file format both ways, hooks that leave the base exact."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from kandinsky5.config import DiTConfig
from kandinsky5.lora import (
    DEFAULT_TARGETS,
    LoraError,
    add_lora,
    apply_loras,
    lora_state_dict,
    read_lora,
    save_lora,
    target_errors,
    target_modules,
)
from kandinsky5.models import CrossDiT

CONFIG = DiTConfig(
    model_dim=32, ff_dim=64, time_dim=16, num_text_blocks=1, num_visual_blocks=2, axes_dims=(4, 6, 6),
    in_text_dim=24, in_text_dim2=12, in_visual_dim=4, out_visual_dim=4, visual_cond=True,
)  # fmt: skip


def random_dit(seed: int = 0) -> CrossDiT:
    """A DiT whose every tensor is random (the official init zeroes gates, hiding the blocks)."""
    torch.manual_seed(seed)
    model = CrossDiT(CONFIG, round_qk_to_bf16=False).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


def inputs(seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 2, 4, 4, CONFIG.visual_embed_dim, generator=gen)
    text = torch.randn(1, 5, CONFIG.in_text_dim, generator=gen)
    pooled = torch.randn(1, CONFIG.in_text_dim2, generator=gen)
    return x, text, pooled, torch.tensor([500.0])


def trained_lora(model: CrossDiT, rank: int = 4, alpha: float = 8.0, targets=DEFAULT_TARGETS) -> CrossDiT:
    """peft adapters with random (non-zero) A and B, as after some training."""
    add_lora(model, rank, alpha, targets)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model


@pytest.fixture
def lora_file(tmp_path: Path) -> Path:
    model = trained_lora(random_dit(5))
    return save_lora(model, tmp_path / "style.safetensors", {"rank": 4})


def test_default_targets_are_every_attention_and_feed_forward_linear():
    names = target_modules(random_dit(), DEFAULT_TARGETS)
    assert len(names) == 1 * 6 + 2 * 10  # text block: self-attn 4 + FF 2; visual: 2 x 4 + 2
    assert not any("modulation" in n or n.startswith(("out_layer", "time_")) for n in names)
    assert target_modules(random_dit(), ["to_query"]) == [
        "text_transformer_blocks.0.self_attention.to_query",
        "visual_transformer_blocks.0.self_attention.to_query",
        "visual_transformer_blocks.0.cross_attention.to_query",
        "visual_transformer_blocks.1.self_attention.to_query",
        "visual_transformer_blocks.1.cross_attention.to_query",
    ]
    assert target_errors(["feed_forward", "cross_attention.to_key"]) == []
    assert "['modulation'] select no layer" in target_errors(["modulation", "to_value"])[0]
    assert target_errors([])


def test_peft_adapters_train_alone_and_start_as_the_identity():
    model = random_dit()
    x = inputs()
    with torch.no_grad():
        base = model(*x)
    add_lora(model, 4, 8.0)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    with torch.no_grad():
        assert torch.equal(model(*x), base)  # B starts at zero


def test_saved_file_has_diffusers_keys_and_folds_alpha(lora_file: Path):
    tensors = load_file(lora_file)
    key = "transformer.visual_transformer_blocks.1.cross_attention.to_value"
    assert tensors[f"{key}.lora_A.weight"].shape == (4, 32)
    assert tensors[f"{key}.lora_B.weight"].shape == (32, 4)
    assert all(k.startswith("transformer.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in tensors)
    assert len(tensors) == 2 * 26
    assert read_lora(lora_file, CONFIG).layers[key.removeprefix("transformer.")].scale == 1.0  # alpha/r folded


def test_hooks_reproduce_the_peft_model_and_leave_the_base_exact(lora_file: Path, tmp_path: Path):
    x = inputs()
    peft_model = trained_lora(random_dit(5))
    base = random_dit(5)
    with torch.no_grad():
        expected, base_out = peft_model(*x), base(*x)
        weights = read_lora(lora_file, CONFIG)
        with apply_loras(base, [(weights, 1.0)]):
            adapted = base(*x)
        after = base(*x)
        with apply_loras(base, [(weights, 0.0)]):
            zero = base(*x)
    torch.testing.assert_close(adapted, expected, rtol=0, atol=1e-5)
    assert (adapted - base_out).abs().max() > 1e-2, "the LoRA changes the output"
    assert torch.equal(after, base_out) and torch.equal(zero, base_out)
    assert not base._forward_hooks and all(not m._forward_hooks for m in base.modules())


def test_strengths_scale_and_several_loras_add_up(lora_file: Path, tmp_path: Path):
    other = save_lora(trained_lora(random_dit(9), targets=["feed_forward"]), tmp_path / "b.safetensors")
    model, x = random_dit(5), inputs()
    a, b = read_lora(lora_file, CONFIG), read_lora(other, CONFIG)
    with torch.no_grad():
        base = model(*x)
        with apply_loras(model, [(a, 0.5)]):
            half = model(*x)
    assert (half - base).abs().max() > 1e-3
    # The delta of one layer is linear in the strength: check it on a single linear.
    layer = model.get_submodule("visual_transformer_blocks.0.feed_forward.in_layer")
    h = torch.randn(3, 32)
    with torch.no_grad():
        plain = layer(h)
        deltas = {}
        for name, loras in {"a": [(a, 1.0)], "a2": [(a, 2.0)], "b": [(b, 1.0)], "ab": [(a, 1.0), (b, 1.0)]}.items():
            with apply_loras(model, loras):
                deltas[name] = layer(h) - plain
    torch.testing.assert_close(deltas["a2"], 2 * deltas["a"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(deltas["ab"], deltas["a"] + deltas["b"], rtol=1e-5, atol=1e-6)


def test_other_namings_and_alphas_load(lora_file: Path, tmp_path: Path):
    tensors = load_file(lora_file)
    reference = read_lora(lora_file, CONFIG).layers
    name = "visual_transformer_blocks.0.self_attention.to_query"

    bare = {k.removeprefix("transformer."): v for k, v in tensors.items()}  # no prefix
    save_file(bare, tmp_path / "bare.safetensors")
    assert torch.equal(read_lora(tmp_path / "bare.safetensors", CONFIG).layers[name].up, reference[name].up)

    peft_dir = tmp_path / "peft"  # peft's save_pretrained: base_model.model.* + adapter_config.json
    peft_dir.mkdir()
    save_file({"base_model.model." + k: v for k, v in bare.items()}, peft_dir / "adapter_model.safetensors")
    (peft_dir / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 2}))
    assert read_lora(peft_dir, CONFIG).layers[name].scale == 0.5

    kohya = {k.replace("lora_A", "lora_down").replace("lora_B", "lora_up"): v for k, v in bare.items()}
    kohya[f"{name}.alpha"] = torch.tensor(16.0)
    save_file(kohya, tmp_path / "kohya.safetensors")
    layers = read_lora(tmp_path / "kohya.safetensors", CONFIG).layers
    assert layers[name].scale == 4.0 and layers["text_transformer_blocks.0.feed_forward.in_layer"].scale == 1.0

    metadata = {"lora_adapter_metadata": json.dumps({"transformer.r": 4, "transformer.lora_alpha": 2.0})}
    save_file(tensors, tmp_path / "meta.safetensors", metadata=metadata)
    assert read_lora(tmp_path / "meta.safetensors", CONFIG).layers[name].scale == 0.5


def test_bad_files_fail_with_one_clear_line(lora_file: Path, tmp_path: Path):
    def error(path) -> str:
        with pytest.raises(LoraError) as info:
            read_lora(path, CONFIG)
        message = str(info.value)
        assert "\n" not in message
        return message

    assert "LoRA file not found" in error(tmp_path / "missing.safetensors")
    torch.save({"a": torch.zeros(1)}, tmp_path / "lora.pt")
    assert "pickle files can run code" in error(tmp_path / "lora.pt")
    (tmp_path / "text.safetensors").write_text("not a safetensors file at all")
    assert "not a safetensors file" in error(tmp_path / "text.safetensors")

    tensors = load_file(lora_file)
    save_file({"transformer.blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 32), **tensors}, tmp_path / "x.sft")
    assert "match no layer of the DiT: blocks.0.attn.to_q" in error(tmp_path / "x.sft")
    save_file({"transformer.foo.weight": torch.zeros(2), **tensors}, tmp_path / "y.safetensors")
    assert "keys are not LoRA weights" in error(tmp_path / "y.safetensors")
    wide = DiTConfig(**{**CONFIG.__dict__, "model_dim": 64, "ff_dim": 128})
    with pytest.raises(LoraError, match="made for another model"):
        read_lora(lora_file, wide)


def test_lora_state_dict_needs_adapters():
    with pytest.raises(ValueError, match="no LoRA adapters"):
        lora_state_dict(random_dit())


@pytest.mark.parametrize("strength", [1.0, 0.7])
def test_our_file_gives_diffusers_kandinsky5_the_same_output(lora_file: Path, strength: float):
    """Parity: diffusers' Kandinsky 5 LoRA loader (the pipelines' path) reads our file and agrees with us."""
    pytest.importorskip("peft")
    from diffusers.loaders import KandinskyLoraLoaderMixin
    from diffusers.models.transformers.transformer_kandinsky import Kandinsky5Attention

    from tests.models.test_dit_parity import FP32RopeProcessor, reference_model, run_both

    ours = random_dit(5)
    ref = reference_model(CONFIG)
    ref.load_state_dict(ours.state_dict(), strict=True)
    for module in ref.modules():
        if isinstance(module, Kandinsky5Attention):
            module.set_processor(FP32RopeProcessor())  # fp32 q/k like ours with round_qk_to_bf16=False
    state = KandinskyLoraLoaderMixin.lora_state_dict(str(lora_file))
    assert all("lora" in key for key in state)  # the pipelines' format check
    KandinskyLoraLoaderMixin.load_lora_into_transformer(state, transformer=ref, adapter_name="style")
    ref.set_adapters(["style"], weights=[strength])

    x, text, pooled, time = inputs()
    with apply_loras(ours, [(read_lora(lora_file, CONFIG), strength)]):
        a, b = run_both(ours, ref, CONFIG, x, text, pooled, time, (1.0, 1.0, 1.0))
    with torch.no_grad():
        base = random_dit(5)(x, text, pooled, time)
    assert (a - base).abs().max() > 1e-2
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# generate(lora=...) and kandinsky5 generate --lora, on the tiny offline pipeline of test_generate.py
# --------------------------------------------------------------------------------------------------

from tests import test_generate  # noqa: E402

shared_parts, tiny = test_generate.shared_parts, test_generate.tiny  # fixtures: text encoders, VAEs, repos


def _tiny_lora(variant_name: str, path: Path, seed: int) -> Path:
    from kandinsky5.variants import get_variant

    torch.manual_seed(seed)
    model = CrossDiT(get_variant(variant_name).dit)
    return save_lora(trained_lora(model), path)


def test_generate_with_loras_then_without(tiny, tmp_path: Path):
    cls, name, repo = tiny("t2v")
    model = cls.from_pretrained(repo, variant=name, device="cpu")
    a, b = _tiny_lora(name, tmp_path / "a.safetensors", 1), _tiny_lora(name, tmp_path / "b.safetensors", 2)

    def frames(**lora):
        return model.generate("a red fox runs", num_frames=5, seed=3, progress=False, **lora)

    base = frames()
    styled = frames(lora=a, lora_scale=0.8)
    assert not np.array_equal(styled.frames, base.frames)
    assert styled.metadata["lora"] == [[str(a), 0.8]]
    assert np.array_equal(frames(lora=a, lora_scale=0.0).frames, base.frames)  # strength 0: the base exactly
    assert np.array_equal(frames().frames, base.frames)  # nothing stays attached after a call
    both = frames(lora=[a, b], lora_scale=[0.8, 0.5])
    assert not np.array_equal(both.frames, styled.frames)
    with pytest.raises(ValueError, match="one per LoRA"):
        frames(lora=[a, b], lora_scale=[0.8])
    with pytest.raises(LoraError, match="LoRA file not found"):
        frames(lora=tmp_path / "nope.safetensors")


def test_cli_generate_takes_repeatable_lora_options(tiny, tmp_path: Path, capsys):
    from kandinsky5.cli import main

    cls, name, repo = tiny("t2v")
    a, b = _tiny_lora(name, tmp_path / "a.safetensors", 1), _tiny_lora(name, tmp_path / "b.safetensors", 2)
    out = tmp_path / "fox.mp4"
    args = ["generate", "a red fox", "-m", str(repo), "--variant", name, "--frames", "5", "--device", "cpu"]
    assert main([*args, "-o", str(out), "--lora", f"{a}:0.5", "--lora", str(b)]) == 0
    assert out.is_file()
    sidecar = json.loads(out.with_name(out.name + ".json").read_text())
    assert sidecar["lora"] == [[str(a), 0.5], [str(b), 1.0]]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: d / "missing.safetensors", "LoRA file not found"),
        (lambda d: d / "a.safetensors:0.5:x", "LoRA file not found"),
        (lambda d: torch.save({}, d / "l.pt") or d / "l.pt", "pickle files can run code"),
        (
            lambda d: (d / "t.safetensors").write_text("hello, not safetensors") and d / "t.safetensors",
            "not a safetensors file",
        ),
        (lambda d: save_lora(trained_lora(random_dit()), d / "small.safetensors"), "made for another model"),
        (lambda d: f"{save_lora(trained_lora(random_dit()), d / 'x.safetensors')}:inf", "SCALE must be a finite"),
    ],
)
def test_cli_rejects_bad_loras_in_one_line_before_loading(tmp_path: Path, capsys, make, message):
    from kandinsky5.cli import main

    lora = str(make(tmp_path))
    code = main(["generate", "a fox", "-m", "video-lite-5s-sft", "--lora", lora, "-o", str(tmp_path / "o.mp4")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "o.mp4").exists()
