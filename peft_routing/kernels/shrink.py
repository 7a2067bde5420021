"""Shrink kernel: for each BLOCK_M block of expert-sorted pairs, h = (x[token] @ A_e^T) * w * s_e.

The routing weight and the expert's LoRA scaling are folded in here, so expand only has to add. Rows holding the
padding sentinel and blocks past the used rows are skipped.
"""

import triton
import triton.language as tl

from .dot import weight_dot
from .sorted_blocks import load_block


@triton.jit
def shrink_kernel(
    x_ptr, a_ptr, sorted_ptr, block_expert_ptr, weights_ptr, scales_ptr, h_ptr,
    num_pairs, d_in, r_max, top_k,
    stride_xt, stride_ae, stride_ar,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    block = tl.program_id(0)
    expert, rows, pairs, valid, tokens = load_block(block, sorted_ptr, block_expert_ptr, num_pairs, top_k, BLOCK_M)
    if expert < 0:
        return
    ranks = tl.arange(0, BLOCK_R)
    acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    for d0 in range(0, d_in, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        d_ok = ds < d_in
        x = tl.load(x_ptr + tokens[:, None] * stride_xt + ds[None, :], mask=valid[:, None] & d_ok[None, :], other=0.0)
        a = tl.load(a_ptr + expert * stride_ae + ranks[None, :] * stride_ar + ds[:, None],
                    mask=(ranks[None, :] < r_max) & d_ok[:, None], other=0.0)
        acc += weight_dot(x, a)
    gate = tl.load(weights_ptr + tl.where(valid, pairs, 0), mask=valid, other=0.0) * tl.load(scales_ptr + expert)
    acc = acc * gate[:, None]
    tl.store(h_ptr + rows[:, None] * r_max + ranks[None, :], acc, mask=(ranks[None, :] < r_max))
