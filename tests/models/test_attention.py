"""Attention kernels: every block-sparse backend equals dense SDPA under the expanded block mask."""

from __future__ import annotations

import importlib.util
import logging
import os

import pytest
import torch
import torch.nn.functional as F

from kandinsky5.models import attention as attention_module
from kandinsky5.models.attention import (
    BLOCK,
    DenseAttention,
    _chunks,
    _sparse_all_rows,
    _sparse_by_group,
    attention,
    block_sparse_attention,
    dense_attention,
    resolve_backend,
    token_mask,
)


def random_qkv(batch: int, blocks: int, heads: int, dim: int = 16, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, blocks * BLOCK, heads, dim, generator=gen) for _ in range(3)]


def random_block_mask(shape: tuple[int, ...], density: float, seed: int = 1) -> torch.Tensor:
    """A random block mask whose rows keep varied numbers of blocks, the diagonal always kept."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(shape, generator=gen) < density
    return mask | torch.eye(shape[-1], dtype=torch.bool)


def reference(q, k, v, block_mask):
    """Dense SDPA with the block mask expanded to a (B, heads, S, S) token mask, written out here."""
    tokens = block_mask.repeat_interleave(BLOCK, -2).repeat_interleave(BLOCK, -1)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=tokens)
    return out.transpose(1, 2).flatten(2)


def test_token_mask_expands_each_block_to_a_square():
    block = torch.tensor([[True, False], [False, True]])
    expected = torch.zeros(128, 128, dtype=torch.bool)
    expected[:64, :64] = expected[64:, 64:] = True
    assert torch.equal(token_mask(block), expected)


# ----------------------------------------------------------------------------- block-sparse


@pytest.mark.parametrize("backend", ["cpu-sparse", "masked-dense"])
@pytest.mark.parametrize(
    "batch, blocks, heads, mask_batch, mask_heads",
    [(1, 1, 1, 1, 1), (2, 7, 3, 2, 3), (2, 12, 5, 1, 5), (1, 9, 2, 1, 1)],
)
def test_block_sparse_backends_equal_masked_dense(backend, batch, blocks, heads, mask_batch, mask_heads):
    q, k, v = random_qkv(batch, blocks, heads)
    mask = random_block_mask((mask_batch, mask_heads, blocks, blocks), density=0.35)
    out = attention(q, k, v, block_mask=mask, backend=backend)
    assert out.shape == (batch, blocks * BLOCK, heads * 16)
    torch.testing.assert_close(out, reference(q, k, v, mask), rtol=0, atol=1e-5)


# cpu-sparse has two strategies, picked by the number of intra-op threads; both must be exact.
STRATEGIES = {"by-group": _sparse_by_group, "all-rows": _sparse_all_rows}


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize(
    "chunk_bytes", [1, 60 * 2 * BLOCK * 16 * 4, 1 << 30], ids=["one-row", "60-blocks", "one-chunk"]
)
def test_cpu_sparse_is_exact_for_any_chunking(strategy, chunk_bytes):
    # Buffers of one row, of 60 key+value blocks (mixed counts, some padded), or everything.
    q, k, v = random_qkv(2, 10, 3, seed=5)
    mask = random_block_mask((2, 3, 10, 10), density=0.5, seed=6)
    out = STRATEGIES[strategy](q, k, v, mask, chunk_bytes)
    torch.testing.assert_close(out, reference(q, k, v, mask), rtol=0, atol=1e-5)


@pytest.mark.parametrize("threads", [1, 2])
def test_cpu_sparse_picks_a_strategy_by_threads_and_both_are_exact(threads):
    q, k, v = random_qkv(2, 7, 3, seed=10)
    mask = random_block_mask((1, 3, 7, 7), density=0.3, seed=11)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = block_sparse_attention(q, k, v, mask)
    finally:
        torch.set_num_threads(previous)
    torch.testing.assert_close(out, reference(q, k, v, mask), rtol=0, atol=1e-5)


def test_cpu_sparse_with_a_full_mask_is_dense_attention():
    q, k, v = random_qkv(1, 6, 2, seed=2)
    out = block_sparse_attention(q, k, v, torch.ones(1, 1, 6, 6, dtype=torch.bool))
    torch.testing.assert_close(out, dense_attention(q, k, v), rtol=0, atol=1e-5)


def test_cpu_sparse_gives_zeros_for_a_row_that_keeps_nothing():
    q, k, v = random_qkv(1, 4, 2, seed=3)
    mask = random_block_mask((1, 2, 4, 4), density=0.5)
    mask[0, 1, 2] = False  # head 1, query block 2 attends nothing
    out = block_sparse_attention(q, k, v, mask).unflatten(-1, (2, 16))  # (B, S, heads, D)
    assert not out[0, 2 * BLOCK : 3 * BLOCK, 1].any()
    expected = reference(q, k, v, mask).unflatten(-1, (2, 16))
    torch.testing.assert_close(out[:, :, 0], expected[:, :, 0], rtol=0, atol=1e-5)


def test_cpu_sparse_gives_zeros_for_a_mask_that_keeps_nothing():
    q, k, v = random_qkv(2, 3, 2, seed=7)
    out = block_sparse_attention(q, k, v, torch.zeros(1, 1, 3, 3, dtype=torch.bool))
    assert out.shape == (2, 3 * BLOCK, 2 * 16) and not out.any()


@pytest.mark.parametrize("backend", ["cpu-sparse", "masked-dense"])
def test_block_sparse_backends_take_bf16(backend):
    # bf16 in, bf16 out; against the fp32 reference on the same (bf16-rounded) values, within bf16's
    # rounding of the result.
    q, k, v = (x.bfloat16() for x in random_qkv(2, 6, 3, seed=8))
    mask = random_block_mask((2, 3, 6, 6), density=0.4, seed=9)
    out = attention(q, k, v, block_mask=mask, backend=backend)
    assert out.dtype == torch.bfloat16
    expected = reference(q.float(), k.float(), v.float(), mask)
    torch.testing.assert_close(out.float(), expected, rtol=0, atol=1e-2)


def test_chunks_cover_every_row_within_capacity():
    sizes = [0, 0, 1, 1, 2, 3, 3, 3, 5, 8, 8, 9]
    bounds = _chunks(sizes, first=2, capacity=9)
    assert [start for start, _ in bounds] == [2] + [end for _, end in bounds[:-1]]
    assert bounds[-1][1] == len(sizes)
    assert all((end - start) * sizes[end - 1] <= 9 for start, end in bounds)


# Compiled flex on CPU builds a C++ kernel (~15 s), so without a GPU it runs only on request.
FLEX_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.skipif(
    FLEX_DEVICE == "cpu" and os.environ.get("KANDINSKY5_TEST_COMPILE") != "1",
    reason="needs CUDA (or KANDINSKY5_TEST_COMPILE=1 to compile flex_attention on the CPU)",
)
def test_flex_equals_masked_dense():
    q, k, v = (x.to(FLEX_DEVICE) for x in random_qkv(2, 9, 3, seed=4))
    mask = random_block_mask((2, 3, 9, 9), density=0.4).to(FLEX_DEVICE)
    out = attention(q, k, v, block_mask=mask, backend="flex")
    torch.testing.assert_close(out, reference(q, k, v, mask), rtol=0, atol=1e-5)


def test_only_the_flex_backend_compiles(monkeypatch):
    monkeypatch.setattr(attention_module, "_compiled_flex", None)
    q, k, v = random_qkv(1, 2, 1)
    mask = torch.ones(1, 1, 2, 2, dtype=torch.bool)
    for backend in ("auto", "cpu-sparse", "masked-dense"):
        attention(q, k, v, block_mask=mask, backend=backend)
    assert attention_module._compiled_flex is None


# ------------------------------------------------------------------------------ dispatch


def test_dense_attention_through_the_dispatcher():
    q, k, v = random_qkv(2, 2, 3)
    expected = dense_attention(q, k, v)
    assert torch.equal(attention(q, k, v), expected)
    assert torch.equal(attention(q, k, v, backend="sdpa"), expected)
    dense = DenseAttention()
    assert dense.fractal is False
    assert torch.equal(dense(q, k, v), expected)


def test_auto_picks_per_device_and_logs_once(caplog, monkeypatch):
    monkeypatch.setattr(attention_module, "_announced", set())
    q = torch.zeros(1, BLOCK, 1, 8)
    with caplog.at_level(logging.INFO, logger="kandinsky5.models.attention"):
        assert resolve_backend("auto", q, block_sparse=True) == "cpu-sparse"
        assert resolve_backend("auto", q, block_sparse=True) == "cpu-sparse"
        assert resolve_backend("auto", q, block_sparse=False) == "sdpa"
    messages = [record.getMessage() for record in caplog.records]
    assert messages == ["block-sparse attention on cpu: using cpu-sparse", "dense attention on cpu: using sdpa"]


@pytest.mark.parametrize(
    "backend, block_sparse", [("flex", False), ("sdpa", True), ("flash-attn", False), ("nabla", True)]
)
def test_unknown_backend_is_rejected(backend, block_sparse):
    with pytest.raises(ValueError, match="backend"):
        resolve_backend(backend, torch.zeros(1), block_sparse)


@pytest.mark.parametrize("backend, package", [("flash", "flash_attn"), ("sage", "sageattention")])
def test_missing_optional_kernel_says_what_to_install(backend, package):
    if importlib.util.find_spec(package) is not None:
        pytest.skip(f"{package} is installed")
    with pytest.raises(ValueError, match="pip install"):
        DenseAttention(backend)(*random_qkv(1, 1, 1))


def test_block_mask_of_the_wrong_size_is_rejected():
    q, k, v = random_qkv(1, 3, 1)
    with pytest.raises(ValueError, match="block mask"):
        attention(q, k, v, block_mask=torch.ones(1, 1, 2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="block mask"):
        attention(q[:, :100], k[:, :100], v[:, :100], block_mask=torch.ones(1, 1, 1, 1, dtype=torch.bool))
