"""Route-phase speed and memory against PEFT's own multi-LoRA options, measured side by side in one run.

Setup (issue 3): a Llama-like model, hidden 1024, intermediate 2816, 4 layers, all 7 projections adapted, r=16,
512 tokens, fp32, 2 threads. The forward computes logits for the last position only (``logits_to_keep=1``) so the
LM head does not dilute the ratios. Every timed system runs in the same loop, in shuffled order, repeat after
repeat; a ratio is the median over repeats of (system time / base time of the same repeat), which cancels most of
the machine's noise. Peak memory is the peak RSS of a fresh process that builds one system and runs one forward.

    python benchmarks/routing_speed.py            # full run (~12 min on 2 cores) -> results/routing_speed.json
    python benchmarks/routing_speed.py --quick    # a smoke run on a smaller model
    python benchmarks/routing_speed.py --parts calls   # each strategy on the model's own layer calls (~5 min)
    python benchmarks/routing_speed.py --parts compiled   # torch.compile of base and ours, with compile times
    python benchmarks/routing_speed.py --device cuda --dtype bfloat16 [--batch 8]   # on a GPU: Triton vs PyTorch path
    python benchmarks/routing_speed.py --device cuda --dtype bfloat16 --parts whole --hidden 4096 \
        --intermediate 14336 --tokens 4096 --sizes 8,64   # a 7B model's layer sizes

``ours`` is the default dispatch (on a CPU the compiled C++ kernel, on a GPU the Triton kernels) and ``ours_torch``
the PyTorch path on the same model. On a GPU peak memory is torch.cuda.max_memory_allocated in this process
instead of a child's RSS.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import peft_routing  # noqa: E402,F401
from peft_routing import LLAMA_PROJECTIONS, RoutingLoraConfig  # noqa: E402
from peft_routing.ops import (
    ExpertStack,  # noqa: E402
    RoutingSettings,  # noqa: E402
    routed_forward,  # noqa: E402
)

TARGETS = LLAMA_PROJECTIONS
RESULTS = Path(__file__).resolve().parent / "results"
ALL_PARTS = ("layer", "whole", "routers", "decode", "prefill", "calls", "compiled")


@dataclass
class Setup:
    hidden: int = 1024
    intermediate: int = 2816
    layers: int = 4
    tokens: int = 512
    rank: int = 16
    reps: int = 7
    library_sizes: tuple = (1, 8, 64, 256)
    peft_sizes: tuple = (8, 32)
    decode_experts: int = 64
    decode_tokens: int = 32
    batch: int = 1  # sequences of `tokens` tokens per forward
    device: str = "cpu"
    dtype: str = "float32"

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def place(self, module):
        """Build on CPU in fp32, then move: PEFT would otherwise up-cast half adapters to fp32 when they are added."""
        return module.to(self.device, self.torch_dtype)


QUICK = Setup(hidden=256, intermediate=704, layers=2, tokens=128, reps=3, library_sizes=(1, 8, 64),
              peft_sizes=(8,), decode_experts=8, decode_tokens=8)


def base_model(setup: Setup) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=8192, hidden_size=setup.hidden, intermediate_size=setup.intermediate,
                         num_hidden_layers=setup.layers, num_attention_heads=setup.hidden // 64,
                         num_key_value_heads=setup.hidden // 64, max_position_embeddings=4096)
    return setup.place(LlamaForCausalLM(config).eval())


def _randomize(model, scale: float = 0.02) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_" in name:
                param.normal_(0, scale)


def peft_lora(base, setup: Setup, n: int):
    """PEFT's LoRA with n adapters active at once (summed)."""
    def config():
        return LoraConfig(r=setup.rank, lora_alpha=2 * setup.rank, target_modules=TARGETS)

    model = get_peft_model(base, config(), adapter_name="a0")
    for i in range(1, n):
        model.add_adapter(f"a{i}", config())
    model.base_model.set_adapter([f"a{i}" for i in range(n)])
    _randomize(model)
    return model.eval()


def peft_arrow(base, setup: Setup, n: int, top_k: int = 2):
    """PEFT's Arrow router over n LoRA experts (training-free routing, every expert computed densely)."""
    from peft import ArrowConfig, create_arrow_model

    folder = Path(tempfile.mkdtemp(prefix="arrow-"))
    donor = peft_lora(copy.deepcopy(base), setup, 1)
    paths = []
    for i in range(n):
        _randomize(donor)
        donor.save_pretrained(folder / f"e{i}")
        paths.append(str(folder / f"e{i}" / "a0"))
    return create_arrow_model(base, paths, ArrowConfig(top_k=top_k, router_temperature=1.0)).eval()


def ours(base, setup: Setup, n: int, top_k: int = 2):
    def config():
        return RoutingLoraConfig(r=setup.rank, lora_alpha=2 * setup.rank, target_modules=TARGETS, top_k=top_k)

    model = get_peft_model(base, config(), adapter_name="e0")
    for i in range(1, n):
        model.add_adapter(f"e{i}", config())
    _randomize(model)
    model.set_phase("route", top_k=top_k)
    return model.eval()


def forward_fn(model, ids):
    def run():
        with torch.no_grad():
            model(input_ids=ids, logits_to_keep=1)
        _synchronize(ids.device)

    return run


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_side_by_side(systems: dict, reps: int) -> dict[str, dict]:
    """Median ratio to 'base' over repeats, each repeat running every system once in shuffled order.

    A system is a callable, or a (prepare, run) pair whose untimed ``prepare`` switches a shared model's settings.
    """
    systems = {name: fn if isinstance(fn, tuple) else (lambda: None, fn) for name, fn in systems.items()}
    for prepare, run in systems.values():
        prepare()
        run()  # warm-up
    times = {name: [] for name in systems}
    order = list(systems)
    for _ in range(reps):
        random.shuffle(order)
        for name in order:
            prepare, run = systems[name]
            prepare()
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {
        name: {
            "ms": statistics.median(t) * 1e3,
            "ratio": statistics.median(a / b for a, b in zip(t, times["base"])),
        }
        for name, t in times.items()
    }


def build_system(name: str, setup: Setup):
    base = base_model(replace(setup, device="cpu", dtype="float32"))
    kind, _, rest = name.partition(":")
    if kind == "base":
        return setup.place(base)
    n, _, k = rest.partition(",k=")
    n = int(n.removeprefix("N="))
    if kind == "peft_lora":
        return setup.place(peft_lora(base, setup, n))
    if kind == "peft_arrow":
        return setup.place(peft_arrow(base, setup, n, int(k)))
    return setup.place(ours(base, setup, n, int(k)))


BUILT: dict = {}  # name -> model, so that decode and the GPU memory figures reuse the timed models
CUDA_PEAK_MIB: dict = {}  # name -> peak allocated while building it and running one forward, minus what was there


def built(name: str, setup: Setup):
    if name not in BUILT:
        if setup.device == "cuda":
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        BUILT[name] = build_system(name, setup)
        if setup.device == "cuda":
            forward_fn(BUILT[name], _token_ids(setup, setup.tokens, seed=0))()
            CUDA_PEAK_MIB[name] = (torch.cuda.max_memory_allocated() - before) / 2**20
    return BUILT[name]


def whole_model(setup: Setup) -> dict:
    names = ["base", "peft_lora:N=1"]
    names += [f"peft_lora:N={n}" for n in setup.peft_sizes] + [f"peft_arrow:N={n},k=2" for n in setup.peft_sizes]
    ids = _token_ids(setup, setup.tokens, seed=0)
    systems = {}
    for name in names:
        systems[name] = forward_fn(built(name, setup), ids)
    for n in setup.library_sizes:  # one model per library size; k and the strategy are switched per timed closure
        model = built(f"ours:N={n},k=2", setup)
        for k in (1, 2):
            for label, strategy in _our_strategies(setup):
                systems[f"{label}:N={n},k={k}"] = _with_routing(model, k, strategy, forward_fn(model, ids))
    if setup.device == "cuda":
        systems.update(_graphed_systems(setup, ids))
    timed = time_side_by_side(systems, setup.reps)
    for name, row in timed.items():  # a replayed graph is compared with the replayed base graph (ratio of medians)
        if name.startswith("graph:") and "graph:base" in timed:
            row["ratio"] = row["ms"] / timed["graph:base"]["ms"]
    return timed


ROUTER_RULES = {  # the prototype routers against the token rule, top-2; floors of -1 keep every token routed
    "token": dict(router="token"),
    "prototype": dict(router="prototype", fallback="base"),
    "token+prototype": dict(router="token+prototype", prototype_candidates=2, fallback="base"),
    "token+prototype,prior": dict(router="token+prototype", prototype_prior=1.0),
    "prototype,prompt": dict(router="prototype", fallback="base", prototype_pooling="prompt"),
    "token+prototype,prompt": dict(router="token+prototype", prototype_candidates=2, fallback="base",
                                   prototype_pooling="prompt"),
    "prototype,prompt,last": dict(router="prototype", fallback="base", prototype_pooling="prompt"),
}
LAST_FEATURE = {"prototype,prompt,last"}  # rules over prototypes of the prompt's last position (else causal_mean)


def routers(setup: Setup) -> dict:
    """Whole-model cost of each router at N = 8 and 64 (the sizes among setup.library_sizes), side by side."""
    ids = _token_ids(setup, setup.tokens, seed=0)
    systems = {"base": forward_fn(built("base", setup), ids)}
    for n in [n for n in setup.library_sizes if n in (8, 64)] or setup.library_sizes[-1:]:
        model = built(f"ours:N={n},k=2", setup)
        for label, rule in ROUTER_RULES.items():
            full = asdict(RoutingSettings(top_k=2)) | rule
            feature = "last" if label in LAST_FEATURE else "causal_mean"

            def prepare(model=model, full=full, feature=feature):
                _random_prototypes(model, feature)
                model.set_phase("route", **full)
                model.set_routing_strategy("auto")

            systems[f"{label}:N={n},k=2"] = (prepare, forward_fn(model, ids))
    return time_side_by_side(systems, setup.reps)


def compiled(setup: Setup) -> dict:
    """torch.compile (inductor, default mode) of the base model and of ours at N = 8 / 64, top-2, next to eager;
    each compiled row also records its compile time (the first call)."""
    ids = _token_ids(setup, setup.tokens, seed=0)
    names = ["base"] + [f"ours:N={n},k=2" for n in setup.library_sizes if n in (8, 64)]
    systems, compile_seconds = {}, {}
    for name in names:
        model = built(name, setup)
        if name != "base":
            model.set_phase("route", top_k=2)
            model.set_routing_strategy("auto")
        systems[name] = forward_fn(model, ids)
        compiled_model = torch.compile(model)
        start = time.perf_counter()
        forward_fn(compiled_model, ids)()
        compile_seconds[f"compiled:{name}"] = time.perf_counter() - start
        systems[f"compiled:{name}"] = forward_fn(compiled_model, ids)
    timed = time_side_by_side(systems, setup.reps)
    for name, seconds in compile_seconds.items():
        timed[name]["compile_s"] = seconds
    return timed


def _print_compiled(timed: dict) -> None:
    print("\ntorch.compile (inductor) against eager, whole model, top-2")
    print(f"{'system':<26}{'ms':>9}{'x base':>9}{'x compiled base':>17}{'compile s':>11}")
    for name, row in timed.items():
        versus = row["ms"] / timed["compiled:base"]["ms"]
        compile_s = f"{row['compile_s']:>11.1f}" if "compile_s" in row else ""
        print(f"{name:<26}{row['ms']:>9.1f}{row['ratio']:>9.3f}{versus:>17.3f}{compile_s}")


def _random_prototypes(model, feature: str = "causal_mean") -> None:
    from peft_routing.tuner.prototype import Prototype

    generator = torch.Generator().manual_seed(0)
    tuner = model.base_model
    width = tuner.model.config.hidden_size
    for name in tuner.experts:
        vector = torch.nn.functional.normalize(torch.randn(width, generator=generator), dim=0)
        tuner.set_prototype(name, Prototype(vector, 0, -1.0, 128, feature))


def _graphed_systems(setup: Setup, ids: torch.Tensor) -> dict:
    """CUDA-graph replays of base and of ours on the Triton path (no host syncs, so capturable): the launch-free
    cost of the kernels, which eager mode hides behind Python and launch overhead at these small shapes."""
    systems = {}
    for name in ["base"] + [f"ours:N={n},k=2" for n in setup.library_sizes]:
        model = built(name, setup)
        if name != "base":
            model.set_phase("route", top_k=2)
            model.set_routing_strategy("triton")
        try:
            systems[f"graph:{name}"] = _graph_replay(model, ids)
        except Exception as error:  # noqa: BLE001 - a capture failure is a finding to print, not a crash
            print(f"CUDA graph capture failed for {name}: {type(error).__name__}: {str(error)[:300]}", flush=True)
    return systems


def _graph_replay(model, ids: torch.Tensor):
    static_ids = ids.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        for _ in range(3):
            model(input_ids=static_ids, logits_to_keep=1)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        model(input_ids=static_ids, logits_to_keep=1)

    def replay(inputs=static_ids):  # the graph reads the static input's memory: keep it alive with the closure
        graph.replay()
        torch.cuda.synchronize()

    return replay


def _token_ids(setup: Setup, length: int, seed: int) -> torch.Tensor:
    ids = torch.randint(0, 8192, (setup.batch, length), generator=torch.Generator().manual_seed(seed))
    return ids.to(setup.device)


def _our_strategies(setup: Setup) -> list[tuple[str, str]]:
    """(label, strategy): the default dispatch (on a GPU the Triton kernels; on a CPU the C++ kernel or the PyTorch
    path, whichever measured faster per shape), the PyTorch path and, on a CPU, the C++ kernel forced."""
    kernel = [("ours_kernel", "cpu_kernel")] if setup.device == "cpu" else []
    return [("ours", "auto"), ("ours_torch", "torch"), *kernel]


def _with_routing(model, k: int, strategy: str, run) -> tuple:
    """(prepare, run): the switch of top_k and strategy on the shared model is not timed."""
    def prepare():
        model.set_phase("route", top_k=k)
        model.set_routing_strategy(strategy)

    return prepare, run


DECODE_BATCHES = (1, 8, 16)
PREFILL_TOKENS = 2048


def decode(setup: Setup) -> dict:
    """Per-token latency of greedy generation with the KV cache at batch 1 / 8 / 16: base, one PEFT LoRA, and ours
    (N experts, k=2), each batch timed side by side."""
    n = setup.decode_experts
    routed = built(f"ours:N={n},k=2", setup)
    by_batch = {}
    for batch in DECODE_BATCHES:
        prompt = torch.randint(0, 8192, (batch, 16), generator=torch.Generator().manual_seed(1)).to(setup.device)

        def generate(model, prompt=prompt):
            def run():
                with torch.no_grad():
                    model.generate(input_ids=prompt, max_new_tokens=setup.decode_tokens,
                                   min_new_tokens=setup.decode_tokens, do_sample=False, pad_token_id=0)
                _synchronize(prompt.device)
            return run

        systems = {"base": generate(built("base", setup)), "peft_lora:N=1": generate(built("peft_lora:N=1", setup))}
        for label, strategy in _our_strategies(setup):
            systems[f"{label}:N={n},k=2"] = _with_routing(routed, 2, strategy, generate(routed))
        timed = time_side_by_side(systems, max(3, setup.reps // 2))
        for row in timed.values():
            row["ms_per_token"] = row["ms"] / setup.decode_tokens
        by_batch[f"batch={batch}"] = timed
    return by_batch


def prefill(setup: Setup) -> dict:
    """One forward of a PREFILL_TOKENS-token prompt: base, one PEFT LoRA, and ours at N = decode_experts, k=2."""
    n = setup.decode_experts
    ids = _token_ids(setup, PREFILL_TOKENS, seed=2)
    systems = {"base": forward_fn(built("base", setup), ids),
               "peft_lora:N=1": forward_fn(built("peft_lora:N=1", setup), ids)}
    routed = built(f"ours:N={n},k=2", setup)
    for label, strategy in _our_strategies(setup):
        systems[f"{label}:N={n},k=2"] = _with_routing(routed, 2, strategy, forward_fn(routed, ids))
    return time_side_by_side(systems, max(3, setup.reps // 2))


def peak_memory(setup: Setup, names: list[str], quick: bool) -> dict[str, float]:
    """Peak RSS (MiB) of a fresh process that builds one system and runs one forward (on a GPU: peak allocated)."""
    if setup.device == "cuda":
        return {name: CUDA_PEAK_MIB[name] for name in names}
    peaks = {}
    for name in names:
        command = [sys.executable, __file__, "--memory-of", name] + (["--quick"] if quick else [])
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        peaks[name] = json.loads(output.strip().splitlines()[-1])["peak_rss_mib"]
    return peaks


def _memory_child(name: str, setup: Setup) -> None:
    torch.set_num_threads(2)
    model = build_system(name, setup)
    forward_fn(model, _token_ids(setup, setup.tokens, seed=0))()
    print(json.dumps({"peak_rss_mib": _peak_rss_mib()}))


def _peak_rss_mib() -> float:
    """This process's peak RSS. VmHWM, not getrusage: ru_maxrss survives execve, so a child would report the
    (large) peak of the benchmark process that started it."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory_bandwidth(device: str) -> float:
    """Bytes per second of a large copy (read + write), the machine's streaming bandwidth."""
    source = torch.empty(64 * 2**20, dtype=torch.float32, device=device).normal_()
    target = torch.empty_like(source)
    seconds = min(_seconds(lambda: target.copy_(source), source.device) for _ in range(5))
    return 2 * source.numel() * 4 / seconds


def _seconds(fn, device: torch.device) -> float:
    _synchronize(device)
    start = time.perf_counter()
    fn()
    _synchronize(device)
    return time.perf_counter() - start


def floor_ratio(setup: Setup, n: int, k: int, base_seconds: float, bandwidth: float) -> dict:
    """The floor model: extra time >= max(extra FLOPs at the base GEMM's FLOP rate, extra bytes at bandwidth).

    Extra FLOPs: scores (N d_in) + shrink (k r d_in) + expand (k r d_out) per token. Extra bytes: the routing
    vectors and the A/B of every expert used (all of them once T*k >= N), one more read of the tokens and one
    read-modify-write of the output.
    """
    d_in, d_out, r, tokens = setup.hidden, setup.intermediate, setup.rank, setup.tokens * setup.batch
    itemsize = setup.torch_dtype.itemsize
    flop_rate = 2 * tokens * d_in * d_out / base_seconds
    extra_flops = 2 * tokens * (n * d_in + k * r * (d_in + d_out))
    used = min(n, tokens * k)
    extra_bytes = itemsize * (n * d_in + used * r * (d_in + d_out) + tokens * d_in + 2 * tokens * d_out)
    compute, memory = extra_flops / flop_rate, extra_bytes / bandwidth
    return {"floor": 1 + max(compute, memory) / base_seconds, "floor_compute": 1 + compute / base_seconds,
            "floor_memory": 1 + memory / base_seconds, "expert_bytes_vs_w0": used * r * (d_in + d_out) / (d_in * d_out)}


LAYER_STRATEGIES = ("auto", "torch", "dense", "padded", "grouped", "loop")


def random_stack(n: int, r: int, d_in: int, d_out: int, seed: int, **place) -> ExpertStack:
    """n random experts of rank r, scaled like trained ones (LoRA scaling 2), for the layer-level benchmarks."""
    g = torch.Generator().manual_seed(seed)
    vectors, a = torch.randn(n, d_in, generator=g) / 32, torch.randn(n, r, d_in, generator=g) / 32
    b_t, scales = torch.randn(n, r, d_out, generator=g) / 4, torch.full((n,), 2.0)
    return ExpertStack([f"e{i}" for i in range(n)], *(t.to(**place) for t in (vectors, a, b_t, scales)))


def _synced(tensor: torch.Tensor) -> torch.Tensor:
    _synchronize(tensor.device)
    return tensor


def layer_micro(setup: Setup) -> list[dict]:
    """One d_in -> d_out layer, T tokens, k=2: each strategy vs the base matmul, next to the floor model."""
    d_in, d_out, r, tokens, k = setup.hidden, setup.intermediate, setup.rank, setup.tokens * setup.batch, 2
    place = dict(device=setup.device, dtype=setup.torch_dtype)
    weight = (torch.randn(d_out, d_in) / d_in**0.5).to(**place)
    x = torch.randn(tokens, d_in).to(**place)
    bandwidth = memory_bandwidth(setup.device)
    rows = []
    for n in setup.library_sizes:
        stack = random_stack(n, r, d_in, d_out, seed=n, **place)
        routing = RoutingSettings(top_k=k)
        systems = {"base": lambda: _synced(x @ weight.t())}
        for strategy in LAYER_STRATEGIES + (("triton",) if setup.device == "cuda" else ()):
            systems[strategy] = lambda s=strategy, e=stack: _synced(
                routed_forward(x, e, routing, s, out=x @ weight.t())[0])
        timed = time_side_by_side(systems, setup.reps)
        floor = floor_ratio(setup, n, k, timed["base"]["ms"] / 1e3, bandwidth)
        rows.append({"N": n, **{s: timed[s]["ratio"] for s in systems if s != "base"},
                     "base_ms": timed["base"]["ms"], "bandwidth_gbs": bandwidth / 1e9, **floor})
    return rows


CALL_STRATEGIES = ("auto", "torch", "dense", "padded", "grouped")


def layer_calls(setup: Setup) -> list[dict]:
    """Each strategy's extra time per forward on the benchmark model's own route-phase calls: the inputs of the
    7 * layers adapted projections in one forward are captured, then every call is replayed right after its base
    matmul, the strategies interleaved with it, and the medians of (call - base) are summed over the calls.

    Two things the layer micro-benchmark's random inputs miss decide the strategy: real routing is skewed (a few
    experts take most pairs, which multiplies padding), and each call runs after a large GEMM evicted the caches.
    """
    ids = _token_ids(setup, setup.tokens, seed=0)
    rows = []
    for n in setup.library_sizes:
        model = built(f"ours:N={n},k=2", setup)
        model.set_phase("route", top_k=2)
        model.set_routing_strategy("auto")
        extra = dict.fromkeys(CALL_STRATEGIES, 0.0)
        base_ms = 0.0
        for layer, tokens in _captured_calls(model, ids):
            stack = layer.expert_stack()
            systems = {"base": lambda lin=layer.base_layer, x=tokens: _synced(lin(x))}
            for strategy in CALL_STRATEGIES:
                systems[strategy] = _routed_call(layer, tokens, stack, strategy)
            timed = time_side_by_side(systems, setup.reps)
            base_ms += timed["base"]["ms"]
            for strategy in CALL_STRATEGIES:
                extra[strategy] += (timed[strategy]["ratio"] - 1) * timed["base"]["ms"]
        rows.append({"N": n, "base_matmuls_ms": base_ms, **{f"{s}_extra_ms": extra[s] for s in CALL_STRATEGIES}})
    return rows


def _routed_call(layer, tokens: torch.Tensor, stack: ExpertStack, strategy: str):
    def run():
        return _synced(routed_forward(tokens, stack, layer.routing_settings, strategy, out=layer.base_layer(tokens))[0])

    return run


def _captured_calls(model, ids: torch.Tensor) -> list[tuple]:
    """(layer, its [T, d_in] input) for every route-phase layer call of one forward, in call order."""
    from peft_routing import RoutingLinear

    calls = []

    def record(layer, args):
        x = args[0]
        calls.append((layer, x.reshape(-1, x.shape[-1]).detach().clone()))

    layers = [module for module in model.modules() if isinstance(module, RoutingLinear)]
    hooks = [layer.register_forward_pre_hook(record) for layer in layers]
    try:
        forward_fn(model, ids)()
    finally:
        for hook in hooks:
            hook.remove()
    return calls


def _print_calls(rows) -> None:
    print("\nroute-phase layer calls of one forward on their real inputs, k=2: extra ms per forward by strategy")
    print(f"{'N':>5} {'base matmuls':>13} " + " ".join(f"{s:>8}" for s in CALL_STRATEGIES))
    for row in rows:
        print(f"{row['N']:>5} {row['base_matmuls_ms']:13.0f} "
              + " ".join(f"{row[f'{s}_extra_ms']:8.0f}" for s in CALL_STRATEGIES))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--memory-of", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--batch", type=int, default=1, help="sequences per forward (the issue's setup is 1)")
    parser.add_argument("--sizes", type=lambda text: tuple(int(n) for n in text.split(",")), default=None,
                        help="library sizes N, comma-separated (default 1,8,64,256)")
    parser.add_argument("--parts", default=",".join(ALL_PARTS), help="which parts to run, comma-separated")
    parser.add_argument("--reps", type=int, default=None, help="timed repeats of each system (default 7)")
    parser.add_argument("--hidden", type=int, default=None, help="model width (default 1024; a 7B model: 4096)")
    parser.add_argument("--intermediate", type=int, default=None, help="MLP width (default 2816; a 7B model: 14336)")
    parser.add_argument("--tokens", type=int, default=None, help="tokens per sequence (default 512)")
    args = parser.parse_args()
    setup = replace(QUICK if args.quick else Setup(), device=args.device, dtype=args.dtype, batch=args.batch)
    for name in ("hidden", "intermediate", "tokens"):
        if getattr(args, name):
            setup = replace(setup, **{name: getattr(args, name)})
    if args.sizes:
        setup = replace(setup, library_sizes=args.sizes)
    if args.reps:
        setup = replace(setup, reps=args.reps)
    if args.memory_of:
        return _memory_child(args.memory_of, setup)
    if setup.device == "cpu":
        torch.set_num_threads(2)
    started = time.time()
    result = {"setup": vars(setup), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "device": _device_name(setup.device), "cpu": _cpu_description()}
    print(f"setup: {setup}\ncpu: {result['cpu']}", flush=True)
    parts = args.parts.split(",")
    if "layer" in parts:
        result["layer"] = layer_micro(setup)
        _print_layer(result["layer"])
    if "whole" in parts:
        result["whole_model"] = whole_model(setup)
        sizes = setup.library_sizes
        measured = (sizes[min(1, len(sizes) - 1)], sizes[-1])  # the second-smallest and the largest library
        memory_names = ["base", "peft_lora:N=1"] + [f"ours:N={n},k=2" for n in measured]
        result["peak_rss_mib"] = peak_memory(setup, memory_names, args.quick)
        result["expert_mib"] = _expert_mib(setup)
        _print_whole(result)
    if "routers" in parts:
        result["routers"] = routers(setup)
        _print_routers(result["routers"])
    if "decode" in parts:
        result["decode"] = decode(setup)
        _print_decode(result["decode"])
    if "prefill" in parts:
        result["prefill"] = prefill(setup)
        _print_prefill(result["prefill"])
    if "calls" in parts:
        result["layer_calls"] = layer_calls(setup)
        _print_calls(result["layer_calls"])
    if "compiled" in parts:
        result["compiled"] = compiled(setup)
        _print_compiled(result["compiled"])
    from peft_routing.ops import cpu_kernel, measured_choice

    result["cpu_kernel_isa"] = cpu_kernel.isa()
    result["measured_choices"] = {",".join(map(str, key)): path for key, path in measured_choice.measured().items()}
    result["seconds"] = time.time() - started
    out = args.out or RESULTS / _result_name(setup, args.quick, parts)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out} ({result['seconds']:.0f} s)")


def _result_name(setup: Setup, quick: bool, parts: list[str]) -> str:
    """routing_speed.json for the issue's CPU setup and every part; other devices, dtypes and batches get their
    own file, and so does a run of some parts only (it must not overwrite a full run's figures)."""
    name = ["routing_speed"] + (["quick"] if quick else [])
    if setup.device != "cpu" or setup.dtype != "float32" or setup.batch != 1:
        name += [setup.device, setup.dtype, f"b{setup.batch}"]
    default = Setup()
    if (setup.hidden, setup.intermediate, setup.tokens) != (default.hidden, default.intermediate, default.tokens):
        name += [f"h{setup.hidden}", f"i{setup.intermediate}", f"t{setup.tokens}"]
    if sorted(parts) != sorted(ALL_PARTS):
        name += sorted(parts)
    return "_".join(name) + ".json"


def _cpu_description() -> dict:
    """The CPU's model, cores and vector ISA (speed ratios differ between AVX2 and AVX-512 machines)."""
    flags, model = set(), platform.processor()
    if Path("/proc/cpuinfo").exists():
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "flags":
                flags = set(value.split())
            elif key.strip() == "model name":
                model = value.strip()
    vector = sorted(flag for flag in flags if flag.startswith(("avx", "fma", "sve", "asimd", "neon", "amx")))
    return {"model": model, "cores": os.cpu_count(), "torch_capability": torch.backends.cpu.get_cpu_capability(),
            "vector_flags": vector, "emulated_isa_env": {name: os.environ[name] for name in (
                "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA", "PEFT_ROUTING_CPU_ISA")
                if name in os.environ}}


def _device_name(device: str) -> str:
    if device == "cuda":
        import triton

        return f"{torch.cuda.get_device_name()} (triton {triton.__version__})"
    return "cpu"


def _expert_mib(setup: Setup) -> float:
    """Bytes of one expert (A, B and routing vectors of all adapted modules), in MiB."""
    h, i, r = setup.hidden, setup.intermediate, setup.rank
    per_layer = 4 * (r * 2 * h + h) + 2 * (r * (h + i) + h) + (r * (i + h) + i)
    return per_layer * setup.layers * setup.torch_dtype.itemsize / 2**20


def _print_routers(timed: dict) -> None:
    print(f"{'router':<34}{'ms':>9}{'x base':>9}{'x token':>9}")
    for name, row in timed.items():
        token = timed.get("token:" + name.partition(":")[2], {}).get("ratio")
        versus = f"{row['ratio'] / token:>9.3f}" if token and name != "base" else f"{'':>9}"
        print(f"{name:<34}{row['ms']:>9.1f}{row['ratio']:>9.3f}{versus}")


def _print_layer(rows) -> None:
    print("\nlayer micro-benchmark, k=2 (cost / base layer) next to the floor model")
    strategies = [s for s in LAYER_STRATEGIES + ("triton",) if s in rows[0]]
    print(f"{'N':>5} " + " ".join(f"{s:>7}" for s in strategies)
          + f" {'floor':>6} {'(compute':>9} {'memory)':>8} {'A/B bytes / W0':>15}")
    for row in rows:
        print(f"{row['N']:>5} " + " ".join(f"{row[s]:7.2f}" for s in strategies)
              + f" {row['floor']:6.2f} {row['floor_compute']:9.2f} {row['floor_memory']:8.2f}"
              f" {row['expert_bytes_vs_w0']:15.2f}")


def _print_whole(result) -> None:
    print("\nwhole-model forward (cost / base, median of interleaved repeats), peak RSS of a fresh process")
    print(f"{'system':<22} {'ms':>8} {'x base':>7} {'peak MiB':>9}")
    for name, row in result["whole_model"].items():
        peak = result["peak_rss_mib"].get(name)
        print(f"{name:<22} {row['ms']:8.1f} {row['ratio']:7.2f} {'' if peak is None else f'{peak:9.0f}'}")
    print(f"one expert = {result['expert_mib']:.2f} MiB")
    _print_memory_growth(result["peak_rss_mib"], result["expert_mib"])


def _print_memory_growth(peaks: dict[str, float], expert_mib: float) -> None:
    """The memory target: peak at the largest library minus the smallest (N > 1), against the added weights."""
    sizes = sorted(int(name.split("N=")[1].split(",")[0]) for name in peaks if name.startswith("ours:"))
    sizes = [n for n in sizes if n > 1]
    if len(sizes) < 2:
        return
    small, large = sizes[0], sizes[-1]
    grown = peaks[f"ours:N={large},k=2"] - peaks[f"ours:N={small},k=2"]
    weights = (large - small) * expert_mib
    print(f"peak N={large} - N={small} = {grown:.0f} MiB; the {large - small} added experts weigh {weights:.0f} MiB "
          f"({(grown - weights) / weights:+.1%})")


def _print_decode(by_batch) -> None:
    print("\ndecode, KV cache (ms per generated token, cost / base)")
    for batch, rows in by_batch.items():
        for name, row in rows.items():
            print(f"{batch:<10}{name:<24} {row['ms_per_token']:8.2f} {row['ratio']:7.2f}x")


def _print_prefill(rows) -> None:
    print(f"\nprefill of {PREFILL_TOKENS} tokens, one forward (cost / base)")
    for name, row in rows.items():
        print(f"{name:<24} {row['ms']:9.1f} {row['ratio']:7.2f}x")


if __name__ == "__main__":
    main()
