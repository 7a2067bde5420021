"""Dense small-N variant: no sorting. Two kernels:
  gated_shrink: h[t, j*r + c] = (x[t] . A_j[c]) * g[t, j], with g the routing weight times s_j (0 if j not chosen);
  dense_expand: out[t] += h[t] @ [B_1 .. B_N]  (a plain tiled matmul-accumulate over the N*r columns).
Worth it while N*r is small, since every expert's shrink is computed for every token.
"""

import triton
import triton.language as tl

from .dot import weight_dot


@triton.jit
def gated_shrink_kernel(
    x_ptr, a_ptr, gates_ptr, h_ptr,
    num_tokens, d_in, columns, r_max, num_experts,
    stride_xt,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok = rows < num_tokens
    col_ok = cols < columns
    acc = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
    for d0 in range(0, d_in, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        d_ok = ds < d_in
        x = tl.load(x_ptr + rows[:, None] * stride_xt + ds[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        a = tl.load(a_ptr + cols[None, :] * d_in + ds[:, None], mask=col_ok[None, :] & d_ok[:, None], other=0.0)
        acc += weight_dot(x, a)
    experts = cols // r_max
    g = tl.load(gates_ptr + rows[:, None] * num_experts + experts[None, :], mask=row_ok[:, None] & col_ok[None, :],
                other=0.0)
    tl.store(h_ptr + rows[:, None] * columns + cols[None, :], acc * g, mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def dense_expand_kernel(
    h_ptr, b_ptr, out_ptr,
    num_tokens, columns, d_out,
    stride_ot,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    outs = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < num_tokens
    out_ok = outs < d_out
    acc = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
    for c0 in range(0, columns, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        c_ok = cs < columns
        h = tl.load(h_ptr + rows[:, None] * columns + cs[None, :], mask=row_ok[:, None] & c_ok[None, :], other=0.0)
        b = tl.load(b_ptr + cs[:, None] * d_out + outs[None, :], mask=c_ok[:, None] & out_ok[None, :], other=0.0)
        acc += weight_dot(h, b)
    pointers = out_ptr + rows[:, None] * stride_ot + outs[None, :]
    ok = row_ok[:, None] & out_ok[None, :]
    previous = tl.load(pointers, mask=ok, other=0.0)
    tl.store(pointers, (previous.to(tl.float32) + acc).to(out_ptr.dtype.element_ty), mask=ok)
