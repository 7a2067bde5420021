"""Triton kernels vs the PyTorch reference, run in a child process: under TRITON_INTERPRET=1 on CPU, or compiled on a
GPU with KERNEL_DEVICE=cuda.

An unmasked out-of-bounds load in the interpreter kills the whole process (on a GPU it may corrupt the context), so
tests/test_kernels.py runs this file in a subprocess and turns a crash into a test failure.
Usage: [KERNEL_DEVICE=cuda] python tests/kernel_checks.py CHECK [MAX_EXAMPLES]
"""

from __future__ import annotations

import math
import os
import sys

DEVICE = os.environ.get("KERNEL_DEVICE", "cpu")
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton and the kernels are imported

import torch  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from testing_utils import converted, random_stack  # noqa: E402

from peft_routing.kernels import launch  # noqa: E402
from peft_routing.ops import (  # noqa: E402
    RoutingSettings,
    route_scores,
    routed_forward,
    select_experts,
    standardize,
    triton_path,  # noqa: E402
)

MAX_EXAMPLES = int(sys.argv[2]) if len(sys.argv) > 2 else 12
SHIPPED_TALL_FROM = launch.TALL_FROM_TOKENS
SHIPPED_FUSED_MAX = launch.FUSED_MAX_TOKENS
SHIPPED_FUSED_BLOCK_N = launch.FUSED_BLOCK_N
COMPARED = []  # cases that reached a comparison (a check that compares nothing must fail)


def _stack(n, r_max, d_in, d_out, seed, dtype):
    stack = random_stack(n, r_max, d_in, d_out, seed, spare_slots=seed % 3)
    stack.vectors.mul_(4)  # spread the scores so that near-ties are rare
    stack.b_t.mul_(0.1)
    return converted(stack, device=DEVICE, dtype=dtype)


def _randn(rows, cols, seed) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def _margin_ok(tokens, vectors, routing) -> bool:
    scores = route_scores(tokens.float(), vectors.float(), routing.score_norm).sort(dim=-1, descending=True).values
    k = min(routing.top_k, vectors.shape[0])
    return k == vectors.shape[0] or tokens.shape[0] == 0 or bool((scores[:, k - 1] - scores[:, k] > 2e-5).all())


shapes = dict(
    n=st.integers(1, 64), r_max=st.integers(4, 32), d_in=st.integers(1, 70), d_out=st.integers(1, 70),
    # 2500 tokens reach the tall tiles; only compiled on a GPU (the interpreter would take minutes)
    tokens=st.sampled_from([1, 5, 33, 0] + ([2500] if DEVICE != "cpu" else [])), top_k=st.integers(1, 4),
    score_norm=st.sampled_from(["none", "standardize"]), mixing=st.sampled_from(["softmax", "sigmoid"]),
    dtype=st.sampled_from([torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE != "cpu" else [])),
    seed=st.integers(0, 10_000),
)


@settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(**shapes)
def check_route(n, r_max, d_in, d_out, tokens, top_k, score_norm, mixing, dtype, seed):
    stack = _stack(n, r_max, d_in, d_out, seed, torch.float32)
    routing = RoutingSettings(top_k=top_k, temperature=0.8, score_norm=score_norm, mixing=mixing)
    x = _randn(tokens, d_in, seed).to(dtype).float()
    if not _margin_ok(x, stack.vectors, routing):
        return
    if DEVICE != "cpu" and dtype != torch.float32:  # half tokens and vectors: the kernel's tensor-core path
        x, vectors = x.to(dtype), stack.vectors.to(dtype)
        if not _margin_ok(x, vectors, routing):
            return
    else:
        vectors = stack.vectors
    scored_x, scored_v, scale = x, vectors, 1.0
    if score_norm == "standardize":  # the caller standardises, the kernel scores
        scored_x, scored_v, scale = standardize(x.float()), standardize(vectors.float()), 1.0 / math.sqrt(d_in)
    ids, weights = launch.route(scored_x, scored_v, top_k, 0.8, mixing == "sigmoid", scale)
    want = select_experts(route_scores(x.float(), vectors.float(), score_norm), routing)
    assert torch.equal(ids, want.expert_ids), (ids, want.expert_ids)
    torch.testing.assert_close(weights, want.weights, atol=1e-5, rtol=1e-4)
    COMPARED.append(tokens)


def _check_lora(dense: bool | None, n, r_max, d_in, d_out, tokens, top_k, score_norm, mixing, dtype, seed, tall):
    """dense None: the fused kernel, for every token count; else the dense or sorted path, for every token count."""
    launch.TALL_FROM_TOKENS = 0 if tall else SHIPPED_TALL_FROM  # both tile sets, whatever the token count
    launch.FUSED_MAX_TOKENS = 10**9 if dense is None else -1
    stack = _stack(n, r_max, d_in, d_out, seed, dtype)
    routing = RoutingSettings(top_k=top_k, temperature=0.8, score_norm=score_norm, mixing=mixing)
    x = _randn(tokens, d_in, seed).to(dtype)
    if not _margin_ok(x, stack.vectors, routing):
        return
    base = _randn(tokens, d_out, seed + 1)
    float_stack = converted(stack, dtype=torch.float32)
    want, want_routes = routed_forward(x.float(), float_stack, routing, "loop", out=base.clone())
    got, routes = triton_path.routed_forward(x.float(), float_stack, routing, base.clone(), dense=bool(dense))
    torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)
    assert torch.equal(routes.expert_ids, want_routes.expert_ids)
    torch.testing.assert_close(routes.weights, want_routes.weights.float(), atol=1e-5, rtol=1e-4)
    if DEVICE != "cpu" and dtype != torch.float32:  # half inputs, weights and output (the interpreter is fp32-only)
        got, _ = triton_path.routed_forward(x, stack, routing, base.to(dtype), dense=bool(dense))
        tolerance = 2e-2 * (1 + want.abs().amax().item() if want.numel() else 1)
        torch.testing.assert_close(got.float(), want, atol=tolerance, rtol=2e-2)
    COMPARED.append(tokens)


@settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(**shapes, tall=st.booleans())
def check_sorted(**case):
    _check_lora(False, **case)


@settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(**shapes, tall=st.booleans())
def check_dense(**case):
    _check_lora(True, **case)


@settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(**shapes, tall=st.just(False), split=st.sampled_from([2, 3, 1]))
def check_fused(split, **case):
    """The fused decode kernel, its output columns (in steps of 16) split over 1, 2 or many programs per token."""
    launch.FUSED_PROGRAMS = split * max(1, case["tokens"])
    launch.FUSED_BLOCK_N = 16  # so that d_out up to 70 spans several steps and shares
    _check_lora(None, **case)
    launch.FUSED_BLOCK_N = SHIPPED_FUSED_BLOCK_N


def check_fused_shapes():
    """Fixed fused cases the drawn ones miss: top-k up to 8, rank 128, 300 experts, many output shares, NaN."""
    launch.FUSED_MAX_TOKENS = 10**9
    for n, r_max, top_k, d_out, split in ((20, 128, 8, 3 * SHIPPED_FUSED_BLOCK_N + 5, 2), (300, 8, 3, 40, 64),
                                          (5, 7, 5, 2 * SHIPPED_FUSED_BLOCK_N + 1, 3)):
        launch.FUSED_PROGRAMS = split * 3
        _check_lora(None, n, r_max, 24, d_out, 3, top_k, "none", "softmax", torch.float32, n, False)
    stack = _stack(6, 4, 8, 20, 1, torch.float32)
    x = torch.full((2, 8), float("nan"), device=DEVICE)
    _, routes = triton_path.routed_forward(x, stack, RoutingSettings(top_k=2), _randn(2, 20, 3), dense=False)
    assert bool((routes.expert_ids >= 0).all() and (routes.expert_ids < 6).all()), routes.expert_ids
    COMPARED.append(2)


def check_align():
    for n, pairs in ((1, 0), (1, 7), (5, 40), (64, 130), (3, 1), (256, 700), (17, 1000)):
        ids = torch.randint(0, n, (pairs,), generator=torch.Generator().manual_seed(pairs)).to(DEVICE)
        block_m = launch.SMALL.m
        sorted_pairs, block_expert = launch.align(ids.view(-1, 1), n, block_m)
        counts = torch.bincount(ids, minlength=n)
        padded = (counts + block_m - 1) // block_m * block_m
        assert int((block_expert >= 0).sum()) * block_m == int(padded.sum())  # the used rows
        assert sorted_pairs.numel() >= pairs + n * (block_m - 1)
        real = sorted_pairs[sorted_pairs < pairs]
        assert sorted(real.tolist()) == list(range(pairs))  # every pair exactly once
        for block, expert in enumerate(block_expert.tolist()):
            rows = sorted_pairs[block * block_m : (block + 1) * block_m]
            members = rows[rows < pairs]
            if expert < 0:
                assert members.numel() == 0
            else:
                assert bool((ids[members] == expert).all())
        real_in_order = sorted_pairs[sorted_pairs < pairs]
        assert torch.equal(ids[real_in_order], ids[real_in_order].sort(stable=True).values)  # grouped by expert
        assert torch.equal(real_in_order, ids.sort(stable=True).indices)  # and stable within an expert
        COMPARED.append(pairs)


def check_model():
    """A whole routed model: the Triton strategy gives the logits of the PyTorch reference loop."""
    from testing_utils import make_library, token_batch

    for (n, top_k), fused_max in zip(((3, 1), (6, 2), (40, 2), (40, 2)), (SHIPPED_FUSED_MAX, -1, -1, 10**9)):
        launch.FUSED_MAX_TOKENS = fused_max  # the fused kernel (decode-sized calls), then the unfused kernels
        model = make_library("llama", n_experts=n, ranks=[4, 8], seed=n).to(DEVICE)
        model.set_phase("route", top_k=top_k)
        ids = token_batch(2, 5, seed=n).to(DEVICE)
        with torch.no_grad():
            model.set_routing_strategy("loop")
            want = model(input_ids=ids).logits
            model.set_routing_strategy("triton")
            got = model(input_ids=ids).logits
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        COMPARED.append(n)


def check_compiled():
    """torch.compile(fullgraph=True) of a routed model on the Triton strategy: no graph break, the eager logits."""
    from testing_utils import make_library, token_batch

    torch._dynamo.reset()
    model = make_library("llama", n_experts=6, ranks=[4, 8], seed=6).to(DEVICE)
    model.set_phase("route", top_k=2)
    model.set_routing_strategy("triton")
    ids = token_batch(2, 5, seed=6).to(DEVICE)
    with torch.no_grad():
        want = model(input_ids=ids).logits
        got = torch.compile(model, fullgraph=True)(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    COMPARED.append(6)


def check_opcheck():
    """The custom op's declared mutation of ``out`` and its fake kernel (torch.compile traces with it) match the op."""
    stack = _stack(5, 4, 20, 70, 9, torch.float32)
    x = _randn(6, 20, 1)
    for dense, fused_max in ((False, -1), (True, -1), (False, SHIPPED_FUSED_MAX)):
        launch.FUSED_MAX_TOKENS = fused_max
        args = (_randn(6, 70, 2), x, x, stack.vectors.contiguous(), stack.a, stack.b_t, stack.scales, 2, 0.8, False,
                1.0, dense)
        torch.library.opcheck(launch.triton_routed_lora_, args)
        COMPARED.append(dense + 1)


if __name__ == "__main__":
    checks = {"route": check_route, "sorted": check_sorted, "dense": check_dense, "fused": check_fused,
              "fused_shapes": check_fused_shapes,
              "align": check_align,
              "model": check_model, "compiled": check_compiled, "opcheck": check_opcheck}
    checks[sys.argv[1]]()
    nonempty = sum(1 for t in COMPARED if t)
    assert nonempty >= max(1, len(COMPARED) // 3), f"only {nonempty} non-empty cases were compared: {COMPARED}"
    print(f"compared {len(COMPARED)} cases ({nonempty} non-empty)")
    print("ok")
