"""One routed layer on a GPU: where the Triton path's time goes, and how tile sizes change it (not a test).

Each layer call is captured in a CUDA graph and replayed, so the figures are the kernels' own cost without Python and
launch overhead (eager mode at these shapes measures the host, not the GPU). Prints, for each library size N:
the base matmul, the Triton path under each tile config, the PyTorch path where it is capturable, and the
profiler's per-kernel times of the default config; for decode-sized calls (up to launch.FUSED_MAX_TOKENS tokens) the
fused kernel next to the unfused chain (route -> shrink -> expand); writes JSON.

    python benchmarks/kernel_profile.py --tokens 1 16 512 4096 --sizes 8 64 256 --out kernel_profile.json
    python benchmarks/kernel_profile.py --tokens 1 16 4096 --sizes 64 --d-in 4096 --d-out 14336   # a 7B MLP layer
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from routing_speed import random_stack  # noqa: E402

from peft_routing.kernels import launch  # noqa: E402
from peft_routing.ops import (
    RoutingSettings,  # noqa: E402
    routed_forward,  # noqa: E402
)

CONFIGS = {  # token count from which the launcher uses its tall tiles: never, always, and as shipped
    "small": 10**9,
    "tall": 0,
    "shipped": launch.TALL_FROM_TOKENS,
}
FUSED_MAX_TOKENS = launch.FUSED_MAX_TOKENS  # as shipped


def graph_ms(fn, reps: int = 50) -> float:
    """Milliseconds per replay of fn captured in a CUDA graph (median of 5 timings of `reps` replays)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    timings = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        timings.append(start.elapsed_time(end) / reps)
    return sorted(timings)[2]


def kernel_table(fn) -> list[tuple[str, float]]:
    """(kernel name, microseconds per call) from the profiler, largest first."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            fn()
        torch.cuda.synchronize()
    rows = [(e.key[:60], e.device_time_total / 10) for e in prof.key_averages() if e.device_time_total > 0]
    return sorted(rows, key=lambda row: -row[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 512, 4096])
    parser.add_argument("--sizes", type=int, nargs="+", default=[8, 64, 256])
    parser.add_argument("--d-in", type=int, default=1024)
    parser.add_argument("--d-out", type=int, default=2816)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path("kernel_profile.json"))
    args = parser.parse_args()
    place = {"device": "cuda", "dtype": torch.bfloat16}
    routing = RoutingSettings(top_k=2)
    results = []
    for tokens in args.tokens:
        x = torch.randn(tokens, args.d_in).to(**place)
        weight = (torch.randn(args.d_out, args.d_in) / args.d_in**0.5).to(**place)
        out = torch.empty(tokens, args.d_out, **place)
        base = graph_ms(lambda: torch.matmul(x, weight.t(), out=out))
        for n in args.sizes:
            r = args.rank
            stack = random_stack(n, r, args.d_in, args.d_out, seed=n, **place)
            row = {"tokens": tokens, "N": n, "base_ms": base}

            def routed(strategy):
                return lambda: routed_forward(x, stack, routing, strategy, out=torch.matmul(x, weight.t(), out=out))

            for config, tall_from in CONFIGS.items():
                launch.TALL_FROM_TOKENS = tall_from
                try:
                    row[f"triton_{config}"] = graph_ms(routed("triton")) / base
                except Exception as error:  # noqa: BLE001 - a config that does not compile is a finding
                    row[f"triton_{config}"] = f"failed: {type(error).__name__}: {str(error)[:200]}"
            launch.TALL_FROM_TOKENS = CONFIGS["shipped"]
            if tokens <= FUSED_MAX_TOKENS:  # one fused launch against the chain it replaces
                for name, limit in (("fused", FUSED_MAX_TOKENS), ("unfused", -1)):
                    launch.FUSED_MAX_TOKENS = limit
                    try:
                        row[f"triton_{name}"] = graph_ms(routed("triton")) / base
                    except Exception as error:  # noqa: BLE001 - a kernel that does not compile is a finding
                        row[f"triton_{name}"] = f"failed: {type(error).__name__}: {str(error)[:200]}"
                launch.FUSED_MAX_TOKENS = FUSED_MAX_TOKENS
            try:
                row["torch_dense"] = graph_ms(routed("dense")) / base
            except Exception as error:  # noqa: BLE001
                row["torch_dense"] = f"not capturable: {type(error).__name__}"
            row["kernels_us"] = kernel_table(routed("triton"))
            results.append(row)
            print(f"\nT={tokens} N={n}: base {base * 1e3:.1f} us; " + ", ".join(
                f"{key} {value:.2f}x" for key, value in row.items() if key.startswith(("triton_", "torch_"))
                and isinstance(value, float)), flush=True)
            for name, us in row["kernels_us"][:8]:
                print(f"    {us:8.1f} us  {name}")
    args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
