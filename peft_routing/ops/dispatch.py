"""``routed_forward``: the route phase of one layer, sent to the fastest path that applies to its tensors.

Two paths are compiled kernels: ``triton`` (CUDA tensors; ``triton_path``), the default wherever it runs, and
``cpu_kernel`` (float32 CPU tensors without autograd, where a C++ compiler is found; ``cpu_kernel``), which ``auto``
takes where it measured faster than the PyTorch path for the call's shape (``measured_choice``). Elsewhere
``auto`` picks a PyTorch strategy (``strategies``) by the call's size; ``torch`` does the same but never takes a
compiled kernel, to compare with them. Every strategy gives the same result up to float rounding.
"""

from __future__ import annotations

import os

import torch

from . import cpu_kernel, measured_choice, strategies, triton_path
from .expert_stack import ExpertStack
from .prototypes import PrototypeDecision
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
    if stack.num_experts * stack.r_max <= DENSE_MAX_COLUMNS or torch.compiler.is_compiling():
        return "dense"  # under torch.compile too: sorting needs each expert's count on the host, a graph break
    return "sorted"


def routed_forward(tokens: torch.Tensor, stack: ExpertStack, settings: RoutingSettings, strategy: str = "auto",
                   out: torch.Tensor | None = None,
                   decision: PrototypeDecision | None = None) -> tuple[torch.Tensor, Routes]:
    """Add every token's routed LoRA to ``out`` (in place) and return ``(out, routes)``.

    Accumulating into the base layer's output saves a full pass over a [T, d_out] tensor per layer.

    Args:
        tokens: [T, d_in] layer inputs, in the stack's dtype.
        stack: the layer's experts.
        settings: the routing rule.
        strategy: one of ``STRATEGIES``; ``"auto"`` picks the fastest that applies.
        out: [T, d_out] to add into (the base layer's output); zeros when None.
        decision: the prototype routers' bias and keep flags for these tokens and this stack's experts, or None.
    """
    if out is None:
        out = tokens.new_zeros(tokens.shape[0], stack.b_t.shape[-1])
    settings = settings.layer_rule
    keep = None if decision is None else decision.keep
    if keep is not None and bool(keep.all()):
        keep = None
    if tokens.shape[0] == 0 or (keep is not None and not bool(keep.any())):
        k = min(settings.top_k, stack.num_experts)
        ids = torch.zeros(tokens.shape[0], k, dtype=torch.long, device=tokens.device)
        return out, Routes(expert_ids=ids, weights=ids.to(tokens.dtype))  # no token takes an expert
    if keep is not None:  # a kept-out token's LoRA input is zero, so whatever it picks adds exactly nothing
        tokens = tokens * keep.unsqueeze(-1).to(tokens.dtype)
    bias = None if decision is None else decision.bias
    out, routes = _routed(tokens, stack, settings, strategy, out, bias)
    if keep is not None:
        routes = Routes(expert_ids=routes.expert_ids, weights=routes.weights * keep.unsqueeze(-1))
    return out, routes


def _routed(tokens: torch.Tensor, stack: ExpertStack, settings: RoutingSettings, strategy: str, out: torch.Tensor,
            bias: torch.Tensor | None) -> tuple[torch.Tensor, Routes]:
    strategy = _resolve(strategy, tokens, stack, settings, out, biased=bias is not None)
    if strategy == "triton":
        dense = stack.num_experts * stack.r_max <= DENSE_MAX_COLUMNS
        return triton_path.routed_forward(tokens, stack, settings, out, dense=dense)
    if strategy == "cpu_kernel":
        scores = strategies.biased_scores(tokens, stack, settings, bias)
        return out, cpu_kernel.routed_lora_(tokens, scores, stack, settings, out)
    if strategy == "dense":
        return strategies.dense(tokens, stack, settings, out, bias)
    if strategy == "gather":
        return strategies.gather(tokens, stack, settings, out, bias)
    if strategy in ("sorted", "padded", "grouped"):
        return strategies.sorted_pairs(tokens, stack, settings, out, layout=strategy, bias=bias)
    return strategies.loop(tokens, stack, settings, out, bias)


def _kernel_or_torch(tokens: torch.Tensor, stack: ExpertStack, settings: RoutingSettings, out: torch.Tensor, k: int,
                     biased: bool) -> str:
    """The CPU kernel or the PyTorch path's strategy, whichever measured faster for this shape (``measured_choice``)."""
    if not measured_choice.enabled():
        return "cpu_kernel"
    key = measured_choice.shape_key(tokens, stack.num_experts, stack.r_max, out.shape[-1], k) + (biased,)
    chosen = measured_choice.remembered(key)  # every call but the first of a shape: a dict lookup
    if chosen is not None:
        return chosen
    pytorch = choose_strategy(tokens.shape[0] * k, stack)
    bias = torch.zeros(tokens.shape[0], stack.num_experts, dtype=tokens.dtype) if biased else None
    candidates = {name: (lambda name=name: _routed(tokens, stack, settings, name, out.clone(), bias))
                  for name in ("cpu_kernel", pytorch)}
    return measured_choice.faster(key, candidates)


def _resolve(strategy: str, tokens: torch.Tensor, stack: ExpertStack, settings: RoutingSettings,
             out: torch.Tensor, biased: bool = False) -> str:
    """``auto`` and ``torch`` made concrete; a forced compiled kernel that cannot run raises.

    The Triton kernels score the tokens themselves and take no prototype bias: biased calls take the PyTorch path.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"Unknown routing strategy {strategy!r}; use one of {STRATEGIES}.")
    k = min(settings.top_k, stack.num_experts)
    if strategy == "triton" and biased:
        raise ValueError("The Triton kernels do not take the prototype routers' bias yet; use strategy 'auto'.")
    triton_wanted = BACKEND == "triton" or (BACKEND != "torch" and triton_path.applies(tokens, stack, k))
    if strategy == "auto" and triton_wanted and not biased:
        return "triton"
    if strategy == "auto" and cpu_kernel.supports(tokens, stack, out):
        return _kernel_or_torch(tokens, stack, settings, out, k, biased)
    if strategy == "cpu_kernel" and not cpu_kernel.supports(tokens, stack, out):
        raise ValueError("The CPU kernel takes float32 CPU tensors without autograd, a contiguous output and a C++ "
                         "compiler to build it (see the warning, if any); use strategy 'auto' or 'torch' otherwise.")
    if strategy in ("auto", "torch"):
        return choose_strategy(tokens.shape[0] * k, stack)
    return strategy
