"""Python launchers for the routed-LoRA Triton kernels, and the custom op ``peft_routing::triton_routed_lora_``.

Up to ``FUSED_MAX_TOKENS`` tokens (decode, small batches) one fused kernel scores, selects and applies the experts;
above, route -> (dense: gated_shrink -> dense_expand) or (align -> shrink -> expand), accumulating into ``out``. Plain
tensors in: the caller passes the tokens and routing vectors to score (already standardised for PHATGOOSE scores)
apart from the tokens the LoRA multiplies. Tile sizes are fixed per token count (``tiles_for``; the CPU interpreter
cannot autotune), chosen with benchmarks/kernel_profile.py (benchmarks/RESULTS.md). Import this module only after
deciding on TRITON_INTERPRET, which Triton reads at import time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from .align import align_count_kernel, align_offsets_kernel, align_place_kernel
from .dense import dense_expand_kernel, gated_shrink_kernel
from .expand import expand_kernel
from .fused_decode import fused_decode_kernel
from .route import route_kernel
from .shrink import shrink_kernel

MAX_EXPERTS = 1024  # the route kernel holds all N scores of a token block at once
MAX_TOP_K = 8
MAX_RANK = 128
ROUTE_BLOCK_T = 16  # tokens per route program: many programs, since one holds [ROUTE_BLOCK_T, N] scores
ROUTE_BLOCK_D = 64  # d_in per step of the route kernel
CHUNK = 64  # pairs per program of the align kernels
FUSED_MAX_TOKENS = 16  # up to this many tokens per layer call, one fused launch (decode, small batches)
FUSED_PROGRAMS = 64  # programs per fused launch, about: each redoes its token's scores and shrink (not GPU-tuned)
FUSED_BLOCK_N = 64  # output columns per step of the fused kernel


@dataclass(frozen=True)
class Tiles:
    """Tile sizes of the LoRA kernels (fixed, not autotuned: the CPU interpreter cannot autotune)."""

    m: int  # rows per expert block of the sorted path (align pads each expert's run to a multiple of it)
    t: int  # tokens per program of the dense path
    d: int  # d_in per step of the shrink kernels
    n: int  # output columns per program of the expand kernels


SMALL = Tiles(m=16, t=16, d=32, n=64)
TALL = Tiles(m=32, t=32, d=64, n=128)
TALL_FROM_TOKENS = 2048  # tall tiles pay off on large batches only (benchmarks/RESULTS.md, kernel profile)


def tiles_for(num_tokens: int) -> Tiles:
    return TALL if num_tokens >= TALL_FROM_TOKENS else SMALL


def supports(num_experts: int, top_k: int, r_max: int) -> bool:
    """Whether the kernels take a library of this size: they hold all N scores of a token block at once.

    Args:
        num_experts: N.
        top_k: experts per token.
        r_max: the largest rank.
    """
    return num_experts <= MAX_EXPERTS and min(top_k, num_experts) <= MAX_TOP_K and r_max <= MAX_RANK


def route(tokens: torch.Tensor, vectors: torch.Tensor, top_k: int, temperature: float, sigmoid: bool,
          scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert ids [T, k] (int64) and weights [T, k] (float32) of every token, from the scores ``scale * x . v``.

    Args:
        tokens: [T, d] what is scored (standardised tokens for PHATGOOSE scores).
        vectors: [N, d] routing vectors (standardised likewise).
        top_k: experts per token (capped at N).
        temperature: softmax temperature over the chosen scores.
        sigmoid: weights are sigmoid(score) instead of a softmax.
        scale: multiplies every score (1/sqrt(d) for PHATGOOSE scores).
    """
    num_tokens, d_in = tokens.shape
    n = vectors.shape[0]
    k = min(top_k, n)
    tokens, vectors = tokens.contiguous(), vectors.contiguous()
    ids = torch.empty(num_tokens, k, dtype=torch.int64, device=tokens.device)
    weights = torch.empty(num_tokens, k, dtype=torch.float32, device=tokens.device)
    if num_tokens == 0:
        return ids, weights
    route_kernel[(triton.cdiv(num_tokens, ROUTE_BLOCK_T),)](
        tokens, vectors, ids, weights, num_tokens, n, d_in, tokens.stride(0), vectors.stride(0),
        scale, 1.0 / temperature,
        TOP_K=k, K_PAD=triton.next_power_of_2(k), SIGMOID=sigmoid,
        BLOCK_T=ROUTE_BLOCK_T, BLOCK_N=max(16, triton.next_power_of_2(n)), BLOCK_D=ROUTE_BLOCK_D,
    )
    return ids, weights


def align(expert_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs sorted by expert, padded per expert to block_m rows (static bound T*k + N*(block_m-1)).

    Returns (sorted pair indices, padding rows holding T*k; the expert of every block_m block, -1 past the end).

    Args:
        expert_ids: [T, k] the chosen experts.
        num_experts: N.
        block_m: rows per block.
    """
    flat = expert_ids.reshape(-1).contiguous()
    num_pairs, device = flat.numel(), flat.device
    max_rows = triton.cdiv(num_pairs + num_experts * (block_m - 1), block_m) * block_m
    block_n = max(16, triton.next_power_of_2(num_experts))
    num_chunks = max(1, triton.cdiv(num_pairs, CHUNK))
    sorted_pairs = torch.full((max_rows,), num_pairs, dtype=torch.int64, device=device)
    block_expert = torch.empty(max_rows // block_m, dtype=torch.int32, device=device)
    offsets = torch.empty(num_chunks, block_n, dtype=torch.int32, device=device)
    starts = torch.empty(block_n, dtype=torch.int32, device=device)
    align_count_kernel[(num_chunks,)](flat, offsets, num_pairs, BLOCK_N=block_n, CHUNK=CHUNK)
    align_offsets_kernel[(1,)](offsets, starts, block_expert, num_chunks, block_expert.numel(),
                               BLOCK_M=block_m, BLOCK_N=block_n, CHUNK=CHUNK)
    align_place_kernel[(num_chunks,)](flat, offsets, starts, sorted_pairs, num_pairs, BLOCK_N=block_n, CHUNK=CHUNK)
    return sorted_pairs, block_expert


def sorted_lora(tokens: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, a: torch.Tensor, b_t: torch.Tensor,
                scales: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """align -> shrink (weights folded in) -> expand (atomic add into out); a [N, r, d_in], b_t [N, r, d_out].

    Args:
        tokens: [T, d_in] contiguous.
        ids: [T, k] chosen experts.
        weights: [T, k] their mixing weights.
        a: [N, r_max, d_in].
        b_t: [N, r_max, d_out].
        scales: [N] LoRA scalings.
        out: [T, d_out] added into.
    """
    num_tokens, k = ids.shape
    tiles = tiles_for(num_tokens)
    num_experts, r_max = a.shape[0], a.shape[1]
    sorted_pairs, block_expert = align(ids, num_experts, tiles.m)
    num_blocks = block_expert.numel()
    h = torch.zeros(sorted_pairs.numel(), r_max, dtype=torch.float32, device=tokens.device)
    block_r = max(16, triton.next_power_of_2(r_max))
    shrink_kernel[(num_blocks,)](
        tokens, a, sorted_pairs, block_expert, weights.reshape(-1).contiguous(), scales, h,
        num_tokens * k, tokens.shape[1], r_max, k, tokens.stride(0), a.stride(0), a.stride(1),
        BLOCK_M=tiles.m, BLOCK_R=block_r, BLOCK_D=tiles.d,
    )
    expand_kernel[(num_blocks, triton.cdiv(out.shape[1], tiles.n))](
        h, b_t, sorted_pairs, block_expert, out, num_tokens * k, out.shape[1], r_max, k,
        b_t.stride(0), b_t.stride(1), out.stride(0),
        BLOCK_M=tiles.m, BLOCK_R=block_r, BLOCK_N=tiles.n,
    )
    return out


def dense_lora(tokens: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, a: torch.Tensor, b_t: torch.Tensor,
               scales: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Every expert's shrink for every token, gated to the chosen ones, then one expand: no sorting.

    Args: as ``sorted_lora``.
    """
    num_tokens = tokens.shape[0]
    tiles = tiles_for(num_tokens)
    n, r_max = a.shape[0], a.shape[1]
    gates = torch.zeros(num_tokens, n, dtype=torch.float32, device=tokens.device)
    gates.scatter_(1, ids, weights * scales.float()[ids])
    columns = n * r_max
    h = torch.empty(num_tokens, columns, dtype=torch.float32, device=tokens.device)
    a_rows = a.reshape(columns, -1)
    gated_shrink_kernel[(triton.cdiv(num_tokens, tiles.t), triton.cdiv(columns, tiles.n))](
        tokens, a_rows, gates, h, num_tokens, tokens.shape[1], columns, r_max, n, tokens.stride(0),
        BLOCK_T=tiles.t, BLOCK_C=tiles.n, BLOCK_D=tiles.d,
    )
    b_rows = b_t.reshape(columns, -1)
    dense_expand_kernel[(triton.cdiv(num_tokens, tiles.t), triton.cdiv(out.shape[1], tiles.n))](
        h, b_rows, out, num_tokens, columns, out.shape[1], out.stride(0),
        BLOCK_T=tiles.t, BLOCK_N=tiles.n, BLOCK_C=tiles.d,
    )
    return out


def fused_lora(tokens: torch.Tensor, route_tokens: torch.Tensor, route_vectors: torch.Tensor, a: torch.Tensor,
               b_t: torch.Tensor, scales: torch.Tensor, top_k: int, temperature: float, sigmoid: bool,
               score_scale: float, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores, top-k and the chosen experts' LoRA in one launch; returns the routes like ``route``.

    Grid: (token, share of its output columns). Few shares per token, since every program of a token redoes its
    scores and shrink; enough that a decode step of one token still spreads over several programs.

    Args: as ``route`` and ``sorted_lora`` (``tokens`` what the LoRA multiplies, ``route_tokens`` what is scored).
    """
    num_tokens, d_in = tokens.shape
    n, r_max = a.shape[0], a.shape[1]
    d_out = out.shape[1]
    k = min(top_k, n)
    ids = torch.empty(num_tokens, k, dtype=torch.int64, device=tokens.device)
    weights = torch.empty(num_tokens, k, dtype=torch.float32, device=tokens.device)
    if num_tokens == 0:
        return ids, weights
    column_blocks = triton.cdiv(d_out, FUSED_BLOCK_N)
    shares = max(1, min(column_blocks, FUSED_PROGRAMS // num_tokens))
    cols_per_program = triton.cdiv(column_blocks, shares) * FUSED_BLOCK_N
    block_e = max(16, triton.next_power_of_2(n))  # no size-1 tiles (never compiled on a GPU here)
    fused_decode_kernel[(num_tokens, triton.cdiv(d_out, cols_per_program))](
        tokens, route_tokens, route_vectors, a, b_t, scales, out, ids, weights,
        n, d_in, route_tokens.shape[1], d_out, r_max, cols_per_program,
        tokens.stride(0), route_tokens.stride(0), route_vectors.stride(0), a.stride(0), a.stride(1),
        b_t.stride(0), b_t.stride(1), out.stride(0),
        score_scale, 1.0 / temperature,
        TOP_K=k, K_PAD=triton.next_power_of_2(k), SIGMOID=sigmoid,
        BLOCK_E=block_e, BLOCK_DV=max(1, min(ROUTE_BLOCK_D, 4096 // block_e)),  # [N, d] tile of at most 4096
        BLOCK_D=ROUTE_BLOCK_D, BLOCK_R=max(16, triton.next_power_of_2(r_max)), BLOCK_N=FUSED_BLOCK_N,
    )
    return ids, weights


@torch.library.custom_op("peft_routing::triton_routed_lora_", mutates_args=("out",))
def triton_routed_lora_(
    out: torch.Tensor, tokens: torch.Tensor, route_tokens: torch.Tensor, route_vectors: torch.Tensor,
    a: torch.Tensor, b_t: torch.Tensor, scales: torch.Tensor, top_k: int, temperature: float, sigmoid: bool,
    score_scale: float, dense: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """out [T, d_out] += every token's top-k experts' LoRA; returns the routes (ids [T, k] int64, weights float32).

    Args:
        out: [T, d_out] added into, in place.
        tokens: [T, d_in] what the LoRA multiplies, in the experts' dtype.
        route_tokens: [T, d] what is scored (``tokens``, or standardised tokens for PHATGOOSE scores).
        route_vectors: [N, d] routing vectors (standardised likewise).
        a: [N, r_max, d_in] every expert's A, ranks padded with zero rows.
        b_t: [N, r_max, d_out] every expert's B transposed, padded likewise.
        scales: [N] every expert's LoRA scaling.
        top_k: experts per token.
        temperature: softmax temperature over the chosen scores.
        sigmoid: weights are sigmoid(score) instead of a softmax.
        score_scale: multiplies every score (1/sqrt(d) for PHATGOOSE scores).
        dense: the small-library path (every expert's shrink, masked) instead of sorting the pairs, above
            ``FUSED_MAX_TOKENS`` tokens.
    """
    tokens = tokens.contiguous()
    if tokens.shape[0] <= FUSED_MAX_TOKENS:
        return fused_lora(tokens, route_tokens.contiguous(), route_vectors.contiguous(), a, b_t, scales, top_k,
                          temperature, sigmoid, score_scale, out)
    ids, weights = route(route_tokens, route_vectors, top_k, temperature, sigmoid, score_scale)
    (dense_lora if dense else sorted_lora)(tokens, ids, weights, a, b_t, scales, out)
    return ids, weights


@triton_routed_lora_.register_fake
def _(out, tokens, route_tokens, route_vectors, a, b_t, scales, top_k, temperature, sigmoid, score_scale, dense):
    k = min(top_k, route_vectors.shape[0])
    return tokens.new_empty(tokens.shape[0], k, dtype=torch.int64), tokens.new_empty(tokens.shape[0], k,
                                                                                      dtype=torch.float32)
