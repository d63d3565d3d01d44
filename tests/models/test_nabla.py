"""NABLA: mask properties, NablaAttention against dense attention under the same masks, the DiT with
NABLA against the DiT with those masks applied densely, stats, and the grid constraint."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kandinsky5.config import NablaConfig
from kandinsky5.models import CrossDiT
from kandinsky5.models import nabla as nabla_module
from kandinsky5.models.attention import BLOCK, DenseAttention
from kandinsky5.models.nabla import (
    TILE,
    NablaAttention,
    adaptive_block_mask,
    fractal_flatten,
    nabla_block_mask,
    sta_mask,
    visual_attention_for,
)

BACKENDS = ["cpu-sparse", "masked-dense"] + (["flex"] if torch.cuda.is_available() else [])
GRIDS = [(1, 8, 8), (1, 16, 24), (3, 16, 16), (5, 8, 24)]  # token grids (T, H, W)


def num_blocks(grid: tuple[int, int, int]) -> int:
    return grid[0] * (grid[1] // TILE) * (grid[2] // TILE)


def structured_qkv(batch: int, grid: tuple[int, int, int], heads: int, dim: int = 16, seed: int = 0):
    """q, k, v (B, S, heads, D) whose blocks carry a strong common component, so the pooled maps are
    peaked and the adaptive masks are genuinely sparse (pure noise pools to a near-uniform map)."""
    gen = torch.Generator().manual_seed(seed)
    n = num_blocks(grid)

    def tensor(block_scale: float) -> torch.Tensor:
        per_block = block_scale * torch.randn(batch, n, 1, heads, dim, generator=gen)
        return (per_block + torch.randn(batch, n, BLOCK, heads, dim, generator=gen)).flatten(1, 2)

    return tensor(2.0), tensor(2.0), tensor(0.0)


def pooled_probs(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The pooled attention map written out independently: (B, heads, N, N)."""
    qa = q.unflatten(1, (-1, BLOCK)).mean(2).transpose(1, 2)  # (B, heads, N, D)
    ka = k.unflatten(1, (-1, BLOCK)).mean(2).transpose(1, 2)
    return torch.softmax(qa @ ka.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)


def masked_reference(q, k, v, block_mask):
    """Dense SDPA with the block mask expanded to tokens."""
    tokens = block_mask.repeat_interleave(BLOCK, -2).repeat_interleave(BLOCK, -1)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=tokens)
    return out.transpose(1, 2).flatten(2)


# ---------------------------------------------------------------------------------- STA


@pytest.mark.parametrize(
    "grid_blocks, window",
    [((1, 1, 1), (1, 1, 1)), ((4, 3, 5), (3, 1, 3)), ((6, 2, 2), (11, 3, 3)), ((3, 4, 2), (1, 5, 1))],
)
def test_sta_mask_matches_its_definition(grid_blocks, window):
    t_size, h_size, w_size = grid_blocks
    coords = [(t, h, w) for t in range(t_size) for h in range(h_size) for w in range(w_size)]  # index order

    def near(i, j):
        return all(abs(a - b) <= size // 2 for a, b, size in zip(i, j, window, strict=True))

    expected = torch.tensor([[near(i, j) for j in coords] for i in coords])
    assert torch.equal(sta_mask(grid_blocks, window), expected)


def test_sta_mask_indexes_blocks_in_fractal_token_order():
    # Tag each token with its block's (t, h-tile, w-tile); after fractal_flatten, block i's tag must be
    # the coordinate STA assigns to row i.
    grid, window = (3, 16, 24), (3, 1, 3)
    t, h, w = torch.meshgrid(*(torch.arange(n) for n in grid), indexing="ij")
    tags = torch.stack([t, h // TILE, w // TILE], dim=-1)[None]  # (1, T, H, W, 3)
    block_coords = fractal_flatten(tags)[0, ::BLOCK]  # (N, 3): first token of each block
    near = (block_coords[:, None] - block_coords[None]).abs() <= torch.tensor(window) // 2
    assert torch.equal(sta_mask((3, 2, 3), window), near.all(-1))


# --------------------------------------------------------------------------- adaptive mask


@pytest.mark.parametrize("P", [0.3, 0.7, 0.9])
def test_each_row_keeps_the_smallest_block_set_holding_P_of_the_pooled_mass(P):
    q, k, _ = structured_qkv(2, (3, 16, 16), heads=3)
    mask = adaptive_block_mask(q, k, P)
    probs = pooled_probs(q, k)
    kept_mass = (probs * mask).sum(-1)  # (B, heads, N)
    smallest_kept = probs.masked_fill(~mask, 2.0).amin(-1)
    assert mask.shape == (2, 3, 12, 12)
    assert bool((kept_mass >= P - 1e-6).all())
    assert bool((kept_mass - smallest_kept < P + 1e-6).all())  # no kept block is superfluous
    assert mask.float().mean() < 0.9  # the test data give a sparse mask


def test_threshold_one_keeps_everything():
    q, k, _ = structured_qkv(2, (2, 8, 16), heads=3)
    assert bool(adaptive_block_mask(q, k, 1.0).all())


def test_tiny_threshold_keeps_exactly_each_rows_most_probable_block():
    # topcdf keeps the ascending entries whose cumulative sum reaches 1 − P. With P = 1e-6 that is the
    # last entry alone (its cumsum is the row total ≈ 1), since all before it sum to 1 − max ≤ 1 − 1/N.
    q, k, _ = structured_qkv(2, (3, 16, 16), heads=3, seed=7)
    mask = adaptive_block_mask(q, k, 1e-6)
    top = F.one_hot(pooled_probs(q, k).argmax(-1), num_classes=12).bool()
    assert torch.equal(mask, top)
    sta = sta_mask((3, 2, 2), (1, 1, 1))
    assert torch.equal(nabla_block_mask(q, k, sta, 1e-6), top | sta)


@pytest.mark.parametrize("grid", GRIDS)
def test_nabla_mask_contains_sta_and_the_adaptive_mask(grid):
    q, k, _ = structured_qkv(2, grid, heads=3)
    sta = sta_mask((grid[0], grid[1] // TILE, grid[2] // TILE), (3, 1, 1))
    mask = nabla_block_mask(q, k, sta, 0.5)
    assert bool(mask[:, :, sta].all())
    assert torch.equal(mask, adaptive_block_mask(q, k, 0.5) | sta)


def test_pooled_map_is_fp32_for_bf16_inputs():
    q, k, _ = structured_qkv(1, (2, 16, 16), heads=2)
    assert torch.equal(
        adaptive_block_mask(q.bfloat16(), k.bfloat16(), 0.8),
        adaptive_block_mask(q.bfloat16().float(), k.bfloat16().float(), 0.8),
    )


def test_adaptive_mask_is_the_same_when_built_a_few_heads_at_a_time(monkeypatch):
    q, k, _ = structured_qkv(2, (3, 16, 16), heads=5)
    whole = adaptive_block_mask(q, k, 0.7)
    monkeypatch.setattr(nabla_module, "MAP_ELEMENTS", 2 * 12 * 12 * 2)  # two heads per pass
    assert torch.equal(adaptive_block_mask(q, k, 0.7), whole)


# ------------------------------------------------------------------------- NablaAttention


@pytest.mark.parametrize(
    "grid, batch, heads", [((1, 8, 8), 1, 1), ((1, 16, 24), 2, 3), ((3, 16, 16), 2, 5), ((5, 8, 24), 1, 3)]
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_nabla_attention_equals_dense_attention_under_its_mask(grid, batch, heads, backend):
    q, k, v = (x.to("cuda" if backend == "flex" else "cpu") for x in structured_qkv(batch, grid, heads))
    nabla = NablaAttention(grid, NablaConfig(P=0.6, wT=3, wH=1, wW=1), backend=backend)
    mask = nabla.block_mask(q, k)
    out = nabla(q, k, v)
    assert nabla.fractal is True
    assert out.shape == (batch, q.shape[1], heads * 16)
    torch.testing.assert_close(out, masked_reference(q, k, v, mask), rtol=0, atol=1e-5)


def test_mask_and_stats_are_identical_across_backends():
    grid = (3, 16, 16)
    q, k, v = structured_qkv(2, grid, heads=3)
    config = NablaConfig(P=0.6, wT=1, wH=3, wW=1)
    runs = [NablaAttention(grid, config, backend, record_stats=True) for backend in BACKENDS]
    masks = [run.block_mask(q, k) for run in runs]
    for run in runs:
        run(q, k, v)
    assert all(torch.equal(mask, masks[0]) for mask in masks)
    assert all(run.stats == runs[0].stats for run in runs)
    assert runs[0].stats == [pytest.approx(masks[0].float().mean().item())]


def test_sta_is_built_once_at_construction():
    nabla = NablaAttention((11, 16, 24), NablaConfig(P=0.9, wT=11, wH=3, wW=3))
    assert torch.equal(nabla.sta, sta_mask((11, 2, 3), (11, 3, 3)))
    assert nabla.sta.shape == (66, 66)


@pytest.mark.parametrize("grid", [(1, 12, 8), (2, 8, 4), (1, 7, 16), (3, 16, 10)])
def test_grid_not_in_whole_tiles_is_rejected_at_construction(grid):
    with pytest.raises(ValueError, match="multiples of 128 pixels"):
        NablaAttention(grid)
    with pytest.raises(ValueError, match="multiples of 128 pixels"):
        visual_attention_for("nabla", grid)


def test_token_count_must_match_the_grid():
    q, k, v = structured_qkv(1, (2, 8, 8), heads=1)
    with pytest.raises(ValueError, match="token grid"):
        NablaAttention((1, 8, 8))(q, k, v)


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="NABLA backend"):
        NablaAttention((1, 8, 8), backend="sdpa")


# ------------------------------------------------------------------------------- factory


def test_visual_attention_for_switches_nabla_on_and_off():
    grid = (2, 16, 16)
    default = visual_attention_for("nabla", grid)
    assert isinstance(default, NablaAttention) and default.config == NablaConfig()
    tuned = visual_attention_for("nabla", grid, NablaConfig(P=0.5, wT=3, wH=1, wW=1), backend="cpu-sparse")
    assert tuned.config.P == 0.5 and tuned.backend == "cpu-sparse"
    assert visual_attention_for("dense", grid, backend="sdpa") is None
    dense = visual_attention_for("dense", grid)
    assert isinstance(dense, DenseAttention) and dense.fractal is False
    with pytest.raises(ValueError, match="'dense' or 'nabla'"):
        visual_attention_for("sparse", grid)
    with pytest.raises(ValueError, match="backend"):
        visual_attention_for("dense", grid, backend="flex")


# -------------------------------------------------------------------------------- the DiT


class RecordingNabla(NablaAttention):
    """NablaAttention that keeps every call's block mask."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.masks: list[torch.Tensor] = []

    def block_mask(self, q, k):
        mask = super().block_mask(q, k)
        self.masks.append(mask)
        return mask


class ReplayedMasks:
    """A VisualAttention that applies given per-call block masks densely, in call order."""

    fractal = True

    def __init__(self, masks: list[torch.Tensor]):
        self.masks = iter(masks)

    def __call__(self, q, k, v):
        return masked_reference(q, k, v, next(self.masks))


@pytest.fixture(scope="module")
def dit_case(tiny_config, random_state_dict):
    config = tiny_config()
    model = CrossDiT(config, round_qk_to_bf16=False).eval()
    model.load_state_dict(random_state_dict(model, seed=3), strict=True)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 32, 32, config.visual_embed_dim, generator=gen)  # tokens 3×16×16
    text = torch.randn(2, 5, config.in_text_dim, generator=gen)
    pooled = torch.randn(2, config.in_text_dim2, generator=gen)
    time = torch.tensor([250.0, 900.0])

    def run(visual_attention):
        with torch.no_grad():
            return model(x, text, pooled, time, visual_attention=visual_attention)

    return run, (3, 16, 16), config.num_visual_blocks


def test_dit_with_nabla_equals_dit_with_the_same_masks_applied_densely(dit_case):
    run, grid, num_layers = dit_case
    nabla = RecordingNabla(grid, NablaConfig(P=0.5, wT=1, wH=1, wW=3), backend="cpu-sparse", record_stats=True)
    sparse = run(nabla)
    assert len(nabla.masks) == num_layers
    assert all(mask.float().mean() < 0.8 for mask in nabla.masks)  # the masks really drop blocks
    dense_masked = run(ReplayedMasks(nabla.masks))
    torch.testing.assert_close(sparse, dense_masked, rtol=0, atol=1e-5)
    assert (sparse - run(None)).abs().max() > 1e-3  # and NABLA changed the output

    per_layer = nabla.stats_per_layer(num_layers)
    assert per_layer == pytest.approx([mask.float().mean().item() for mask in nabla.masks])


def test_dit_with_nabla_at_threshold_one_equals_dense_dit(dit_case):
    run, grid, _ = dit_case
    full = run(NablaAttention(grid, NablaConfig(P=1.0), backend="cpu-sparse"))
    torch.testing.assert_close(full, run(None), rtol=0, atol=1e-5)


def test_stats_per_layer_averages_calls_layer_by_layer():
    nabla = NablaAttention((1, 8, 8), record_stats=True)
    nabla.stats.extend([0.1, 0.5, 0.3, 0.7])  # two forwards of two layers
    assert nabla.stats_per_layer(2) == pytest.approx([0.2, 0.6])
    with pytest.raises(ValueError, match="3 layers"):
        nabla.stats_per_layer(3)
    nabla.reset()
    assert nabla.stats == []
    with pytest.raises(ValueError, match="record_stats"):
        nabla.stats_per_layer(2)
