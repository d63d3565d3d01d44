"""NABLA's fractal token order: round trips, block contents, grid checks, and DiT invariance."""

from __future__ import annotations

import pytest
import torch

from kandinsky5.models import CrossDiT, dense_attention
from kandinsky5.models.nabla import TILE, fractal_flatten, fractal_unflatten

GRIDS = [(1, 8, 8), (2, 16, 8), (3, 8, 24), (2, 24, 16)]


def coordinate_tokens(batch: int, grid: tuple[int, int, int]) -> torch.Tensor:
    """(B, T, H, W, 4) tokens whose features are their own (b, t, h, w) coordinates."""
    axes = (torch.arange(n) for n in (batch, *grid))
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)


@pytest.mark.parametrize("grid", GRIDS)
def test_round_trip_is_exact(grid):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, *grid, 5, generator=gen)
    flat = fractal_flatten(x)
    assert flat.shape == (2, grid[0] * grid[1] * grid[2], 5)
    assert torch.equal(fractal_unflatten(flat, grid), x)


@pytest.mark.parametrize("grid", GRIDS)
def test_each_block_is_one_frames_tile_in_row_major_order(grid):
    t_size, h_size, w_size = grid
    x = coordinate_tokens(2, grid)
    blocks = fractal_flatten(x).view(2, -1, TILE * TILE, 4)  # (B, blocks, 64, 4)
    h_tiles, w_tiles = h_size // TILE, w_size // TILE
    assert blocks.shape[1] == t_size * h_tiles * w_tiles

    for index in range(blocks.shape[1]):
        t, rest = divmod(index, h_tiles * w_tiles)  # blocks in (t, h-tile, w-tile) raster order
        hb, wb = divmod(rest, w_tiles)
        tile = x[:, t, hb * TILE : (hb + 1) * TILE, wb * TILE : (wb + 1) * TILE]  # (B, 8, 8, 4)
        assert torch.equal(blocks[:, index], tile.reshape(2, TILE * TILE, 4))


@pytest.mark.parametrize("grid", [(1, 12, 8), (2, 8, 4), (1, 7, 16), (3, 16, 10)])
def test_grid_not_in_whole_tiles_is_rejected(grid):
    with pytest.raises(ValueError, match="128 pixels"):
        fractal_flatten(torch.zeros(1, *grid, 2))


# --------------------------------------------------------------------------------- DiT invariance


class RecordingDense:
    """A ``VisualAttention`` that computes plain dense attention and keeps the first q it sees."""

    def __init__(self, fractal: bool):
        self.fractal = fractal
        self.first_query = None

    def __call__(self, q, k, v):
        if self.first_query is None:
            self.first_query = q.clone()
        return dense_attention(q, k, v)


@pytest.mark.parametrize("round_qk", [False, True], ids=["fp32-qk", "bf16-qk"])
def test_fractal_order_with_dense_attention_changes_nothing(
    tiny_config, random_state_dict, assert_no_zero_parameter, round_qk
):
    config = tiny_config()
    model = CrossDiT(config, round_qk_to_bf16=round_qk).eval()
    model.load_state_dict(random_state_dict(model, seed=3), strict=True)
    assert_no_zero_parameter(model)  # zero gates would make the visual blocks a no-op

    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 2, 16, 32, config.visual_embed_dim, generator=gen)  # 2×8×16 tokens
    text = torch.randn(2, 5, config.in_text_dim, generator=gen)
    pooled = torch.randn(2, config.in_text_dim2, generator=gen)
    time = torch.tensor([250.0, 900.0])
    raster, fractal = RecordingDense(fractal=False), RecordingDense(fractal=True)
    with torch.no_grad():
        plain = model(x, text, pooled, time, rope_scale=(1.0, 2.0, 2.0))
        via_raster = model(x, text, pooled, time, rope_scale=(1.0, 2.0, 2.0), visual_attention=raster)
        via_fractal = model(x, text, pooled, time, rope_scale=(1.0, 2.0, 2.0), visual_attention=fractal)

    # The kernel sees the rotated queries of the same tokens, re-ordered into 8×8 tiles...
    grid = (2, 8, 16)
    queries = raster.first_query.unflatten(1, grid).flatten(-2)  # (B, T, H, W, heads·D)
    expected = fractal_flatten(queries).unflatten(-1, fractal.first_query.shape[-2:])
    torch.testing.assert_close(fractal.first_query, expected, rtol=0, atol=0)
    # ...and the output comes back in raster order, equal to dense attention without NABLA.
    assert torch.equal(via_raster, plain)
    assert plain.std() > 0.5
    # bf16 q/k rounding turns summation-order noise into ~2e-5
    torch.testing.assert_close(via_fractal, plain, rtol=0, atol=1e-4)
