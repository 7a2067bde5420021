"""Dispatch by measurement: the CPU kernel or the PyTorch path, whichever is faster here for this call's shape.

The kernel wins on some CPUs and loses on others (its register blocking suits AVX-512; on AVX2 it spills), and a
default tuned on one machine is wrong on the next. So ``auto`` times both paths on the first call of each shape
(tokens rounded up to a power of two, library size, rank, layer size, top-k), in this process, and keeps the faster
one. The timed calls write into scratch copies of the output, so the measurement changes no result.
``PEFT_ROUTING_MEASURE=0`` skips it (the kernel wherever it runs, as before).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import torch

REPEATS = 3  # timed calls per candidate, interleaved, after one warm-up each; the fastest call counts
_choices: dict[tuple, str] = {}


def enabled() -> bool:
    """False when PEFT_ROUTING_MEASURE=0 asks for the kernel wherever it runs, unmeasured."""
    return os.environ.get("PEFT_ROUTING_MEASURE", "1") != "0"


def shape_key(tokens: torch.Tensor, num_experts: int, r_max: int, d_out: int, k: int) -> tuple:
    """The call's shape as measured: tokens rounded up to a power of two, the rest exact."""
    num_tokens = max(1, tokens.shape[0])
    return 1 << (num_tokens - 1).bit_length(), num_experts, r_max, tokens.shape[1], d_out, k


def remembered(key: tuple) -> str | None:
    """The path chosen for ``key`` so far in this process, None before its first measurement."""
    return _choices.get(key)


def faster(key: tuple, candidates: dict[str, Callable[[], object]]) -> str:
    """The name of the fastest candidate for ``key``, measured on its first request and then remembered.

    Under torch.compile nothing is timed: the remembered choice, or the first candidate.
    """
    if key in _choices:
        return _choices[key]
    if torch.compiler.is_compiling():
        return next(iter(candidates))
    best: dict[str, float] = {}
    for run in candidates.values():
        run()  # warm-up: first-call costs (thread pool, caches) are not the path's
    for _ in range(REPEATS):
        for name, run in candidates.items():
            start = time.perf_counter()
            run()
            best[name] = min(best.get(name, float("inf")), time.perf_counter() - start)
    _choices[key] = min(best, key=best.__getitem__)
    return _choices[key]


def measured() -> dict[tuple, str]:
    """Every choice made so far in this process (shape key -> path), for benchmarks and diagnostics."""
    return dict(_choices)


def forget() -> None:
    """Measure again from the next call (after changing threads, say)."""
    _choices.clear()
