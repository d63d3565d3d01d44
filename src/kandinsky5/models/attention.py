"""The attention kernels behind every attention layer.

Layers hand over (B, S, heads, D) tensors and get (B, S, heads·D) back. Dense attention is
PyTorch's SDPA; sparse visual self-attention (NABLA) plugs in as a ``VisualAttention`` object that
the DiT receives per forward call, so the layers never know which kernel runs.

``attention()`` is the one place a kernel is chosen. Without a block mask it runs dense attention:

    "sdpa"   PyTorch's scaled_dot_product_attention (every device; the default)
    "flash"  the flash-attn package (CUDA, fp16/bf16; optional, used only when importable)
    "sage"   SageAttention (CUDA; optional, INT8 QK so not exact; never picked by "auto")

With a block mask — (B | 1, heads | 1, N, N) bool over 64-token blocks, True = attend — it runs
block-sparse attention:

    "flex"          compiled flex_attention with a BlockMask of 64-token blocks (CUDA)
    "cpu-sparse"    gathers each query block's kept key/value blocks and runs SDPA on them
    "masked-dense"  SDPA with the block mask expanded to tokens: the O(S²) reference

"auto" takes flex on CUDA, cpu-sparse elsewhere; flash-attn for dense on CUDA when installed, SDPA
otherwise. Eager (uncompiled) flex_attention is never used: on CPU it ignores a block-only mask and
silently computes dense attention (docs/kandinsky5.md §13).
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Protocol

import torch
import torch.nn.functional as F

__all__ = [
    "BLOCK",
    "BLOCK_SPARSE_BACKENDS",
    "DENSE_BACKENDS",
    "DenseAttention",
    "VisualAttention",
    "attention",
    "block_sparse_attention",
    "dense_attention",
    "resolve_backend",
    "token_mask",
]

logger = logging.getLogger(__name__)

BLOCK = 64  # tokens per block of a block mask: one 8×8 tile of one frame in fractal order
DENSE_BACKENDS = ("sdpa", "flash", "sage")
BLOCK_SPARSE_BACKENDS = ("flex", "cpu-sparse", "masked-dense")

# cpu-sparse gathers each chunk's key/value blocks into a buffer of this size. On one thread, 1 MiB
# holds the keys and values of one query block that keeps ~30 blocks (64 tokens × 64 dims, fp32), so
# the gather and SDPA's passes over it stay in the core's L2 cache (~15 % faster at 16k tokens than
# 8 MiB). On several threads, 8 MiB per thread: memory stays bounded (gathering every kept block at
# once would take GBs at 32k tokens) while each chunk, one parallel region, gives SDPA several rows
# per thread; fewer regions matter most on a busy machine.
CHUNK_BYTES_ONE_THREAD = 1 << 20
CHUNK_BYTES_PER_THREAD = 8 << 20


# ------------------------------------------------------------------------------------ dense


def dense_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Non-causal softmax attention with scale 1/sqrt(D).

    Args:
        q: (B, Sq, heads, D); k, v: (B, Sk, heads, D).
        key_mask: optional (B, Sk) bool, True = attend (text padding mask).
    Returns:
        (B, Sq, heads·D).
    """
    mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, 1, 1, Sk)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask
    )  # (B, heads, Sq, D)
    return out.transpose(1, 2).flatten(2)


# Optional third-party dense kernels: imported on first use, never required, untested here (no GPU).
def _flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    from flash_attn import flash_attn_func  # optional dependency

    return flash_attn_func(q, k, v).flatten(2)  # takes and returns (B, S, heads, D)


def _sage_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    from sageattention import sageattn  # optional dependency

    return sageattn(q, k, v, tensor_layout="NHD", is_causal=False).flatten(2)


# ------------------------------------------------------------------------------ block-sparse


def token_mask(block_mask: torch.Tensor) -> torch.Tensor:
    """(..., N, N) block mask → (..., N·64, N·64) token mask (each block a 64×64 square)."""
    return block_mask.repeat_interleave(BLOCK, dim=-2).repeat_interleave(BLOCK, dim=-1)


def _masked_dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: torch.Tensor) -> torch.Tensor:
    """Reference: dense SDPA with the expanded mask, one head at a time (S² bools per head)."""
    batch, _, heads, _ = q.shape
    mask = block_mask.expand(batch, heads, -1, -1)
    outs = []
    for h in range(heads):
        out = F.scaled_dot_product_attention(
            q[:, :, h].unsqueeze(1),
            k[:, :, h].unsqueeze(1),
            v[:, :, h].unsqueeze(1),
            attn_mask=token_mask(mask[:, h : h + 1]),
        )  # (B, 1, S, D)
        outs.append(out)
    return torch.cat(outs, dim=1).transpose(1, 2).flatten(2)


def _chunks(sizes: list[int], first: int, capacity: int) -> list[tuple[int, int]]:
    """Cut rows ``first:`` of ascending kept-block counts ``sizes`` into [start, end) ranges whose
    padded gather, (end − start) · sizes[end − 1] blocks, fits ``capacity`` (≥ the largest size).

    A range ends where the count changes when that keeps at least half of it: equal counts need no
    padding mask.
    """
    bounds = []
    while first < len(sizes):
        last = first + 1
        while last < len(sizes) and (last + 1 - first) * sizes[last] <= capacity:
            last += 1
        cut = last
        while cut - 1 > first and sizes[cut - 1] == sizes[last - 1]:
            cut -= 1
        if sizes[cut - 1] != sizes[last - 1] and 2 * (cut - first) >= last - first:
            last = cut
        bounds.append((first, last))
        first = last
    return bounds


def _sorted_rows(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each group's query blocks sorted by their number of kept key blocks, and those key blocks.

    Args:
        mask: (G, N, N) bool; row i of group g is query block i, True = attend key block j.
    Returns:
        counts: (G, N) kept-block counts, ascending within each group.
        order: (G, N) the query block of each sorted row.
        table: (G, N, longest) the kept key blocks of each sorted row in ascending order, padded at
            the end with arbitrary blocks of the same group (``counts`` says how many are real).
    """
    groups, n, _ = mask.shape
    counts = mask.sum(-1)  # (G, N)
    counts_sorted, order = counts.sort(dim=-1, stable=True)
    key_blocks = mask.reshape(groups * n, n).nonzero()[:, 1]  # (nnz,): kept key blocks, row-major
    flat = counts.reshape(-1)
    starts = (flat.cumsum(0) - flat).view(groups, n).gather(1, order)  # (G, N): first entry per sorted row
    slots = torch.arange(int(counts_sorted[:, -1].max()), device=mask.device)
    table = key_blocks[(starts[..., None] + slots).clamp(max=key_blocks.numel() - 1)]  # (G, N, longest)
    return counts_sorted, order, table


def _sparse_all_rows(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: torch.Tensor, chunk_bytes: int
) -> torch.Tensor:
    """cpu-sparse over all (head, batch, query block) rows at once: few, large chunks, for several
    threads. Rows are sorted by their number of kept key blocks across all heads and batch entries,
    so a chunk spans groups; keys and values are re-laid out block-major once, queries are gathered
    and outputs scattered per chunk. Extra memory: three tensors of q's size plus the buffer."""
    batch, seq, heads, dim = q.shape
    n = seq // BLOCK
    rows = heads * batch * n  # row (h·B + b)·N + i: head h, batch b, query block i
    # Keys and values side by side as (2, rows, 64, D): one gather then fetches both.
    kv = q.new_empty(2, heads, batch, n, BLOCK, dim)
    kv[0].copy_(k.reshape(batch, n, BLOCK, heads, dim).permute(3, 0, 1, 2, 4))
    kv[1].copy_(v.reshape(batch, n, BLOCK, heads, dim).permute(3, 0, 1, 2, 4))
    kv = kv.view(2, rows, BLOCK, dim)

    mask = block_mask.expand(batch, heads, n, n).transpose(0, 1).reshape(rows, n)  # (rows, N)
    counts = mask.sum(-1)  # (rows,)
    kept = mask.nonzero()  # (nnz, 2): (row, key block), row-major
    kv_ids = kept[:, 1] + kept[:, 0].div(n, rounding_mode="floor") * n  # rows of kv, grouped by row
    starts = counts.cumsum(0) - counts  # each row's first entry in kv_ids
    counts_sorted, order = counts.sort(stable=True)
    sizes = counts_sorted.tolist()
    empty, longest = sizes.count(0), sizes[-1]
    # Row i of ``table`` lists the kept key blocks of the i-th sorted row, padded at the end with
    # some block that ``valid`` masks out.
    slots = torch.arange(longest, device=q.device)
    table = kv_ids[(starts[order, None] + slots).clamp(0, max(kv_ids.numel() - 1, 0))]  # (rows, longest)
    valid = slots < counts_sorted[:, None]  # (rows, longest)

    # Queries are read and outputs written in place, (B, N, 64, heads, D) views, row by sorted row.
    q_blocks = q.reshape(batch, n, BLOCK, heads, dim)
    out = q.new_empty(batch, seq, heads, dim)
    out_blocks = out.view(batch, n, BLOCK, heads, dim)
    head_of, batch_of, block_of = order // (batch * n), order // n % batch, order % n  # (rows,) each
    queries = q_blocks[batch_of, block_of, :, head_of].unsqueeze(1)  # (rows, 1, 64, D), sorted

    block_bytes = 2 * BLOCK * dim * q.element_size()  # one key block + one value block
    capacity = max(chunk_bytes // block_bytes, longest, 1)  # blocks per gather buffer; ≥ one row
    buffer = q.new_empty(2 * capacity * BLOCK * dim)
    out_blocks[batch_of[:empty], block_of[:empty], :, head_of[:empty]] = 0  # rows that keep nothing
    for first, last in _chunks(sizes, empty, capacity):
        width, m = sizes[last - 1], last - first  # the chunk's longest row sets the padding
        ids = table[first:last, :width].reshape(-1)  # (m·width,)
        # Keys and values in one gather along dim 1: a single-threaded copy, as fast as two dim-0
        # gathers on one core and one thread barrier fewer per chunk (barriers cost the most on a
        # busy machine: this halved the time at two threads there).
        gathered = torch.index_select(kv, 1, ids, out=buffer[: 2 * m * width * BLOCK * dim].view(2, -1, BLOCK, dim))
        keys, values = gathered.view(2, m, 1, width * BLOCK, dim)
        pad_mask = None
        if sizes[first] != width:
            pad_mask = valid[first:last, :width, None].expand(m, width, BLOCK).reshape(m, 1, 1, width * BLOCK)
        result = F.scaled_dot_product_attention(queries[first:last], keys, values, attn_mask=pad_mask)
        out_blocks[batch_of[first:last], block_of[first:last], :, head_of[first:last]] = result.squeeze(1)
    return out.view(batch, seq, heads * dim)


def _sparse_by_group(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: torch.Tensor, chunk_bytes: int
) -> torch.Tensor:
    """cpu-sparse one (batch, head) group at a time, for one thread: small, cache-sized chunks.

    A group's keys and values are copied once into a block-major buffer, its rows are sorted by
    their number of kept key blocks and cut into chunks; queries are read and outputs written in
    place. With the default 1 MiB a chunk is one row, whose keys and values SDPA then reads from L2
    at about the efficiency of dense attention. Extra memory: one group's keys and values plus the
    buffer. Every chunk is a parallel region, hence not for several threads on a busy machine.
    """
    batch, seq, heads, dim = q.shape
    n = seq // BLOCK
    mask = block_mask.expand(batch, heads, n, n).reshape(batch * heads, n, n)  # group g = b·heads + h
    counts, order, table = _sorted_rows(mask)
    sizes, query_blocks = counts.tolist(), order.tolist()
    valid = torch.arange(table.shape[-1], device=q.device) < counts[..., None]  # (G, N, longest)

    out = q.new_empty(batch, seq, heads, dim)
    kv = q.new_empty(2, n, BLOCK, dim)  # one group's keys and values, block-major
    capacity = max(chunk_bytes // (2 * BLOCK * dim * q.element_size()), table.shape[-1])  # blocks
    buffer = q.new_empty(2, capacity, BLOCK, dim)
    for g in range(batch * heads):
        b, h = divmod(g, heads)
        kv[0].copy_(k[b, :, h].view(n, BLOCK, dim))
        kv[1].copy_(v[b, :, h].view(n, BLOCK, dim))
        q_blocks = q[b, :, h].view(n, 1, BLOCK, dim)  # views into q and out: (N, 1, 64, D)
        out_blocks = out[b, :, h].view(n, 1, BLOCK, dim)
        empty = sizes[g].count(0)
        if empty:  # rows that keep nothing
            out_blocks[order[g, :empty]] = 0
        for first, last in _chunks(sizes[g], empty, capacity):
            width, m = sizes[g][last - 1], last - first  # the chunk's longest row sets the padding
            gathered = torch.index_select(kv, 1, table[g, first:last, :width].reshape(-1), out=buffer[:, : m * width])
            keys, values = gathered.view(2, m, 1, width * BLOCK, dim)
            if m == 1:  # one row: plain views, no index tensors
                i = query_blocks[g][first]
                out_blocks[i].copy_(F.scaled_dot_product_attention(q_blocks[i, None], keys, values)[0])
                continue
            pad_mask = None
            if sizes[g][first] != width:
                pad_mask = valid[g, first:last, :width, None].expand(m, width, BLOCK).reshape(m, 1, 1, width * BLOCK)
            rows = order[g, first:last]
            result = F.scaled_dot_product_attention(q_blocks[rows], keys, values, attn_mask=pad_mask)
            out_blocks.index_copy_(0, rows, result)
    return out.view(batch, seq, heads * dim)


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: torch.Tensor,
    chunk_bytes: int | None = None,
) -> torch.Tensor:
    """Block-sparse attention that computes only the kept blocks (the cpu-sparse backend).

    Every (head, batch, query block) is a row. Rows are sorted by their number of kept key blocks
    and cut into chunks whose gathered keys and values fit ``chunk_bytes``; a chunk gathers each
    row's kept key/value blocks, padded to the chunk's longest row, and runs SDPA with a padding
    mask (none when all counts are equal, the usual case after sorting). A row that keeps no block
    gets zeros (NABLA rows always keep their own block).

    On one intra-op thread the rows are taken one (batch, head) group at a time in chunks of
    ``CHUNK_BYTES_ONE_THREAD`` (``_sparse_by_group``); on several, all rows are sorted together and
    cut into chunks of ``CHUNK_BYTES_PER_THREAD`` per thread (``_sparse_all_rows``), because each
    chunk is a parallel region and on a busy machine every region waits for a descheduled thread.

    Args:
        q, k, v: (B, S, heads, D), S a multiple of 64.
        block_mask: (B | 1, heads | 1, N, N) bool, N = S / 64, True = attend.
        chunk_bytes: size of the key + value gather buffer; default as above.
    Returns:
        (B, S, heads·D).
    """
    threads = torch.get_num_threads()
    if threads == 1:
        return _sparse_by_group(q, k, v, block_mask, chunk_bytes or CHUNK_BYTES_ONE_THREAD)
    return _sparse_all_rows(q, k, v, block_mask, chunk_bytes or CHUNK_BYTES_PER_THREAD * threads)


_compiled_flex = None


def _flex_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: torch.Tensor) -> torch.Tensor:
    """Compiled flex_attention with every kept block a "full" block (no in-block masking), §4.4."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    if _compiled_flex is None:  # compiled lazily, on first use, never on import
        _compiled_flex = torch.compile(flex_attention, dynamic=True)
    batch, seq, heads, _ = q.shape
    mask = block_mask.expand(batch, heads, -1, -1)
    counts = mask.sum(-1, dtype=torch.int32)  # (B, heads, N)
    kept_first = mask.to(torch.int8).argsort(dim=-1, descending=True, stable=True).to(torch.int32)
    flex_mask = BlockMask.from_kv_blocks(
        kv_num_blocks=torch.zeros_like(counts),  # no partial blocks
        kv_indices=kept_first.clone(),  # torch 2.13: one tensor for both index sets fails to compile
        full_kv_num_blocks=counts,
        full_kv_indices=kept_first,
        BLOCK_SIZE=BLOCK,
        mask_mod=None,
        seq_lengths=(seq, seq),
    )
    out = _compiled_flex(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=flex_mask)
    return out.transpose(1, 2).flatten(2)  # (B, heads, S, D) → (B, S, heads·D)


# ------------------------------------------------------------------------------ dispatch

_announced: set[tuple[str, str, str]] = set()
_OPTIONAL_PACKAGES = {"flash": ("flash_attn", "flash-attn"), "sage": ("sageattention", "sageattention")}


def resolve_backend(backend: str, q: torch.Tensor, block_sparse: bool) -> str:
    """The kernel ``attention()`` runs for queries ``q``: ``backend`` itself, or for "auto" the best
    available on q's device and dtype (logged once per choice)."""
    allowed = BLOCK_SPARSE_BACKENDS if block_sparse else DENSE_BACKENDS
    kind = "block-sparse" if block_sparse else "dense"
    if backend != "auto":
        if backend not in allowed:
            raise ValueError(f"unknown {kind} attention backend {backend!r}; use 'auto' or one of {allowed}")
        package = _OPTIONAL_PACKAGES.get(backend)
        if package and importlib.util.find_spec(package[0]) is None:
            raise ValueError(f"attention backend {backend!r} needs `pip install {package[1]}`; or use 'sdpa'")
        return backend
    on_cuda = q.device.type == "cuda"
    if block_sparse:
        chosen = "flex" if on_cuda else "cpu-sparse"
    else:
        half = q.dtype in (torch.float16, torch.bfloat16)
        chosen = "flash" if on_cuda and half and importlib.util.find_spec("flash_attn") else "sdpa"
    if (kind, q.device.type, chosen) not in _announced:
        _announced.add((kind, q.device.type, chosen))
        logger.info("%s attention on %s: using %s", kind, q.device.type, chosen)
    return chosen


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Softmax attention (scale 1/sqrt(D)), dense or block-sparse, by the chosen backend.

    Args:
        q, k, v: (B, S, heads, D).
        block_mask: None for dense attention, or (B | 1, heads | 1, N, N) bool over 64-token
            blocks (N = S / 64), True = the query block attends the key block.
        backend: "auto" or a name from ``DENSE_BACKENDS`` / ``BLOCK_SPARSE_BACKENDS``.
    Returns:
        (B, S, heads·D).
    """
    name = resolve_backend(backend, q, block_sparse=block_mask is not None)
    if block_mask is None:
        if name == "flash":
            return _flash_attention(q, k, v)
        if name == "sage":
            return _sage_attention(q, k, v)
        return dense_attention(q, k, v)
    seq = q.shape[1]
    if seq % BLOCK or block_mask.shape[-2:] != (seq // BLOCK, seq // BLOCK):
        raise ValueError(
            f"a block mask over {BLOCK}-token blocks needs S divisible by {BLOCK} and shape "
            f"(..., S/{BLOCK}, S/{BLOCK}); got S={seq} and mask {tuple(block_mask.shape)}"
        )
    if name == "flex":
        return _flex_attention(q, k, v, block_mask)
    if name == "cpu-sparse":
        return block_sparse_attention(q, k, v, block_mask)
    return _masked_dense(q, k, v, block_mask)


# ------------------------------------------------------------------------------ the seam


class VisualAttention(Protocol):
    """A replacement for dense visual self-attention (the seam NABLA uses).

    ``fractal`` asks the DiT to order visual tokens in 8×8-token tiles per frame (64-token blocks)
    before the visual blocks and to restore raster order after them.
    """

    fractal: bool

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """(B, S, heads, D) ×3 → (B, S, heads·D), tokens in the order the DiT passes them."""
        ...


class DenseAttention:
    """Dense visual self-attention through a chosen kernel ("auto", "sdpa", "flash", "sage")."""

    fractal = False

    def __init__(self, backend: str = "auto"):
        if backend != "auto" and backend not in DENSE_BACKENDS:
            raise ValueError(f"unknown dense attention backend {backend!r}; use 'auto' or one of {DENSE_BACKENDS}")
        self.backend = backend

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return attention(q, k, v, backend=self.backend)
