"""``routed_forward``: the route phase of one layer, sent to the fastest path that applies to its tensors.

Two paths are compiled kernels, the default wherever they run: ``triton`` (CUDA tensors; ``triton_path``) and
``cpu_kernel`` (float32 CPU tensors without autograd, where a C++ compiler is found; ``cpu_kernel``). Elsewhere
``auto`` picks a PyTorch strategy (``strategies``) by the call's size; ``torch`` does the same but never takes a
compiled kernel, to compare with them. Every strategy gives the same result up to float rounding.
"""

from __future__ import annotations

import os

import torch

from . import cpu_kernel, strategies, triton_path
from .expert_stack import ExpertStack
from .routing import Routes
from .settings import RoutingSettings

STRATEGIES = ("auto", "torch", "dense", "sorted", "padded", "grouped", "gather", "loop", "triton", "cpu_kernel")
# PEFT_ROUTING_BACKEND=torch keeps CUDA tensors on the PyTorch path; =triton sends every call to the kernels
# (on CPU that needs TRITON_INTERPRET=1, for testing).
BACKEND = os.environ.get("PEFT_ROUTING_BACKEND", "auto")
# dense while N * r_max <= DENSE_MAX_COLUMNS; gather while T * k <= GATHER_MAX_PAIRS (benchmarks/RESULTS.md)
DENSE_MAX_COLUMNS = int(os.environ.get("PEFT_ROUTING_DENSE_MAX_COLUMNS", 256))
GATHER_MAX_PAIRS = int(os.environ.get("PEFT_ROUTING_GATHER_MAX_PAIRS", 16))


def choose_strategy(num_pairs: int, stack: ExpertStack) -> str:
    """The PyTorch strategy for ``num_pairs`` (token, expert) pairs on ``stack``: gather, dense or sorted.

    Args:
        num_pairs: T * k (token, expert) pairs of the call.
        stack: the layer's experts.
    """
    if num_pairs <= GATHER_MAX_PAIRS:
        return "gather"
    if stack.num_experts * stack.r_max <= DENSE_MAX_COLUMNS:
        return "dense"
    return "sorted"


def routed_forward(tokens: torch.Tensor, stack: ExpertStack, settings: RoutingSettings, strategy: str = "auto",
                   out: torch.Tensor | None = None) -> tuple[torch.Tensor, Routes]:
    """Add every token's routed LoRA to ``out`` (in place) and return ``(out, routes)``.

    Accumulating into the base layer's output saves a full pass over a [T, d_out] tensor per layer.

    Args:
        tokens: [T, d_in] layer inputs, in the stack's dtype.
        stack: the layer's experts.
        settings: the routing rule.
        strategy: one of ``STRATEGIES``; ``"auto"`` picks the fastest that applies.
        out: [T, d_out] to add into (the base layer's output); zeros when None.
    """
    if out is None:
        out = tokens.new_zeros(tokens.shape[0], stack.b_t.shape[-1])
    if tokens.shape[0] == 0:
        empty = torch.empty(0, min(settings.top_k, stack.num_experts), dtype=torch.long, device=tokens.device)
        return out, Routes(expert_ids=empty, weights=empty.to(tokens.dtype))
    strategy = _resolve(strategy, tokens, stack, settings, out)
    if strategy == "triton":
        dense = stack.num_experts * stack.r_max <= DENSE_MAX_COLUMNS
        return triton_path.routed_forward(tokens, stack, settings, out, dense=dense)
    if strategy == "cpu_kernel":
        scores = strategies.stack_scores(tokens, stack, settings.score_norm)
        return out, cpu_kernel.routed_lora_(tokens, scores, stack, settings, out)
    if strategy == "dense":
        return strategies.dense(tokens, stack, settings, out)
    if strategy == "gather":
        return strategies.gather(tokens, stack, settings, out)
    if strategy in ("sorted", "padded", "grouped"):
        return strategies.sorted_pairs(tokens, stack, settings, out, layout=strategy)
    return strategies.loop(tokens, stack, settings, out)


def _resolve(strategy: str, tokens: torch.Tensor, stack: ExpertStack, settings: RoutingSettings,
             out: torch.Tensor) -> str:
    """``auto`` and ``torch`` made concrete; a forced compiled kernel that cannot run raises."""
    if strategy not in STRATEGIES:
        raise ValueError(f"Unknown routing strategy {strategy!r}; use one of {STRATEGIES}.")
    k = min(settings.top_k, stack.num_experts)
    if strategy == "auto" and (BACKEND == "triton" or (BACKEND != "torch" and triton_path.applies(tokens, stack, k))):
        return "triton"
    if strategy == "auto" and cpu_kernel.supports(tokens, stack, out):
        return "cpu_kernel"
    if strategy == "cpu_kernel" and not cpu_kernel.supports(tokens, stack, out):
        raise ValueError("The CPU kernel takes float32 CPU tensors without autograd, a contiguous output and a C++ "
                         "compiler to build it (see the warning, if any); use strategy 'auto' or 'torch' otherwise.")
    if strategy in ("auto", "torch"):
        return choose_strategy(tokens.shape[0] * k, stack)
    return strategy
