"""What a program of the sorted path (shrink, expand) knows about its BLOCK_M block of expert-sorted pairs."""

import triton
import triton.language as tl


@triton.jit
def load_block(block, sorted_ptr, block_expert_ptr, num_pairs, top_k, BLOCK_M: tl.constexpr):
    """(expert or -1 past the end, row offsets, pair ids, which rows are real pairs, token of each row)."""
    expert = tl.load(block_expert_ptr + block)
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(sorted_ptr + rows)
    valid = pairs < num_pairs
    tokens = tl.where(valid, pairs // top_k, 0)
    return expert, rows, pairs, valid, tokens
