"""The PyTorch strategies of the route phase: one layer's routed LoRA on an ExpertStack, in plain torch ops.

Each takes tokens [T, d_in] in the stack's dtype, adds every token's routed LoRA into ``out`` [T, d_out] in place and
returns ``(out, routes)``; none builds a [tokens, N, d_out] tensor. ``dispatch.routed_forward`` picks one per call:
  * ``dense``   (N * r_max small): one matmul gives every expert's shrink, the routing weights mask the rank
                columns, one matmul against [B_1..B_N] expands. No sorting.
  * ``sorted``  (large libraries): the T*k (token, expert) pairs sorted by expert once, then
      ``padded``:  every expert's run padded to the longest, [N, C, d_in]; two batched matmuls for all experts;
      ``grouped``: the runs back to back through torch._grouped_mm (a loop over the experts where it is missing).
  * ``gather``  (a handful of pairs, e.g. decoding one token): only the chosen experts' A/B are read.
  * ``loop``:   the per-expert reference loop ``routing.routed_lora_delta``; every strategy equals it up to rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .expert_stack import ExpertStack
from .routing import ListedRoutes, Routes, routed_lora_delta, select_experts, standardize
from .settings import RoutingSettings

# A Python loop over the experts (where torch._grouped_mm does not take the operands) costs about as much as this
# many rows of the padded layout per expert (measured with benchmarks/routing_speed.py).
LOOPED_EXPERT_ROWS = 64
FEW_PAIRS = 4  # at most this many (token, expert) pairs: a Python loop over views beats gathering copies
_HAS_GROUPED_MM = hasattr(torch, "_grouped_mm")


def stack_scores(tokens: torch.Tensor, stack: ExpertStack, score_norm: str) -> torch.Tensor:
    """``routing.route_scores`` against the stack's vectors, reusing its cached standardised vectors.

    Args:
        tokens: [T, d_in] layer inputs.
        stack: the layer's experts.
        score_norm: ``"none"`` or ``"standardize"``.
    """
    if score_norm == "standardize":
        return standardize(tokens) @ stack.standardized_vectors().t() / math.sqrt(tokens.shape[-1])
    return torch.nn.functional.linear(tokens, stack.vectors)  # x V^T without a transposed view: one op fewer


def biased_scores(tokens: torch.Tensor, stack: ExpertStack, settings: RoutingSettings,
                  bias: torch.Tensor | None) -> torch.Tensor:
    """``stack_scores`` plus the prototype routers' bias [T, N] (``prototypes.decide``), if any.

    Args:
        tokens: [T, d_in] layer inputs.
        stack: the layer's experts.
        settings: the routing rule (its score_norm).
        bias: [T, N] added to the scores, or None.
    """
    scores = stack_scores(tokens, stack, settings.score_norm)
    return scores if bias is None else scores + bias.to(scores.dtype)


def dense(tokens: torch.Tensor, stack: ExpertStack, settings: RoutingSettings, out: torch.Tensor,
          bias: torch.Tensor | None = None) -> tuple[torch.Tensor, Routes]:
    """Every expert's shrink for every token, masked to the chosen experts, then one expand."""
    routes = select_experts(biased_scores(tokens, stack, settings, bias), settings)
    shrunk = torch.nn.functional.linear(tokens, stack.a_rows)
    num_tokens = shrunk.shape[0]
    gates = shrunk.new_zeros(num_tokens, stack.num_experts)
    gates.scatter_(1, routes.expert_ids, _pair_gates(routes, stack))
    masked = shrunk.view(num_tokens, stack.num_experts, stack.r_max) * gates.unsqueeze(-1)
    return out.addmm_(masked.view(num_tokens, -1), stack.b_rows), routes


def gather(tokens: torch.Tensor, stack: ExpertStack, settings: RoutingSettings, out: torch.Tensor,
           bias: torch.Tensor | None = None) -> tuple[torch.Tensor, Routes]:
    """Only the chosen experts' A and B are read: gathered copies and two bmm, or, for at most FEW_PAIRS pairs,
    matrix-vector products on views (a third of the ops: on a CPU each small op costs more than its arithmetic)."""
    # (picked in Python from host copies of the scores, which a torch.compile graph cannot hold)
    if tokens.shape[0] * min(settings.top_k, stack.num_experts) <= FEW_PAIRS and not torch.compiler.is_compiling():
        decoded = _few_pairs(tokens, stack, settings, out, bias)
        if decoded is not None:
            return decoded
    routes = select_experts(biased_scores(tokens, stack, settings, bias), settings)
    num_tokens, k = routes.expert_ids.shape
    ids = routes.expert_ids.reshape(-1)
    a = stack.a[ids]  # [P, r, d_in]
    b = stack.b_t[ids]  # [P, r, d_out]
    x = tokens.repeat_interleave(k, dim=0).unsqueeze(-1)  # [P, d_in, 1]
    shrunk = torch.bmm(a, x).squeeze(-1) * _pair_gates(routes, stack).reshape(-1, 1)
    expanded = torch.bmm(shrunk.unsqueeze(1), b).squeeze(1)  # [P, d_out]
    return out.add_(expanded.view(num_tokens, k, -1).sum(dim=1)), routes


def sorted_pairs(tokens: torch.Tensor, stack: ExpertStack, settings: RoutingSettings, out: torch.Tensor,
                 layout: str = "sorted", bias: torch.Tensor | None = None) -> tuple[torch.Tensor, Routes]:
    """The pairs sorted by expert, in the ``"padded"`` or ``"grouped"`` layout (``"sorted"``: ``sorted_layout``)."""
    routes = select_experts(biased_scores(tokens, stack, settings, bias), settings)
    pairs = SortedPairs.of(routes, stack, tokens.dtype)
    counts = pairs.counts.tolist()
    can_group = grouped_mm_supported(tokens, stack)
    if layout == "sorted":
        layout = sorted_layout(counts, can_group)
    if layout == "padded":
        return _padded(tokens, pairs, max(counts), stack, out), routes
    if not can_group:  # one expert at a time
        return out.add_(_delta_by_loop(tokens, routes, stack)), routes
    ends = torch.cumsum(pairs.counts, 0).to(torch.int32)
    x = torch.index_select(tokens, 0, pairs.tokens)
    shrunk = torch._grouped_mm(x, stack.a.transpose(1, 2), offs=ends) * pairs.gates.unsqueeze(-1)
    return out.index_add_(0, pairs.tokens, torch._grouped_mm(shrunk, stack.b_t, offs=ends)), routes


def loop(tokens: torch.Tensor, stack: ExpertStack, settings: RoutingSettings, out: torch.Tensor,
         bias: torch.Tensor | None = None) -> tuple[torch.Tensor, Routes]:
    """The reference: one expert at a time (``routing.routed_lora_delta``)."""
    routes = select_experts(biased_scores(tokens, stack, settings, bias), settings)
    return out.add_(_delta_by_loop(tokens, routes, stack)), routes


def grouped_mm_supported(tokens: torch.Tensor, stack: ExpertStack) -> bool:
    """torch._grouped_mm exists and takes these operands: on a CPU 32- and 16-bit floats whose strides are multiples
    of 16 bytes (the rows of x, A^T and B^T), on CUDA bfloat16 on Hopper (sm90) or newer only.

    Args:
        tokens: [T, d_in] layer inputs.
        stack: the layer's experts.
    """
    dtypes = (torch.bfloat16,) if tokens.is_cuda else (torch.float32, torch.bfloat16, torch.float16)
    if not _HAS_GROUPED_MM or tokens.dtype not in dtypes:
        return False
    if tokens.is_cuda and torch.cuda.get_device_capability(tokens.device) < (9, 0):
        return False
    dims = (stack.a.shape[-1], stack.r_max, stack.b_t.shape[-1])
    return all(d * tokens.element_size() % 16 == 0 for d in dims)


def sorted_layout(counts: list[int], grouped_mm: bool) -> str:
    """``"grouped"`` wherever torch._grouped_mm takes the operands (it beats padding even on near-uniform routing).

    Without it, ``"padded"`` unless the routing is so skewed (as in real models: a few experts take most pairs) that
    padding every expert to the longest run moves more rows than a loop over the experts, which costs
    LOOPED_EXPERT_ROWS rows per active expert.

    Args:
        counts: pairs per expert.
        grouped_mm: whether torch._grouped_mm takes the operands (``grouped_mm_supported``).
    """
    if grouped_mm:
        return "grouped"
    looped_rows = sum(counts) + LOOPED_EXPERT_ROWS * sum(1 for count in counts if count)
    return "padded" if len(counts) * max(counts) <= looped_rows else "grouped"


@dataclass
class SortedPairs:
    """The T*k (token, expert) pairs sorted by expert, so that each expert's pairs form one contiguous run."""

    tokens: torch.Tensor  # [P] the token of each pair
    gates: torch.Tensor  # [P] its w_tj * s_j, in the tokens' dtype
    experts: torch.Tensor  # [P] its expert (ascending)
    counts: torch.Tensor  # [N] each expert's number of pairs (its run's length)

    @classmethod
    def of(cls, routes: Routes, stack: ExpertStack, dtype: torch.dtype) -> SortedPairs:
        k = routes.expert_ids.shape[1]
        flat_ids = routes.expert_ids.reshape(-1)
        experts, order = torch.sort(flat_ids, stable=True)
        gates = _pair_gates(routes, stack).reshape(-1)[order].to(dtype)
        return cls(order // k, gates, experts, torch.bincount(flat_ids, minlength=stack.num_experts))


def _pair_gates(routes: Routes, stack: ExpertStack) -> torch.Tensor:
    """w_tj * s_j for every (token, chosen expert) pair, [T, k]."""
    return routes.weights.to(stack.scales.dtype) * stack.scales[routes.expert_ids]


def _padded(tokens: torch.Tensor, pairs: SortedPairs, capacity: int, stack: ExpertStack,
            out: torch.Tensor) -> torch.Tensor:
    """Every expert's run padded to ``capacity`` rows, [N, capacity, d_in]: two batched matmuls for all experts."""
    n = stack.num_experts
    starts = torch.cumsum(pairs.counts, 0) - pairs.counts
    slot = pairs.experts * capacity + torch.arange(pairs.tokens.numel(), device=tokens.device) - starts[pairs.experts]
    # padding slots read token 0 with a zero gate, so they add exactly 0 to token 0
    source = pairs.tokens.new_zeros(n * capacity).index_copy_(0, slot, pairs.tokens)
    gates = pairs.gates.new_zeros(n * capacity).index_copy_(0, slot, pairs.gates)
    x = torch.index_select(tokens, 0, source).view(n, capacity, -1)
    shrunk = torch.bmm(x, stack.a.transpose(1, 2)) * gates.view(n, capacity, 1)
    return out.index_add_(0, source, torch.bmm(shrunk, stack.b_t).view(n * capacity, -1))


def _delta_by_loop(tokens: torch.Tensor, routes: Routes, stack: ExpertStack) -> torch.Tensor:
    a = [stack.a[j] for j in range(stack.num_experts)]
    b = [stack.b_t[j].t() for j in range(stack.num_experts)]
    return routed_lora_delta(tokens, routes, a, b, stack.scales.tolist())


def _few_pairs(tokens: torch.Tensor, stack: ExpertStack, settings: RoutingSettings, out: torch.Tensor,
               bias: torch.Tensor | None) -> tuple[torch.Tensor, Routes] | None:
    """Decoding a token or two: the top-k and mixing weights of a few score rows are picked in Python, then each
    pair is one matrix-vector product into A_j and one accumulating product out of B_j, on views of the stack.

    None for NaN or +inf scores, or a row without a finite one, which the batched path handles (-inf, a prototype
    router's "not this expert", stays here).
    """
    rows = biased_scores(tokens, stack, settings, bias).tolist()
    if not all(math.isfinite(max(row)) and not math.isnan(sum(row)) for row in rows):
        return None  # +inf or NaN anywhere makes max or sum non-finite or NaN; -inf alone does neither
    k = min(settings.top_k, stack.num_experts)
    a, b, scales = stack.expert_views()
    ids, weights = [], []
    for token, row in enumerate(rows):
        chosen = _largest(row, k)
        mix = _mixing_weights([row[j] for j in chosen], settings)
        x, target = tokens[token], out[token]
        for expert, weight in zip(chosen, mix):
            target.addmv_(b[expert], torch.mv(a[expert], x), alpha=weight * scales[expert])
        ids.append(chosen)
        weights.append(mix)
    return out, ListedRoutes(ids, weights, tokens.device, tokens.dtype)


def _largest(row: list[float], k: int) -> list[int]:
    """Indices of the k largest scores, best first; ties go to the lower index, as torch.max and top_k do."""
    remaining = list(range(len(row)))
    chosen = []
    for _ in range(k):
        best = max(remaining, key=row.__getitem__)  # max keeps the first of equal keys
        chosen.append(best)
        remaining.remove(best)
    return chosen


def _mixing_weights(top_scores: list[float], settings: RoutingSettings) -> list[float]:
    """select_experts' weights for one token's chosen scores, in Python floats (routing.py has the equations)."""
    if settings.mixing == "sigmoid":
        return [0.5 * (1.0 + math.tanh(score / 2)) for score in top_scores]  # sigmoid, without overflow
    best = max(top_scores)
    exps = [math.exp((score - best) / settings.temperature) for score in top_scores]
    total = sum(exps)
    return [e / total for e in exps]
