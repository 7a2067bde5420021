"""The method's equations written out by hand, one token at a time in float64, independent of peft_routing.

Used as the oracle for every routing test. Nothing here imports the package under test.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

EPS = 1e-6  # the documented epsilon of score_norm="standardize"


@dataclass
class ExpertTensors:
    """One expert at one module: A [r, d_in], B [d_out, r], routing vector v [d_in], LoRA scaling s."""

    A: torch.Tensor
    B: torch.Tensor
    v: torch.Tensor
    s: float


def lora_scaling(alpha: float, r: int, use_rslora: bool) -> float:
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def _standardized(x: list[float]) -> list[float]:
    mean = sum(x) / len(x)
    var = sum((xi - mean) ** 2 for xi in x) / len(x)
    return [(xi - mean) / math.sqrt(var + EPS) for xi in x]


def token_scores(u: torch.Tensor, experts: list[ExpertTensors], score_norm: str) -> list[float]:
    """score_j = v_j . u, or PHATGOOSE's standardized(v_j) . standardized(u) / sqrt(d)."""
    u_list = u.double().tolist()
    scores = []
    for expert in experts:
        v_list = expert.v.double().tolist()
        if score_norm == "standardize":
            a, b = _standardized(u_list), _standardized(v_list)
            scores.append(sum(x * y for x, y in zip(a, b)) / math.sqrt(len(u_list)))
        else:
            scores.append(sum(x * y for x, y in zip(u_list, v_list)))
    return scores


def choose(scores: list[float], top_k: int, temperature: float, mixing: str) -> list[tuple[int, float]]:
    """(expert index, weight) for the top-k scores: softmax over them, or sigmoid of each."""
    chosen = sorted(range(len(scores)), key=lambda j: -scores[j])[: min(top_k, len(scores))]
    if mixing == "sigmoid":
        return [(j, 1.0 / (1.0 + math.exp(-scores[j]))) for j in chosen]
    top = max(scores[j] for j in chosen)
    exps = {j: math.exp((scores[j] - top) / temperature) for j in chosen}
    total = sum(exps.values())
    return [(j, exps[j] / total) for j in chosen]


def score_margin(scores: list[float], top_k: int) -> float:
    """Gap between the k-th and (k+1)-th best score (inf when every expert is chosen); small gaps may flip."""
    ordered = sorted(scores, reverse=True)
    return math.inf if top_k >= len(ordered) else ordered[top_k - 1] - ordered[top_k]


def routed_delta(u: torch.Tensor, experts: list[ExpertTensors], top_k, temperature, score_norm, mixing) -> torch.Tensor:
    """sum_{j in top-k} w_j s_j B_j A_j u for one token u, in float64."""
    if not experts:
        return torch.zeros(0, dtype=torch.float64)
    weights = choose(token_scores(u, experts, score_norm), top_k, temperature, mixing)
    delta = torch.zeros(experts[0].B.shape[0], dtype=torch.float64)
    for j, w in weights:
        e = experts[j]
        delta += w * e.s * (e.B.double() @ (e.A.double() @ u.double()))
    return delta


def gated_delta(u: torch.Tensor, expert: ExpertTensors) -> torch.Tensor:
    """Router phase, eq. 2: sigmoid(v . u) s B A u."""
    gate = 1.0 / (1.0 + math.exp(-float(expert.v.double() @ u.double())))
    return gate * expert.s * (expert.B.double() @ (expert.A.double() @ u.double()))
