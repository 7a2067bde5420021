"""Python launchers for the routed-LoRA Triton kernels: ``triton_routed_forward`` mirrors the PyTorch path.

route -> (dense: gated_shrink -> dense_expand) or (align -> shrink -> expand), accumulating into ``out``. Tile sizes
are fixed constexprs (the CPU interpreter cannot autotune; no GPU has tuned them yet). Import this module only after
deciding on TRITON_INTERPRET, which Triton reads at import time.
"""

from __future__ import annotations

import math

import torch
import triton

from .align import align_kernel
from .dense import dense_expand_kernel, gated_shrink_kernel
from .expand import expand_kernel
from .route import route_kernel
from .shrink import shrink_kernel

MAX_EXPERTS = 1024  # the route kernel holds all N scores of a token block at once
MAX_TOP_K = 8
BLOCK_M = 16  # rows per expert block of the sorted path
BLOCK_T = 16
BLOCK_D = 32
BLOCK_N = 64
CHUNK = 64


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
        tokens, vectors, scale = standardize(tokens), standardize(vectors), 1.0 / math.sqrt(d_in)
    tokens, vectors = tokens.contiguous(), vectors.contiguous()
    ids = torch.empty(num_tokens, k, dtype=torch.int64, device=tokens.device)
    weights = torch.empty(num_tokens, k, dtype=torch.float32, device=tokens.device)
    if num_tokens == 0:
        return ids, weights
    route_kernel[(triton.cdiv(num_tokens, BLOCK_T),)](
        tokens, vectors, ids, weights, num_tokens, n, d_in, tokens.stride(0), vectors.stride(0),
        scale, 1.0 / temperature,
        TOP_K=k, K_PAD=triton.next_power_of_2(k), SIGMOID=mixing == "sigmoid",
        BLOCK_T=BLOCK_T, BLOCK_N=max(16, triton.next_power_of_2(n)), BLOCK_D=BLOCK_D,
    )
    return ids, weights


def align(expert_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pairs sorted by expert, padded per expert to BLOCK_M rows (static bound T*k + N*(BLOCK_M-1))."""
    flat = expert_ids.reshape(-1).contiguous()
    num_pairs = flat.numel()
    max_rows = triton.cdiv(num_pairs + num_experts * (BLOCK_M - 1), BLOCK_M) * BLOCK_M
    sorted_pairs = torch.empty(max_rows, dtype=torch.int64, device=flat.device)
    block_expert = torch.empty(max_rows // BLOCK_M, dtype=torch.int32, device=flat.device)
    used_rows = torch.empty(1, dtype=torch.int32, device=flat.device)
    align_kernel[(1,)](
        flat, sorted_pairs, block_expert, used_rows, num_pairs, num_experts, max_rows,
        BLOCK_M=BLOCK_M, BLOCK_N=max(16, triton.next_power_of_2(num_experts)), CHUNK=CHUNK,
    )
    return sorted_pairs, block_expert, used_rows


def sorted_lora(tokens, ids, weights, stack, out) -> torch.Tensor:
    """align -> shrink (weights folded in) -> expand (atomic add into out)."""
    num_tokens, k = ids.shape
    sorted_pairs, block_expert, _ = align(ids, stack.num_experts)
    num_blocks, r_max = block_expert.numel(), stack.r_max
    h = torch.zeros(sorted_pairs.numel(), r_max, dtype=torch.float32, device=tokens.device)
    a, b = stack.a, stack.b_t
    block_r = max(16, triton.next_power_of_2(r_max))
    shrink_kernel[(num_blocks,)](
        tokens, a, sorted_pairs, block_expert, weights.reshape(-1).contiguous(), stack.scales, h,
        num_tokens * k, tokens.shape[1], r_max, k, tokens.stride(0), a.stride(0), a.stride(1),
        BLOCK_M=BLOCK_M, BLOCK_R=block_r, BLOCK_D=BLOCK_D,
    )
    expand_kernel[(num_blocks, triton.cdiv(out.shape[1], BLOCK_N))](
        h, b, sorted_pairs, block_expert, out, num_tokens * k, out.shape[1], r_max, k,
        b.stride(0), b.stride(1), out.stride(0),
        BLOCK_M=BLOCK_M, BLOCK_R=block_r, BLOCK_N=BLOCK_N,
    )
    return out


def dense_lora(tokens, ids, weights, stack, out) -> torch.Tensor:
    """Every expert's shrink for every token, gated to the chosen ones, then one expand: no sorting."""
    num_tokens = tokens.shape[0]
    n, r_max = stack.num_experts, stack.r_max
    gates = torch.zeros(num_tokens, n, dtype=torch.float32, device=tokens.device)
    gates.scatter_(1, ids, weights * stack.scales.float()[ids])
    columns = n * r_max
    h = torch.empty(num_tokens, columns, dtype=torch.float32, device=tokens.device)
    a_rows = stack.a.reshape(columns, -1)
    gated_shrink_kernel[(triton.cdiv(num_tokens, BLOCK_T), triton.cdiv(columns, BLOCK_N))](
        tokens, a_rows, gates, h, num_tokens, tokens.shape[1], columns, r_max, n, tokens.stride(0),
        BLOCK_T=BLOCK_T, BLOCK_C=BLOCK_N, BLOCK_D=BLOCK_D,
    )
    b_rows = stack.b_t.reshape(columns, -1)
    dense_expand_kernel[(triton.cdiv(num_tokens, BLOCK_T), triton.cdiv(out.shape[1], BLOCK_N))](
        h, b_rows, out, num_tokens, columns, out.shape[1], out.stride(0),
        BLOCK_T=BLOCK_T, BLOCK_N=BLOCK_N, BLOCK_C=BLOCK_D,
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
