"""Align kernels: sort the T*k (token, expert) pairs by expert, each expert's run padded to BLOCK_M rows.

As vLLM's moe_align_block_size: the output has the static bound T*k + N*(BLOCK_M - 1) rows, so its size is known
before the data is (CUDA-graph safe); padding rows hold the sentinel T*k (the launcher fills them). Three stages, so
that the work over the pairs runs in parallel (one program per CHUNK of pairs) and only a short scan is serial:
  count:   counts[c, e] = pairs of chunk c routed to expert e;
  offsets: per expert, an exclusive scan over chunks (where chunk c's pairs of e start within e's run), the padded
           run starts, and the expert of every BLOCK_M block (-1 past the end);
  place:   each pair goes to start[e] + offset[c, e] + (earlier pairs of e in its chunk); a stable sort.
"""

import triton
import triton.language as tl


@triton.jit
def align_count_kernel(expert_ids_ptr, counts_ptr, num_pairs, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr):
    chunk = tl.program_id(0)
    ps = chunk * CHUNK + tl.arange(0, CHUNK)
    e = tl.load(expert_ids_ptr + ps, mask=ps < num_pairs, other=-1).to(tl.int32)
    experts = tl.arange(0, BLOCK_N)
    counts = tl.sum((e[:, None] == experts[None, :]).to(tl.int32), axis=0)
    tl.store(counts_ptr + chunk * BLOCK_N + experts, counts)


@triton.jit
def align_offsets_kernel(
    counts_ptr, starts_ptr, block_expert_ptr,
    num_chunks, num_blocks,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr,
):
    experts = tl.arange(0, BLOCK_N)
    running = tl.zeros([BLOCK_N], dtype=tl.int32)
    for chunk in range(0, num_chunks):  # counts[c] becomes the exclusive prefix over chunks, in place
        row = counts_ptr + chunk * BLOCK_N + experts
        counts = tl.load(row)
        tl.store(row, running)
        running += counts
    padded = ((running + BLOCK_M - 1) // BLOCK_M) * BLOCK_M
    starts = tl.cumsum(padded, axis=0) - padded
    tl.store(starts_ptr + experts, starts)
    for b0 in range(0, num_blocks, CHUNK):
        bs = b0 + tl.arange(0, CHUNK)
        first_row = bs * BLOCK_M
        inside = (first_row[:, None] >= starts[None, :]) & (first_row[:, None] < (starts + padded)[None, :])
        owner = tl.sum(tl.where(inside, experts[None, :] + 1, 0), axis=1) - 1
        tl.store(block_expert_ptr + bs, owner, mask=bs < num_blocks)


@triton.jit
def align_place_kernel(
    expert_ids_ptr, offsets_ptr, starts_ptr, sorted_ptr, num_pairs,
    BLOCK_N: tl.constexpr, CHUNK: tl.constexpr,
):
    chunk = tl.program_id(0)
    local = tl.arange(0, CHUNK)
    ps = chunk * CHUNK + local
    ok = ps < num_pairs
    e = tl.load(expert_ids_ptr + ps, mask=ok, other=0).to(tl.int32)
    earlier_same = (e[:, None] == e[None, :]) & (local[None, :] < local[:, None]) & ok[None, :]
    rank = tl.sum(earlier_same.to(tl.int32), axis=1)
    base = tl.load(starts_ptr + e, mask=ok, other=0) + tl.load(offsets_ptr + chunk * BLOCK_N + e, mask=ok, other=0)
    tl.store(sorted_ptr + base + rank, ps.to(tl.int64), mask=ok)
