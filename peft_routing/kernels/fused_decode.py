"""Fused decode kernel: scores, top-k and the chosen experts' LoRA of one token, in one launch.

For decode and small batches the route phase's cost on a GPU is launches, not arithmetic: route -> shrink -> expand
is three kernels (five with sorting) for a handful of tokens. Here program (t, s) scores token t against every
routing vector, picks its k experts and their mixing weights, computes h_i = (x A_i^T) * w_i * s_i for each, and adds
sum_i h_i B_i into its own share s of token t's output columns. Every column is written by one program, so there are
no atomics, and a token's experts are applied together. The price: the programs of one token each redo the scores
and the shrink (N*d + k*r*d multiply-adds: about 0.4 M at N = 64, d = 4096), which is why the launcher keeps the
column split small and sends larger batches to the sorted path.
"""

import triton
import triton.language as tl


@triton.jit
def _scores(xr_ptr, v_ptr, token, num_experts, d_route, stride_xrt, stride_vn, scale,
            BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr):
    """scale * (x . v_e) for every expert e, -inf past the last one ([BLOCK_E], fp32)."""
    experts = tl.arange(0, BLOCK_E)
    e_ok = experts < num_experts
    scores = tl.zeros([BLOCK_E], dtype=tl.float32)
    for d0 in range(0, d_route, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        d_ok = ds < d_route
        x = tl.load(xr_ptr + token * stride_xrt + ds, mask=d_ok, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + experts[:, None] * stride_vn + ds[None, :], mask=e_ok[:, None] & d_ok[None, :],
                    other=0.0).to(tl.float32)
        scores += tl.sum(v * x[None, :], axis=1)
    return tl.where(e_ok, scores * scale, float("-inf"))


@triton.jit
def _slot(values, slots, i):
    """values[i] of a [K_PAD] vector indexed by ``slots`` (a scalar)."""
    return tl.sum(tl.where(slots == i, values, 0), axis=0)


@triton.jit
def _slot_row(tile, slots, i):
    """Row i of a [K_PAD, X] tile indexed by ``slots`` ([X])."""
    return tl.sum(tl.where(slots[:, None] == i, tile, 0.0), axis=0)


@triton.jit
def fused_decode_kernel(
    x_ptr, xr_ptr, v_ptr, a_ptr, b_ptr, scales_ptr, out_ptr, ids_ptr, w_ptr,
    num_experts, d_in, d_route, d_out, r_max, cols_per_program,
    stride_xt, stride_xrt, stride_vn, stride_ae, stride_ar, stride_be, stride_br, stride_ot,
    scale, inv_temperature,
    TOP_K: tl.constexpr, K_PAD: tl.constexpr, SIGMOID: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    token = tl.program_id(0)
    share = tl.program_id(1)
    scores = _scores(xr_ptr, v_ptr, token, num_experts, d_route, stride_xrt, stride_vn, scale, BLOCK_E, BLOCK_DV)

    # top-k by repeated argmax, then the mixing weights over the chosen scores
    experts = tl.arange(0, BLOCK_E)
    slots = tl.arange(0, K_PAD)
    chosen_ids = tl.zeros([K_PAD], dtype=tl.int32)
    chosen = tl.full([K_PAD], float("-inf"), dtype=tl.float32)
    for i in tl.static_range(TOP_K):
        best = tl.max(scores, axis=0)
        arg = tl.minimum(tl.argmax(scores, axis=0), num_experts - 1)  # NaN scores must not pick a padding slot
        chosen_ids = tl.where(slots == i, arg, chosen_ids)
        chosen = tl.where(slots == i, best, chosen)
        scores = tl.where(experts == arg, float("-inf"), scores)
    slot_ok = slots < TOP_K
    if SIGMOID:
        weights = 1.0 / (1.0 + tl.exp(-chosen))
    else:
        e = tl.where(slot_ok, tl.exp((chosen - tl.max(chosen, axis=0)) * inv_temperature), 0.0)
        weights = e / tl.sum(e, axis=0)
    if share == 0:
        tl.store(ids_ptr + token * TOP_K + slots, chosen_ids.to(tl.int64), mask=slot_ok)
        tl.store(w_ptr + token * TOP_K + slots, weights, mask=slot_ok)

    # shrink: h[i] = (x . A_{e_i}[c]) * w_i * s_{e_i}, every chosen expert's ranks in one [K_PAD, BLOCK_R] tile
    ranks = tl.arange(0, BLOCK_R)
    r_ok = ranks < r_max
    gates = weights * tl.load(scales_ptr + chosen_ids, mask=slot_ok, other=0.0).to(tl.float32)
    h = tl.zeros([K_PAD, BLOCK_R], dtype=tl.float32)
    for d0 in range(0, d_in, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        d_ok = ds < d_in
        x = tl.load(x_ptr + token * stride_xt + ds, mask=d_ok, other=0.0).to(tl.float32)
        for i in tl.static_range(TOP_K):
            expert = _slot(chosen_ids, slots, i)
            a = tl.load(a_ptr + expert * stride_ae + ranks[:, None] * stride_ar + ds[None, :],
                        mask=r_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
            h += tl.where(slots[:, None] == i, tl.sum(a * x[None, :], axis=1)[None, :], 0.0)
    h = h * gates[:, None]

    # expand: this program's output columns get sum_i h[i] B_{e_i}, added once (no atomics)
    first = share * cols_per_program
    last = tl.minimum(first + cols_per_program, d_out)
    for n0 in range(first, last, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < last
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for i in tl.static_range(TOP_K):
            expert = _slot(chosen_ids, slots, i)
            h_i = _slot_row(h, slots, i)
            b = tl.load(b_ptr + expert * stride_be + ranks[:, None] * stride_br + cols[None, :],
                        mask=r_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(h_i[:, None] * b, axis=0)
        pointers = out_ptr + token * stride_ot + cols
        previous = tl.load(pointers, mask=col_ok, other=0.0).to(tl.float32)
        tl.store(pointers, (previous + acc).to(out_ptr.dtype.element_ty), mask=col_ok)
