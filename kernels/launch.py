"""Python launchers for the routed-LoRA Triton kernels: ``triton_routed_forward`` mirrors the PyTorch path.

route -> (dense: gated_shrink -> dense_expand) or (align -> shrink -> expand), accumulating into ``out``. Tile sizes
are fixed per token count (``tiles_for``; the CPU interpreter cannot autotune), chosen on an H100 with
benchmarks/kernel_profile.py. Import this module only after
deciding on TRITON_INTERPRET, which Triton reads at import time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton

from .align import align_count_kernel, align_offsets_kernel, align_place_kernel
from .dense import dense_expand_kernel, gated_shrink_kernel
from .expand import expand_kernel
from .route import route_kernel
from .shrink import shrink_kernel

MAX_EXPERTS = 1024  # the route kernel holds all N scores of a token block at once
MAX_TOP_K = 8
ROUTE_BLOCK_T = 16  # tokens per route program: many programs, since one holds [ROUTE_BLOCK_T, N] scores
ROUTE_BLOCK_D = 64  # d_in per step of the route kernel
CHUNK = 64  # pairs per program of the align kernels


@dataclass(frozen=True)
class Tiles:
    """Tile sizes of the LoRA kernels (fixed, not autotuned: the CPU interpreter cannot autotune)."""

    m: int  # rows per expert block of the sorted path (align pads each expert's run to a multiple of it)
    t: int  # tokens per program of the dense path
    d: int  # d_in per step of the shrink kernels
    n: int  # output columns per program of the expand kernels


SMALL = Tiles(m=16, t=16, d=32, n=64)
TALL = Tiles(m=32, t=32, d=64, n=128)
TALL_FROM_TOKENS = 2048  # on an H100 tall tiles cost 5-17% less from 4096 tokens, 3% more at 512 (RESULTS.md)


def tiles_for(num_tokens: int) -> Tiles:
    return TALL if num_tokens >= TALL_FROM_TOKENS else SMALL


def supports(num_experts: int, top_k: int, r_max: int) -> bool:
    return num_experts <= MAX_EXPERTS and min(top_k, num_experts) <= MAX_TOP_K and r_max <= 128


def route(tokens: torch.Tensor, vectors: torch.Tensor, top_k: int, temperature: float, score_norm: str,
          mixing: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert ids [T, k] (int64) and weights [T, k] (float32) of every token."""
    from peft_routing.routing import standardize

    num_tokens, d_in = tokens.shape
    n = vectors.shape[0]
    k = min(top_k, n)
    scale = 1.0
    if score_norm == "standardize":
        # in fp32 whatever the model's dtype: standardizing in half precision would move near-tie decisions
        tokens, vectors, scale = standardize(tokens.float()), standardize(vectors.float()), 1.0 / math.sqrt(d_in)
    tokens, vectors = tokens.contiguous(), vectors.contiguous()
    ids = torch.empty(num_tokens, k, dtype=torch.int64, device=tokens.device)
    weights = torch.empty(num_tokens, k, dtype=torch.float32, device=tokens.device)
    if num_tokens == 0:
        return ids, weights
    route_kernel[(triton.cdiv(num_tokens, ROUTE_BLOCK_T),)](
        tokens, vectors, ids, weights, num_tokens, n, d_in, tokens.stride(0), vectors.stride(0),
        scale, 1.0 / temperature,
        TOP_K=k, K_PAD=triton.next_power_of_2(k), SIGMOID=mixing == "sigmoid",
        BLOCK_T=ROUTE_BLOCK_T, BLOCK_N=max(16, triton.next_power_of_2(n)), BLOCK_D=ROUTE_BLOCK_D,
    )
    return ids, weights


def align(expert_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pairs sorted by expert, padded per expert to block_m rows (static bound T*k + N*(block_m-1))."""
    flat = expert_ids.reshape(-1).contiguous()
    num_pairs, device = flat.numel(), flat.device
    max_rows = triton.cdiv(num_pairs + num_experts * (block_m - 1), block_m) * block_m
    block_n = max(16, triton.next_power_of_2(num_experts))
    num_chunks = max(1, triton.cdiv(num_pairs, CHUNK))
    sorted_pairs = torch.full((max_rows,), num_pairs, dtype=torch.int64, device=device)
    block_expert = torch.empty(max_rows // block_m, dtype=torch.int32, device=device)
    used_rows = torch.empty(1, dtype=torch.int32, device=device)
    offsets = torch.empty(num_chunks, block_n, dtype=torch.int32, device=device)
    starts = torch.empty(block_n, dtype=torch.int32, device=device)
    align_count_kernel[(num_chunks,)](flat, offsets, num_pairs, BLOCK_N=block_n, CHUNK=CHUNK)
    align_offsets_kernel[(1,)](offsets, starts, block_expert, used_rows, num_chunks, block_expert.numel(),
                               BLOCK_M=block_m, BLOCK_N=block_n, CHUNK=CHUNK)
    align_place_kernel[(num_chunks,)](flat, offsets, starts, sorted_pairs, num_pairs, BLOCK_N=block_n, CHUNK=CHUNK)
    return sorted_pairs, block_expert, used_rows


def sorted_lora(tokens, ids, weights, stack, out) -> torch.Tensor:
    """align -> shrink (weights folded in) -> expand (atomic add into out)."""
    num_tokens, k = ids.shape
    tiles = tiles_for(num_tokens)
    sorted_pairs, block_expert, _ = align(ids, stack.num_experts, tiles.m)
    num_blocks, r_max = block_expert.numel(), stack.r_max
    h = torch.zeros(sorted_pairs.numel(), r_max, dtype=torch.float32, device=tokens.device)
    a, b = stack.a, stack.b_t
    block_r = max(16, triton.next_power_of_2(r_max))
    shrink_kernel[(num_blocks,)](
        tokens, a, sorted_pairs, block_expert, weights.reshape(-1).contiguous(), stack.scales, h,
        num_tokens * k, tokens.shape[1], r_max, k, tokens.stride(0), a.stride(0), a.stride(1),
        BLOCK_M=tiles.m, BLOCK_R=block_r, BLOCK_D=tiles.d,
    )
    expand_kernel[(num_blocks, triton.cdiv(out.shape[1], tiles.n))](
        h, b, sorted_pairs, block_expert, out, num_tokens * k, out.shape[1], r_max, k,
        b.stride(0), b.stride(1), out.stride(0),
        BLOCK_M=tiles.m, BLOCK_R=block_r, BLOCK_N=tiles.n,
    )
    return out


def dense_lora(tokens, ids, weights, stack, out) -> torch.Tensor:
    """Every expert's shrink for every token, gated to the chosen ones, then one expand: no sorting."""
    num_tokens = tokens.shape[0]
    tiles = tiles_for(num_tokens)
    n, r_max = stack.num_experts, stack.r_max
    gates = torch.zeros(num_tokens, n, dtype=torch.float32, device=tokens.device)
    gates.scatter_(1, ids, weights * stack.scales.float()[ids])
    columns = n * r_max
    h = torch.empty(num_tokens, columns, dtype=torch.float32, device=tokens.device)
    a_rows = stack.a.reshape(columns, -1)
    gated_shrink_kernel[(triton.cdiv(num_tokens, tiles.t), triton.cdiv(columns, tiles.n))](
        tokens, a_rows, gates, h, num_tokens, tokens.shape[1], columns, r_max, n, tokens.stride(0),
        BLOCK_T=tiles.t, BLOCK_C=tiles.n, BLOCK_D=tiles.d,
    )
    b_rows = stack.b_t.reshape(columns, -1)
    dense_expand_kernel[(triton.cdiv(num_tokens, tiles.t), triton.cdiv(out.shape[1], tiles.n))](
        h, b_rows, out, num_tokens, columns, out.shape[1], out.stride(0),
        BLOCK_T=tiles.t, BLOCK_N=tiles.n, BLOCK_C=tiles.d,
    )
    return out


def triton_routed_forward(tokens, stack, settings, out, dense: bool):
    """The route-phase LoRA of one layer on Triton; returns (out, (ids, weights))."""
    tokens = tokens.contiguous()
    ids, weights = route(tokens, stack.vectors, settings.top_k, settings.temperature, settings.score_norm,
                         settings.mixing)
    if tokens.shape[0]:
        (dense_lora if dense else sorted_lora)(tokens, ids, weights, stack, out)
    return out, (ids, weights)
