"""Patchify / unpatchify feature orders, adaLN helpers and the modulation chunk order."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from kandinsky5.models.blocks import TextBlock, VisualBlock
from kandinsky5.models.layers import (
    Modulation,
    OutLayer,
    VisualEmbeddings,
    gated_residual,
    modulate,
)
from kandinsky5.models.rope import rope_1d, rope_3d

PATCH = (2, 3, 2)  # all different, so any swapped axis shows


def coordinate_latents(batch: int, grid: tuple[int, int, int], channels: int) -> torch.Tensor:
    """(B, T, H, W, C) whose every value spells its own (b, t, h, w, c) index in decimal digits."""
    b, t, h, w, c = torch.meshgrid(
        *(torch.arange(n, dtype=torch.float64) for n in (batch, *grid, channels)), indexing="ij"
    )
    return 10000 * b + 1000 * t + 100 * h + 10 * w + c


def set_identity(linear: torch.nn.Linear) -> None:
    with torch.no_grad():
        linear.weight.copy_(torch.eye(*linear.weight.shape))
        linear.bias.zero_()


# ---------------------------------------------------------------------------------------- patchify


def test_patchify_features_are_pt_ph_pw_c_with_channel_fastest():
    channels, (pt, ph, pw) = 3, PATCH
    features = math.prod(PATCH) * channels
    embed = VisualEmbeddings(channels, features, PATCH).double()
    set_identity(embed.in_layer)
    x = coordinate_latents(2, (2 * pt, 2 * ph, pw), channels)

    with torch.no_grad():
        tokens = embed(x)  # (B, T', H', W', features), each feature a copied latent value

    assert tokens.shape == (2, 2, 2, 1, features)
    for b, t, h, w in itertools.product(range(2), range(2), range(2), range(1)):
        for i, j, k, c in itertools.product(range(pt), range(ph), range(pw), range(channels)):
            feature = ((i * ph + j) * pw + k) * channels + c
            source = x[b, t * pt + i, h * ph + j, w * pw + k, c]
            assert tokens[b, t, h, w, feature] == source


def test_out_layer_unpatchify_features_are_c_pt_ph_pw_with_channel_slowest():
    channels, (pt, ph, pw) = 3, PATCH
    dim = math.prod(PATCH) * channels  # identity projection: out features = model features
    layer = OutLayer(dim, 8, channels, PATCH).double()
    set_identity(layer.out_layer)
    with torch.no_grad():
        layer.modulation.out_layer.weight.zero_()
        layer.modulation.out_layer.bias.zero_()  # shift = scale = 0: output is LN(x)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 2, 1, 2, dim, generator=gen, dtype=torch.float64)
    temb = torch.randn(2, 8, generator=gen, dtype=torch.float64)

    with torch.no_grad():
        out = layer(x, temb)
    normed = F.layer_norm(x, (dim,), eps=1e-5)

    assert out.shape == (2, 2 * pt, 1 * ph, 2 * pw, channels)
    for b, t, h, w in itertools.product(range(2), range(2), range(1), range(2)):
        for i, j, k, c in itertools.product(range(pt), range(ph), range(pw), range(channels)):
            feature = ((c * pt + i) * ph + j) * pw + k
            got = out[b, t * pt + i, h * ph + j, w * pw + k, c]
            torch.testing.assert_close(got, normed[b, t, h, w, feature], rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------ adaLN arithmetic


def test_modulate_formula_fp32():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 16, generator=gen)
    shift, scale = torch.randn(2, 1, 16, generator=gen), torch.randn(2, 1, 16, generator=gen)
    mean = x.mean(-1, keepdim=True)
    var = x.var(-1, unbiased=False, keepdim=True)
    expected = (x - mean) / torch.sqrt(var + 1e-5) * (1 + scale) + shift
    out = modulate(x, shift, scale)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


def test_modulate_computes_in_fp32_and_rounds_once_to_bf16():
    gen = torch.Generator().manual_seed(2)
    x = (3 * torch.randn(2, 64, 32, generator=gen)).to(torch.bfloat16)
    shift, scale = torch.randn(2, 1, 32, generator=gen), torch.randn(2, 1, 32, generator=gen)
    out = modulate(x, shift, scale)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, modulate(x.float(), shift, scale).to(torch.bfloat16))
    # Arithmetic in bf16 would land elsewhere: the fp32 island is observable.
    in_bf16 = F.layer_norm(x, (32,), eps=1e-5) * (1 + scale.bfloat16()) + shift.bfloat16()
    assert not torch.equal(out, in_bf16)


def test_gated_residual_formula_and_bf16_stream():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 64, 32, generator=gen)
    out = torch.randn(2, 64, 32, generator=gen)
    gate = torch.randn(2, 1, 32, generator=gen)
    torch.testing.assert_close(gated_residual(x, out, gate), x + gate * out, rtol=0, atol=1e-6)

    x16, out16 = x.to(torch.bfloat16), out.to(torch.bfloat16)
    result = gated_residual(x16, out16, gate)
    assert result.dtype == torch.bfloat16  # the residual stream keeps its storage dtype
    assert torch.equal(result, gated_residual(x16.float(), out16.float(), gate).to(torch.bfloat16))
    assert not torch.equal(result, x16 + gate.bfloat16() * out16)


# ---------------------------------------------------------------------------------- modulation


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
def test_modulation_output_is_fp32_in_chunk_order(weight_dtype):
    time_dim, dim, count = 8, 4, 3
    modulation = Modulation(time_dim, dim, count)
    with torch.no_grad():
        modulation.out_layer.weight.zero_()
        modulation.out_layer.bias.copy_(torch.arange(count).repeat_interleave(dim).float())
    modulation.to(weight_dtype)
    chunks = modulation(torch.randn(2, time_dim))
    assert len(chunks) == count
    for index, chunk in enumerate(chunks):
        assert chunk.dtype == torch.float32 and chunk.shape == (2, 1, dim)
        assert torch.equal(chunk, torch.full_like(chunk, index))


def test_modulation_applies_silu_first():
    modulation = Modulation(3, 2, 1)
    temb = torch.tensor([[-1.0, 0.5, 2.0]])
    (out,) = modulation(temb)
    torch.testing.assert_close(out[:, 0], modulation.out_layer(F.silu(temb)), rtol=0, atol=0)


def with_modulation_bias(block: torch.nn.Module, modulation: Modulation, seed: int) -> list[torch.Tensor]:
    """Zero the modulation weight and give each (shift, scale, gate) chunk its own random bias."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        modulation.out_layer.weight.zero_()
        modulation.out_layer.bias.copy_(torch.randn(modulation.out_layer.bias.shape, generator=gen))
    return list(modulation.out_layer.bias.detach().view(1, 1, modulation.num_params, -1).unbind(2))


def adaln(x, shift, scale):
    return F.layer_norm(x, x.shape[-1:], eps=1e-5) * (1 + scale) + shift


def test_text_block_chunks_are_shift_scale_gate_per_sublayer():
    torch.manual_seed(0)
    block = TextBlock(32, 8, 64, 16, round_qk=False)
    shift1, scale1, gate1, shift2, scale2, gate2 = with_modulation_bias(block, block.text_modulation, 4)
    x, temb, rope = torch.randn(2, 5, 32), torch.randn(2, 8), rope_1d(5, 16)

    h = x + gate1 * block.self_attention(adaln(x, shift1, scale1), rope=rope)
    expected = h + gate2 * block.feed_forward(adaln(h, shift2, scale2))

    with torch.no_grad():
        torch.testing.assert_close(block(x, temb, rope, None), expected, rtol=0, atol=1e-5)


def test_visual_block_chunks_are_shift_scale_gate_per_sublayer():
    torch.manual_seed(0)
    block = VisualBlock(32, 8, 64, 16, round_qk=False)
    s1, c1, g1, s2, c2, g2, s3, c3, g3 = with_modulation_bias(block, block.visual_modulation, 5)
    x, text, temb = torch.randn(2, 6, 32), torch.randn(2, 3, 32), torch.randn(2, 8)
    rope = rope_3d((1, 2, 3), (4, 6, 6))

    h = x + g1 * block.self_attention(adaln(x, s1, c1), rope=rope)
    h = h + g2 * block.cross_attention(adaln(h, s2, c2), context=text)
    expected = h + g3 * block.feed_forward(adaln(h, s3, c3))

    with torch.no_grad():
        torch.testing.assert_close(block(x, text, temb, rope, None), expected, rtol=0, atol=1e-5)


def test_out_layer_chunks_are_shift_then_scale():
    torch.manual_seed(0)
    layer = OutLayer(8, 4, 2, (1, 1, 1))
    shift, scale = with_modulation_bias(layer, layer.modulation, 6)
    x, temb = torch.randn(2, 1, 2, 3, 8), torch.randn(2, 4)
    expected = layer.out_layer(adaln(x, shift[:, None, None], scale[:, None, None]))
    with torch.no_grad():
        torch.testing.assert_close(layer(x, temb), expected, rtol=0, atol=1e-5)
