"""Expand kernel: out[token] += h @ B_e for each BLOCK_M block of expert-sorted pairs (atomic add: with k > 1 several
pairs of one token land in the same output row). The rank dimension is never split (vLLM's rule for expand)."""

import triton
import triton.language as tl

from .dot import weight_dot
from .sorted_blocks import load_block


@triton.jit
def expand_kernel(
    h_ptr, b_ptr, sorted_ptr, block_expert_ptr, out_ptr,
    num_pairs, d_out, r_max, top_k,
    stride_be, stride_br, stride_ot,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    block = tl.program_id(0)
    col_block = tl.program_id(1)
    expert, rows, pairs, valid, tokens = load_block(block, sorted_ptr, block_expert_ptr, num_pairs, top_k, BLOCK_M)
    if expert < 0:
        return
    ranks = tl.arange(0, BLOCK_R)
    cols = col_block * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < d_out
    h = tl.load(h_ptr + rows[:, None] * r_max + ranks[None, :], mask=valid[:, None] & (ranks[None, :] < r_max),
                other=0.0)
    b = tl.load(b_ptr + expert * stride_be + ranks[:, None] * stride_br + cols[None, :],
                mask=(ranks[:, None] < r_max) & col_ok[None, :], other=0.0)
    y = weight_dot(h, b)
    tl.atomic_add(out_ptr + tokens[:, None] * stride_ot + cols[None, :], y.to(out_ptr.dtype.element_ty),
                  mask=valid[:, None] & col_ok[None, :])
