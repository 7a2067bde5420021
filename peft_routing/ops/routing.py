"""Token-level routing math of the route phase, on plain tensors: the reference every faster path is tested against.

For every token u and the stacked routing vectors V (N x d):
  score_j = v_j . u                                   (score_norm="none", the paper)
  score_j = std(v_j) . std(u) / sqrt(d)               (score_norm="standardize", PHATGOOSE)
  E = top-k scores;  w_j = softmax_E(score_j / tau)   (mixing="softmax", paper eq. 4)
                     w_j = sigmoid(score_j)           (mixing="sigmoid": every weight may be ~0, base model alone)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .settings import RoutingSettings

STANDARDIZE_EPS = 1e-6


def standardize(x: torch.Tensor, eps: float = STANDARDIZE_EPS) -> torch.Tensor:
    """Zero mean, unit variance over the last dimension (population variance; eps keeps zero vectors finite).

    Args:
        x: tokens or routing vectors, [..., d].
        eps: added to the variance.
    """
    centered = x - x.mean(dim=-1, keepdim=True)
    return centered * torch.rsqrt(centered.pow(2).mean(dim=-1, keepdim=True) + eps)


def route_scores(tokens: torch.Tensor, vectors: torch.Tensor, score_norm: str) -> torch.Tensor:
    """Scores [T, N] of T tokens against N routing vectors.

    Args:
        tokens: [T, d] layer inputs.
        vectors: [N, d] routing vectors.
        score_norm: ``"none"`` (``v . u``) or ``"standardize"`` (PHATGOOSE).
    """
    if score_norm == "standardize":
        return standardize(tokens) @ standardize(vectors).t() / math.sqrt(tokens.shape[-1])
    return tokens @ vectors.t()


@dataclass
class Routes:
    """The experts chosen for each token: ids [T, k] (int64) and their mixing weights [T, k]."""

    expert_ids: torch.Tensor
    weights: torch.Tensor


class ListedRoutes(Routes):
    """Routes kept as Python lists until read: the decode path decides in Python, and turning its handful of
    numbers into two tensors would cost two more PyTorch ops per layer call than the routing itself needs."""

    def __init__(self, expert_ids: list[list[int]], weights: list[list[float]], device, dtype) -> None:
        self._lists, self._device, self._dtype = (expert_ids, weights), device, dtype

    @property
    def expert_ids(self) -> torch.Tensor:
        return torch.tensor(self._lists[0], dtype=torch.long, device=self._device)

    @property
    def weights(self) -> torch.Tensor:
        return torch.tensor(self._lists[1], dtype=self._dtype, device=self._device)


def top_k(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.topk, but equal scores go to the lower index (NaN first, as torch.max), as in our kernels.

    torch.topk orders ties arbitrarily, so that a row of equal scores could pick different experts on different
    paths; a small k uses k passes of argmax instead (a little slower than torch.topk, see benchmarks/RESULTS.md).

    Args:
        scores: [T, N] routing scores.
        k: experts per row.
    """
    if k > 4 or scores.shape[-1] <= k:
        return torch.topk(scores, k, dim=-1)
    # Choose on scores with -inf raised to the lowest finite value, so that an expert already taken (set to -inf)
    # never ties with one still free: a row of -inf gets k distinct experts, the lowest indices, as torch.topk.
    remaining = scores.clamp(min=torch.finfo(scores.dtype).min)
    indices = []
    for i in range(k):
        index = remaining.argmax(dim=-1, keepdim=True)
        indices.append(index)
        if i + 1 < k:
            remaining = remaining.scatter(-1, index, float("-inf"))
    chosen = torch.cat(indices, dim=-1)
    return scores.gather(-1, chosen), chosen


def select_experts(scores: torch.Tensor, settings: RoutingSettings) -> Routes:
    """Top-k of each row of ``scores`` and their mixing weights; k is capped at the number of experts.

    Args:
        scores: [T, N] routing scores.
        settings: top_k, temperature and mixing (score_norm is already applied to ``scores``).
    """
    k = min(settings.top_k, scores.shape[-1])
    top_scores, expert_ids = top_k(scores, k)
    if settings.mixing == "sigmoid":
        weights = torch.sigmoid(top_scores)
    else:
        weights = torch.softmax(top_scores / settings.temperature, dim=-1)
    return Routes(expert_ids=expert_ids, weights=weights)


def route(tokens: torch.Tensor, vectors: torch.Tensor, settings: RoutingSettings) -> Routes:
    """Scores, top-k and weights in one call: the whole routing decision for a batch of tokens.

    Args:
        tokens: [T, d] layer inputs.
        vectors: [N, d] routing vectors.
        settings: the routing rule.
    """
    return select_experts(route_scores(tokens, vectors, settings.score_norm), settings)


def routed_lora_delta(
    tokens: torch.Tensor,
    routes: Routes,
    lora_a: list[torch.Tensor],
    lora_b: list[torch.Tensor],
    scales: list[float],
) -> torch.Tensor:
    """sum_{j in E(t)} w_tj * s_j * B_j A_j u_t for every token, computing only the chosen experts.

    The (token, expert) pairs are sorted by expert once, then each expert multiplies its contiguous slice of tokens,
    so the cost follows T * k, not T * N, and no [T, N, d_out] tensor exists.

    Args:
        tokens: [T, d_in] layer inputs.
        routes: the chosen experts and weights of every token.
        lora_a: per expert, A [r_j, d_in].
        lora_b: per expert, B [d_out, r_j].
        scales: per expert, the LoRA scaling s_j.
    """
    num_tokens, k = routes.expert_ids.shape
    out = tokens.new_zeros(num_tokens, lora_b[0].shape[0]) if lora_b else tokens.new_zeros(num_tokens, 0)
    flat_ids = routes.expert_ids.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)
    counts = torch.bincount(flat_ids, minlength=len(lora_a)).tolist()
    token_of_pair = order // k
    pair_weights = routes.weights.reshape(-1)[order].to(tokens.dtype)
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        rows = token_of_pair[start : start + count]
        gate = pair_weights[start : start + count].unsqueeze(-1) * scales[expert]
        out.index_add_(0, rows, ((tokens[rows] @ lora_a[expert].t()) @ lora_b[expert].t()) * gate)
        start += count
    return out
