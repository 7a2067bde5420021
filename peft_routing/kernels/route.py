"""Route kernel: scores of a block of tokens against every routing vector, top-k and mixing weights, in one pass.

Each program takes BLOCK_T tokens, accumulates their [BLOCK_T, BLOCK_N] scores over d_in in BLOCK_D chunks
(BLOCK_N >= N, so N is limited to BLOCK_N <= 1024), then picks the k best by repeated argmax and writes the expert ids
and weights (softmax over the chosen scores / temperature, or sigmoid of each). For score_norm="standardize" the
launcher passes standardized tokens and vectors and scale = 1/sqrt(d).
"""

import triton
import triton.language as tl

from .dot import weight_dot


@triton.jit
def route_kernel(
    x_ptr, v_ptr, ids_ptr, w_ptr,
    num_tokens, num_experts, d_in,
    stride_xt, stride_vn,
    scale, inv_temperature,
    TOP_K: tl.constexpr, K_PAD: tl.constexpr, SIGMOID: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < num_tokens
    col_ok = cols < num_experts
    scores = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
    for d0 in range(0, d_in, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        d_ok = ds < d_in
        x = tl.load(x_ptr + rows[:, None] * stride_xt + ds[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        v = tl.load(v_ptr + cols[None, :] * stride_vn + ds[:, None], mask=col_ok[None, :] & d_ok[:, None], other=0.0)
        scores += weight_dot(x, v)
    scores = tl.where(col_ok[None, :], scores * scale, float("-inf"))

    slots = tl.arange(0, K_PAD)
    chosen_ids = tl.zeros([BLOCK_T, K_PAD], dtype=tl.int64)
    chosen = tl.full([BLOCK_T, K_PAD], float("-inf"), dtype=tl.float32)
    for i in tl.static_range(TOP_K):
        best = tl.max(scores, axis=1)
        arg = tl.minimum(tl.argmax(scores, axis=1), num_experts - 1)  # NaN scores must not pick a padding slot
        chosen_ids = tl.where(slots[None, :] == i, arg[:, None].to(tl.int64), chosen_ids)
        chosen = tl.where(slots[None, :] == i, best[:, None], chosen)
        scores = tl.where(cols[None, :] == arg[:, None], float("-inf"), scores)

    slot_ok = slots[None, :] < TOP_K
    if SIGMOID:
        weights = 1.0 / (1.0 + tl.exp(-chosen))
    else:
        top = tl.max(chosen, axis=1)
        e = tl.where(slot_ok, tl.exp((chosen - top[:, None]) * inv_temperature), 0.0)
        weights = e / tl.sum(e, axis=1)[:, None]
    out = rows[:, None] * TOP_K + slots[None, :]
    ok = row_ok[:, None] & slot_ok
    tl.store(ids_ptr + out, chosen_ids, mask=ok)
    tl.store(w_ptr + out, weights, mask=ok)
