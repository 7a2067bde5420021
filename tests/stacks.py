"""Random ExpertStacks for the strategy and kernel tests (shared by tests/test_*.py and tests/kernel_checks.py)."""

from __future__ import annotations

import torch

from peft_routing.expert_stack import ExpertStack


def random_stack(n: int, r_max: int, d_in: int, d_out: int, seed: int, dtype: torch.dtype = torch.float32,
                 ranks: list[int] | None = None, spare_slots: int = 0) -> ExpertStack:
    """n experts with standard normal vectors, A and B and scales in [0.5, 1.5). Expert j has rank ranks[j] (zero
    rows above it, as ExpertStack.build pads them); spare_slots free slots of garbage follow the experts, as a
    stack that has room to grow has."""
    g = torch.Generator().manual_seed(seed)
    slots = n + spare_slots
    vectors = torch.randn(slots, d_in, generator=g)
    a = torch.randn(slots, r_max, d_in, generator=g)
    b_t = torch.randn(slots, r_max, d_out, generator=g)
    scales = torch.rand(slots, generator=g) + 0.5
    for j, r in enumerate(ranks or []):
        a[j, r:] = 0
        b_t[j, r:] = 0
    return ExpertStack([f"e{i}" for i in range(n)], *(t.to(dtype) for t in (vectors, a, b_t, scales)))


def converted(stack: ExpertStack, **place) -> ExpertStack:
    """The same experts in another dtype and/or device (``place``: keyword arguments of Tensor.to)."""
    return ExpertStack(stack.names, stack.vectors.to(**place), stack.a.to(**place), stack.b_t.to(**place),
                       stack.scales.to(**place))
