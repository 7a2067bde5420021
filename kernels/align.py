"""Align kernel: sort the T*k (token, expert) pairs by expert, each expert's run padded to BLOCK_M rows.

As vLLM's moe_align_block_size: the output has the static bound T*k + N*(BLOCK_M - 1) rows, so its size is known
before the data is (CUDA-graph safe). Padding rows hold the sentinel T*k. One program walks the pairs in chunks:
a chunk's per-expert ranks come from a [CHUNK, CHUNK] comparison, running per-expert cursors carry across chunks.
Outputs: sorted pair ids, the expert of every BLOCK_M block (-1 past the end) and the number of used rows.
"""

import triton
import triton.language as tl


@triton.jit
def align_kernel(
    expert_ids_ptr, sorted_ptr, block_expert_ptr, used_rows_ptr,
    num_pairs, num_experts, max_rows,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr,
):
    experts = tl.arange(0, BLOCK_N)
    counts = tl.zeros([BLOCK_N], dtype=tl.int32)
    for p0 in range(0, num_pairs, CHUNK):
        ps = p0 + tl.arange(0, CHUNK)
        e = tl.load(expert_ids_ptr + ps, mask=ps < num_pairs, other=-1).to(tl.int32)
        counts += tl.sum((e[:, None] == experts[None, :]).to(tl.int32), axis=0)
    padded = ((counts + BLOCK_M - 1) // BLOCK_M) * BLOCK_M
    starts = tl.cumsum(padded, axis=0) - padded
    used = tl.sum(padded, axis=0)
    tl.store(used_rows_ptr, used)

    # every row starts as padding; then each pair goes to start[e] + (earlier pairs of e)
    for r0 in range(0, max_rows, CHUNK):
        rs = r0 + tl.arange(0, CHUNK)
        tl.store(sorted_ptr + rs, tl.zeros([CHUNK], dtype=tl.int64) + num_pairs, mask=rs < max_rows)
    cursor = tl.zeros([BLOCK_N], dtype=tl.int32)
    local = tl.arange(0, CHUNK)
    for p0 in range(0, num_pairs, CHUNK):
        ps = p0 + local
        ok = ps < num_pairs
        e = tl.load(expert_ids_ptr + ps, mask=ok, other=-1).to(tl.int32)
        same = (e[:, None] == e[None, :]) & (local[None, :] < local[:, None])
        rank = tl.sum(same.to(tl.int32), axis=1)
        onehot = (e[:, None] == experts[None, :]).to(tl.int32)
        base = tl.sum(onehot * (starts + cursor)[None, :], axis=1)
        tl.store(sorted_ptr + base + rank, ps.to(tl.int64), mask=ok)
        cursor += tl.sum(onehot, axis=0)

    num_blocks = max_rows // BLOCK_M
    for b0 in range(0, num_blocks, CHUNK):
        bs = b0 + tl.arange(0, CHUNK)
        row = bs * BLOCK_M
        inside = (row[:, None] >= starts[None, :]) & (row[:, None] < (starts + padded)[None, :])
        owner = tl.sum(tl.where(inside, experts[None, :] + 1, 0), axis=1) - 1
        tl.store(block_expert_ptr + bs, owner, mask=bs < num_blocks)
