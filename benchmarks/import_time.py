"""``import peft_routing`` against ``import peft``: fresh processes, interleaved, median of repeats.

Issue 19's target: under 1.1x ``import peft`` (peft_routing imports peft, so the ratio is 1 + what we add). Also
lists our own modules' share, from ``python -X importtime``.

    python benchmarks/import_time.py [--reps 9]   -> results/import_time.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _wall(module: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", f"import {module}"], check=True)
    return time.perf_counter() - start


def _own_seconds() -> tuple[float, list[tuple[str, float]]]:
    """Self time of peft_routing's own modules in one import (python -X importtime), and the slowest five."""
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", "import peft_routing"], capture_output=True,
                          text=True, check=True)
    own = []
    for line in done.stderr.splitlines():
        parts = line.removeprefix("import time:").split("|")
        if len(parts) == 3 and parts[2].strip().startswith("peft_routing"):
            own.append((parts[2].strip(), int(parts[0]) / 1e6))
    return sum(seconds for _, seconds in own), sorted(own, key=lambda item: -item[1])[:5]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=9)
    args = parser.parse_args()
    _wall("peft_routing")  # warm the file cache for both
    times = {"peft": [], "peft_routing": []}
    for _ in range(args.reps):
        for module in times:
            times[module].append(_wall(module))
    ratio = statistics.median(ours / theirs for ours, theirs in zip(times["peft_routing"], times["peft"]))
    own, slowest = _own_seconds()
    result = {"reps": args.reps, "median_s": {m: statistics.median(t) for m, t in times.items()}, "ratio": ratio,
              "own_modules_s": own, "slowest_own": slowest}
    print(f"{'import':<14}{'median s':>10}")
    for module, seconds in result["median_s"].items():
        print(f"{module:<14}{seconds:>10.2f}")
    print(f"ratio peft_routing / peft (median of paired runs): {ratio:.3f}  (target < 1.1)")
    print(f"peft_routing's own modules: {own:.3f} s; slowest: " + ", ".join(f"{m} {s:.3f}" for m, s in slowest))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "import_time.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
