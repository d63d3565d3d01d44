"""Rotary embeddings: interleaved-pair rotation, the [t | h | w] angle layout, scale division."""

from __future__ import annotations

import math

import pytest
import torch

from kandinsky5.models.rope import Rotary, apply_rope, rope_1d, rope_3d, sinusoid_freqs


def rotation_matrices(angles: torch.Tensor) -> torch.Tensor:
    """(S, P) angles → (S, P, 2, 2) matrices [[cos, −sin], [sin, cos]]."""
    c, s = angles.cos(), angles.sin()
    return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)


def test_sinusoid_freqs_formula():
    dim = 8
    expected = torch.tensor([10000.0 ** (-j / dim) for j in range(dim)])
    torch.testing.assert_close(sinusoid_freqs(dim), expected, rtol=1e-6, atol=0)


def test_apply_rope_matches_rotation_matrices():
    gen = torch.Generator().manual_seed(0)
    batch, seq, heads, dim = 2, 5, 3, 8
    angles = 10 * torch.randn(seq, dim // 2, generator=gen)
    x = torch.randn(batch, seq, heads, dim, generator=gen)

    pairs = x.unflatten(-1, (-1, 2))  # (B, S, heads, D/2, 2): pair i = (x[2i], x[2i+1])
    expected = torch.einsum("spij,bshpj->bshpi", rotation_matrices(angles), pairs).flatten(-2)

    out = apply_rope(x, Rotary(angles))
    assert out.dtype == torch.float32 and out.shape == x.shape
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_apply_rope_rotates_interleaved_pairs_not_halves():
    """Angle π/2 on pair 0 only maps (x0, x1) → (−x1, x0) and leaves the rest alone."""
    angles = torch.zeros(1, 2)
    angles[0, 0] = math.pi / 2
    x = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 1, 4)
    out = apply_rope(x, Rotary(angles)).flatten()
    torch.testing.assert_close(out, torch.tensor([-2.0, 1.0, 3.0, 4.0]), rtol=0, atol=1e-6)


def test_apply_rope_computes_in_fp32_from_bf16():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 2, 8, generator=gen).to(torch.bfloat16)
    rope = rope_1d(4, 8)
    out = apply_rope(x, rope)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, apply_rope(x.float(), rope), rtol=0, atol=0)


def test_rotation_preserves_each_pair_norm():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 6, 2, 16, generator=gen)
    out = apply_rope(x, rope_3d((1, 2, 3), (4, 6, 6), (1.0, 2.0, 2.0)))
    norms_in = x.unflatten(-1, (-1, 2)).norm(dim=-1)
    norms_out = out.unflatten(-1, (-1, 2)).norm(dim=-1)
    torch.testing.assert_close(norms_out, norms_in, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("scale", [(1.0, 1.0, 1.0), (1.0, 2.0, 2.0), (1.0, 3.16, 3.16), (2.0, 1.5, 0.5)])
def test_rope_3d_angle_blocks_in_t_h_w_order(scale):
    grid, axes = (3, 4, 5), (4, 6, 8)
    rope = rope_3d(grid, axes, scale)
    assert rope.cos.shape == rope.sin.shape == (math.prod(grid), sum(axes) // 2)

    expected = torch.empty(*grid, sum(axes) // 2, dtype=torch.float64)
    for t in range(grid[0]):
        for h in range(grid[1]):
            for w in range(grid[2]):
                column = 0
                for pos, dim, factor in zip((t, h, w), axes, scale, strict=True):
                    for j in range(dim // 2):
                        expected[t, h, w, column] = pos * 10000.0 ** (-j / (dim // 2)) / factor
                        column += 1
    expected = expected.flatten(0, 2)  # raster order: t slowest, w fastest
    torch.testing.assert_close(rope.cos.double(), expected.cos(), rtol=0, atol=2e-6)
    torch.testing.assert_close(rope.sin.double(), expected.sin(), rtol=0, atol=2e-6)


def test_rope_3d_axis_blocks_depend_on_their_axis_only():
    grid, axes = (2, 3, 4), (4, 6, 6)
    rope = rope_3d(grid, axes)
    cos = rope.cos.view(*grid, -1)
    t_block, h_block, w_block = cos.split([a // 2 for a in axes], dim=-1)
    assert torch.equal(t_block, t_block[:, :1, :1].expand_as(t_block))
    assert torch.equal(h_block, h_block[:1, :, :1].expand_as(h_block))
    assert torch.equal(w_block, w_block[:1, :1, :].expand_as(w_block))


def test_rope_1d_prefix_is_shorter_table():
    short, long = rope_1d(7, 16), rope_1d(300, 16)
    assert short.cos.shape == (7, 8)
    assert torch.equal(short.cos, long.cos[:7]) and torch.equal(short.sin, long.sin[:7])


def test_rope_1d_score_depends_only_on_position_difference():
    gen = torch.Generator().manual_seed(3)
    dim, length = 16, 40
    q = torch.randn(dim, generator=gen).expand(1, length, 1, dim)  # same vector at every position
    k = torch.randn(dim, generator=gen).expand(1, length, 1, dim)
    rope = rope_1d(length, dim)
    scores = apply_rope(q, rope)[0, :, 0] @ apply_rope(k, rope)[0, :, 0].T  # (L, L): q_m · k_n

    for offset in (-5, 0, 3, 17):
        diagonal = torch.diagonal(scores, offset=offset)  # all (m, n) with n − m = offset
        torch.testing.assert_close(diagonal, diagonal[:1].expand_as(diagonal), rtol=0, atol=1e-4)
    assert (scores[0, 3] - scores[0, 4]).abs() > 1e-3  # and different offsets give different scores
