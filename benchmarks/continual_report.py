"""Figures of the continual-learning benchmark from its accuracy numbers: BWT/FWT, averages, printed tables."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def average(scores: dict[str, float], tasks: Sequence[str]) -> float:
    return sum(scores[t] for t in tasks) / len(tasks)


def transfer(matrix: list[list[float]], zero_shot: Sequence[float]) -> dict[str, float]:
    """BWT and FWT from a[i][j], the score on task j after learning tasks 0..i (Lopez-Paz & Ranzato, 2017).

    BWT = mean over j < T-1 of a[T-1][j] - a[j][j] (what later tasks did to earlier ones; negative = forgetting).
    FWT = mean over j > 0 of a[j-1][j] - zero_shot[j] (what earlier tasks did for a task before it was learnt).
    """
    last = len(matrix) - 1
    bwt = [matrix[last][j] - matrix[j][j] for j in range(last)]
    fwt = [matrix[j - 1][j] - zero_shot[j] for j in range(1, len(matrix))]
    return {"bwt": sum(bwt) / len(bwt) if bwt else 0.0, "fwt": sum(fwt) / len(fwt) if fwt else 0.0}


def method_table(results: dict[str, Any]) -> str:
    """Paper Table 1 shape: methods x (tasks, task average, general probes)."""
    tasks, general, nll = results["tasks"], results["general"], results.get("general_nll", {})
    header = f"{'method':<26}" + "".join(f"{t[:10]:>11}" for t in tasks) + f"{'avg':>8}" + "".join(
        f"{g[:10]:>11}" for g in general) + f"{'NLL':>8}"
    lines = [header, "-" * len(header)]
    for method, scores in results["methods"].items():
        cells = "".join(f"{scores[t]:>11.1f}" if t in scores else f"{'-':>11}" for t in tasks)
        avg = f"{average(scores, tasks):>8.1f}" if all(t in scores for t in tasks) else f"{'-':>8}"
        probes = "".join(f"{scores[g]:>11.1f}" if g in scores else f"{'-':>11}" for g in general)
        lines.append(f"{method:<26}{cells}{avg}{probes}" + (f"{nll[method]:>8.3f}" if method in nll else f"{'-':>8}"))
    return "\n".join(lines)


def order_table(orders: dict[str, dict[str, float]]) -> str:
    methods = sorted({m for by_method in orders.values() for m in by_method})
    lines = [f"{'order':<16}" + "".join(f"{m:>14}" for m in methods)]
    for order, by_method in orders.items():
        lines.append(f"{order:<16}" + "".join(f"{by_method.get(m, float('nan')):>14.1f}" for m in methods))
    spread = {m: max(o[m] for o in orders.values() if m in o) - min(o[m] for o in orders.values() if m in o)
              for m in methods}
    lines.append(f"{'spread':<16}" + "".join(f"{spread[m]:>14.2f}" for m in methods))
    return "\n".join(lines)


def growth_table(growth: list[dict[str, Any]], tasks: Sequence[str]) -> str:
    """Paper Table 4 shape: the library grows one expert at a time (distractors included)."""
    lines = [f"{'library':<44}" + "".join(f"{t[:10]:>11}" for t in tasks) + f"{'general':>9}"]
    for step in growth:
        cells = "".join(f"{step['scores'][t]:>11.1f}" if t in step["scores"] else f"{'-':>11}" for t in tasks)
        lines.append(f"{'+'.join(step['experts'])[:43]:<44}{cells}{step['scores'].get('general', float('nan')):>9.1f}")
    return "\n".join(lines)


def cost_table(results: dict[str, Any]) -> str:
    """Paper Table 5 shape: training time and examples seen, inference passes."""
    lines = [f"{'method':<26}{'train s':>10}{'train examples':>16}{'inference passes':>18}"]
    for method in results["train_seconds"]:
        lines.append(f"{method:<26}{results['train_seconds'][method]:>10.0f}"
                     f"{results['train_examples'][method]:>16}{results['infer_passes'][method]:>18}")
    return "\n".join(lines)
