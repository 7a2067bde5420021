"""The compiled CPU kernel (peft_routing/csrc/routed_lora.cpp) against the equations written out by hand."""

from __future__ import annotations

import shutil
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import ExpertTensors, routed_delta, score_margin, token_scores
from testing_utils import converted, random_stack

from peft_routing.ops import RoutingSettings, cpu_kernel, routed_forward, select_experts, stack_scores

pytestmark = pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                                reason="no C++ compiler: the CPU kernel cannot be built here")


def _stack(n, r_max, d_in, d_out, seed, ranks=None):
    return random_stack(n, r_max, d_in, d_out, seed, ranks=ranks, spare_slots=seed % 3)


def _experts(stack):
    return [ExpertTensors(A=stack.a[j], B=stack.b_t[j].t(), v=stack.vectors[j], s=float(stack.scales[j]))
            for j in range(stack.num_experts)]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 64),
    r_max=st.sampled_from([1, 4, 5, 16, 32]),
    d_in=st.sampled_from([1, 7, 16, 17, 100]),  # below, at and past one 16-float vector; a ragged tail
    d_out=st.sampled_from([1, 63, 64, 65, 130]),  # around the 64-column expand step
    tokens=st.sampled_from([1, 2, 5, 33]),
    top_k=st.integers(1, 4),
    score_norm=st.sampled_from(["none", "standardize"]),
    mixing=st.sampled_from(["softmax", "sigmoid"]),
    seed=st.integers(0, 1000),
)
def test_kernel_equals_the_equations(n, r_max, d_in, d_out, tokens, top_k, score_norm, mixing, seed):
    stack = _stack(n, r_max, d_in, d_out, seed, ranks=[1 + (j * 7) % r_max for j in range(n)])
    routing = RoutingSettings(top_k=top_k, temperature=0.7, score_norm=score_norm, mixing=mixing)
    x = torch.randn(tokens, d_in, generator=torch.Generator().manual_seed(seed + 1))
    base = torch.randn(tokens, d_out, generator=torch.Generator().manual_seed(seed + 2))
    got, _ = routed_forward(x, stack, routing, "cpu_kernel", out=base.clone())
    experts = _experts(stack)
    for t in range(tokens):
        if score_margin(token_scores(x[t], experts, score_norm), top_k) < 1e-4:
            continue  # float32 scores may order a near-tie either way
        want = base[t].double() + routed_delta(x[t], experts, top_k, 0.7, score_norm, mixing)
        torch.testing.assert_close(got[t].double(), want, atol=1e-4 * (1 + want.abs().max().item()), rtol=1e-4)


@pytest.mark.parametrize("mixing", ["softmax", "sigmoid"])
def test_routes_are_select_experts_own_on_ties_and_non_finite_scores(mixing):
    stack = _stack(6, 4, 8, 8, 3)
    routing = RoutingSettings(top_k=3, temperature=0.5, mixing=mixing)
    scores = torch.tensor([
        [1.0, 2.0, 2.0, 0.5, 2.0, -1.0],  # a three-way tie: the lower indices first, as torch.max
        [0.0, float("nan"), 1.0, float("nan"), 3.0, 2.0],  # NaN ranks above every number (torch.max)
        [float("inf"), 1.0, float("inf"), 0.0, -2.0, 5.0],
        [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
    ])
    x = torch.randn(scores.shape[0], 8)
    routes = cpu_kernel.routed_lora_(x, scores, stack, routing, torch.zeros(scores.shape[0], 8))
    want = select_experts(scores, routing)
    assert torch.equal(routes.expert_ids, want.expert_ids)
    torch.testing.assert_close(routes.weights, want.weights, equal_nan=True)
    # a row of -inf: k distinct experts, the lowest indices
    dead_scores = torch.full((1, 6), float("-inf"))
    dead = cpu_kernel.routed_lora_(x[:1], dead_scores, stack, routing, torch.zeros(1, 8))
    assert dead.expert_ids.tolist() == [[0, 1, 2]] == select_experts(dead_scores, routing).expert_ids.tolist()


def test_skewed_routing_and_thread_counts_give_the_same_result():
    """Every token to one expert (long runs of one expert's blocks); 1 and 2 threads split work differently."""
    stack = _stack(8, 16, 96, 200, 4)
    stack.vectors[5].mul_(100.0)
    x = torch.randn(300, 96, generator=torch.Generator().manual_seed(5)).abs()
    stack.vectors[5].copy_(stack.vectors[5].abs())
    routing = RoutingSettings(top_k=2)
    results = []
    threads = torch.get_num_threads()
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            results.append(routed_forward(x, stack, routing, "cpu_kernel", out=torch.zeros(300, 200)))
    finally:
        torch.set_num_threads(threads)
    (one, routes), (two, _) = results
    assert bool((routes.expert_ids[:, 0] == 5).all())
    assert torch.equal(one, two)
    want, _ = routed_forward(x, stack, routing, "loop", out=torch.zeros(300, 200))
    torch.testing.assert_close(one, want, atol=1e-3, rtol=1e-4)


def test_auto_uses_the_kernel_only_where_it_applies(monkeypatch):
    monkeypatch.setenv("PEFT_ROUTING_MEASURE", "0")  # where it applies, unmeasured (measuring: the next test)
    stack = _stack(4, 4, 16, 16, 6)
    x = torch.randn(5, 16)
    routing = RoutingSettings(top_k=2)
    calls = []
    monkeypatch.setattr(cpu_kernel, "routed_lora_", lambda *args: calls.append(1) or select_experts(
        stack_scores(args[0], stack, "none"), routing))
    routed_forward(x, stack, routing, "auto")
    assert calls == [1]
    routed_forward(x.double(), _double(stack), routing, "auto")  # float64: the PyTorch path
    routed_forward(x, stack, routing, "torch")
    routed_forward(x.requires_grad_(), stack, routing, "auto")  # autograd: the kernel has no backward
    assert calls == [1]
    monkeypatch.setenv("PEFT_ROUTING_CPU_KERNEL", "0")
    routed_forward(x.detach(), stack, routing, "auto")
    assert calls == [1]
    with pytest.raises(ValueError, match="CPU kernel takes float32"):
        routed_forward(x.detach(), stack, routing, "cpu_kernel")


def _double(stack):
    return converted(stack, dtype=torch.float64)


def test_a_failed_build_warns_once_and_the_pytorch_path_runs(monkeypatch):
    import torch.utils.cpp_extension

    def no_compiler(**kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", no_compiler)
    cpu_kernel.is_built.cache_clear()
    try:
        stack = _stack(4, 4, 16, 16, 7)
        x = torch.randn(5, 16)
        with pytest.warns(RuntimeWarning, match="could not build its CPU kernel"):
            got, _ = routed_forward(x, stack, RoutingSettings(top_k=2), "auto")
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # once: no second warning
            routed_forward(x, stack, RoutingSettings(top_k=2), "auto")
        want, _ = routed_forward(x, stack, RoutingSettings(top_k=2), "loop")
        torch.testing.assert_close(got, want)
    finally:
        cpu_kernel.is_built.cache_clear()


def test_bad_operands_get_a_clear_error():
    assert cpu_kernel.is_built()
    stack = _stack(4, 4, 16, 16, 8)
    with pytest.raises(RuntimeError, match="out must be a contiguous float32 CPU tensor"):
        torch.ops.peft_routing.routed_lora_(torch.zeros(3, 16, dtype=torch.float64), torch.zeros(3, 16),
                                            torch.zeros(3, 4), stack.a, stack.b_t, stack.scales, 2, False, 1.0)
    with pytest.raises(RuntimeError, match="shapes do not match"):
        torch.ops.peft_routing.routed_lora_(torch.zeros(3, 16), torch.zeros(3, 16), torch.zeros(3, 5), stack.a,
                                            stack.b_t, stack.scales, 2, False, 1.0)


def test_op_schema_and_fake_kernel_pass_torch_opcheck():
    """The declared mutation of ``out`` and the fake kernel (torch.compile traces with it) match the real op."""
    assert cpu_kernel.is_built()
    stack = _stack(5, 4, 20, 70, 9)
    args = (torch.zeros(6, 70), torch.randn(6, 20), torch.randn(6, 5), stack.a, stack.b_t, stack.scales, 2, True, 1.0)
    torch.library.opcheck(torch.ops.peft_routing.routed_lora_.default, args)


def test_the_first_build_says_so_on_the_terminal_and_a_cached_one_is_silent(monkeypatch, tmp_path, capsys):
    import torch.utils.cpp_extension

    assert cpu_kernel.ready()  # the real build, so that the op is registered
    monkeypatch.setattr(torch.utils.cpp_extension, "load", lambda **kwargs: None)
    monkeypatch.setattr(cpu_kernel, "build_directory", lambda name=None: tmp_path)
    cpu_kernel.is_built.cache_clear()
    try:
        assert cpu_kernel.is_built()
        said = capsys.readouterr().err
        assert "compiling the CPU kernel" in said and "build-kernel" in said and "CPU kernel ready" in said
        (tmp_path / f"{cpu_kernel._build_name()}.so").touch()
        cpu_kernel.is_built.cache_clear()
        assert cpu_kernel.is_built() and capsys.readouterr().err == ""
    finally:
        cpu_kernel.is_built.cache_clear()


def test_build_kernel_command_builds_ahead(capsys):
    from peft_routing.cli import main

    assert main(["build-kernel"]) == 0
    assert str(cpu_kernel.build_directory()) in capsys.readouterr().out


@pytest.mark.parametrize("slow", ["cpu_kernel", "dense"])
def test_auto_keeps_the_path_that_measured_faster_and_adds_the_delta_once(monkeypatch, slow):
    import time

    from peft_routing.ops import measured_choice, strategies

    monkeypatch.setattr(measured_choice, "_choices", {})
    stack = _stack(4, 4, 16, 16, 11)  # 4 experts x r 4: the PyTorch path's choice is dense
    x, base = torch.randn(12, 16), torch.randn(12, 16)  # 24 pairs: dense, not gather
    routing = RoutingSettings(top_k=2)
    module = cpu_kernel if slow == "cpu_kernel" else strategies
    real, calls = getattr(module, "routed_lora_" if slow == "cpu_kernel" else "dense"), []

    def slowed(*args, **kwargs):
        calls.append(1)
        time.sleep(0.01)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "routed_lora_" if slow == "cpu_kernel" else "dense", slowed)
    got, _ = routed_forward(x, stack, routing, "auto", out=base.clone())
    want, _ = routed_forward(x, stack, routing, "loop", out=base.clone())
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)  # the timed calls wrote into scratch copies
    chosen = set(measured_choice.measured().values())
    assert chosen == {"dense" if slow == "cpu_kernel" else "cpu_kernel"}, measured_choice.measured()
    measured_calls = len(calls)
    routed_forward(x[:9], stack, routing, "auto", out=base[:9].clone())  # 9 tokens round up to 16, as 12 do
    assert len(calls) == measured_calls  # remembered, not measured again, and the slow path not taken


@pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() != "AVX512" or cpu_kernel.isa() != "native",
                    reason="without AVX-512 the native build already is the 8-float variant")
def test_the_8_float_variant_equals_the_equations_too():
    """An AVX-512 machine builds the AVX2 variant (PEFT_ROUTING_CPU_ISA=avx2) and runs the kernel tests on it."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = dict(os.environ, PEFT_ROUTING_CPU_ISA="avx2")
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__)),
                           "-k", "kernel_equals_the_equations or ties or bad_operands or opcheck"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0 and " passed" in done.stdout, done.stdout[-3000:] + done.stderr[-2000:]
