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


def prefix_features(hidden: torch.Tensor, mask: list[bool]) -> list[list[float] | None]:
    """g_t = mean over real s <= t of h_s / |h_s| for one sequence [S, d]; None where no real position came yet."""
    features, total, count = [], None, 0
    for t in range(hidden.shape[0]):
        if mask[t]:
            h = hidden[t].double().tolist()
            norm = math.sqrt(sum(x * x for x in h))
            unit = [x / norm for x in h]
            total = unit if total is None else [a + b for a, b in zip(total, unit)]
            count += 1
        features.append(None if total is None else [x / count for x in total])
    return features


def last_features(hidden: torch.Tensor, mask: list[bool]) -> list[list[float] | None]:
    """g_t = h_s / |h_s| for the latest real s <= t of one sequence [S, d]; None where no real position came yet."""
    features, latest = [], None
    for t in range(hidden.shape[0]):
        if mask[t]:
            h = hidden[t].double().tolist()
            norm = math.sqrt(sum(x * x for x in h))
            latest = [x / norm for x in h]
        features.append(latest)
    return features


FEATURE_REFERENCES = {"causal_mean": prefix_features, "last": last_features}


def cosine(a: list[float], b: list[float]) -> float:
    norm_a, norm_b = math.sqrt(sum(x * x for x in a)), math.sqrt(sum(x * x for x in b))
    return sum(x * y for x, y in zip(a, b)) / (norm_a * norm_b) if norm_a and norm_b else 0.0


def prototype_rule(feature: list[float] | None, prototypes: list[list[float]], floors: list[float], router: str,
                   candidates: int, margin: float, prior: float, fallback: str,
                   prior_temperature: float) -> tuple[list[float], bool]:
    """(bias added to each expert's token score, whether the token keeps any expert) for one position."""
    cos = [0.0 if feature is None else cosine(feature, p) for p in prototypes]
    order = sorted(range(len(cos)), key=lambda j: (-cos[j], j))
    if router == "prototype":
        candidates, margin, prior = 1, 0.0, 0.0
    if prior > 0:
        top = max(c / prior_temperature for c in cos)
        log_total = top + math.log(sum(math.exp(c / prior_temperature - top) for c in cos))
        bias = [prior * (c / prior_temperature - log_total) for c in cos]
    else:
        allowed = set(order[:candidates])
        bias = [0.0 if j in allowed else -math.inf for j in range(len(cos))]
    if margin > 0 and len(cos) > 1 and cos[order[0]] - cos[order[1]] < margin:
        bias = [0.0] * len(cos)
    keep = fallback != "base" or cos[order[0]] >= floors[order[0]]
    return bias, keep


def routed_delta_biased(u: torch.Tensor, experts: list[ExpertTensors], bias: list[float], keep: bool, top_k: int,
                        temperature: float, score_norm: str, mixing: str) -> torch.Tensor:
    """routed_delta with a per-expert bias on the scores, and nothing for a token that keeps no expert."""
    delta = torch.zeros(experts[0].B.shape[0], dtype=torch.float64)
    scores = [s + b for s, b in zip(token_scores(u, experts, score_norm), bias)]
    if not keep or not any(math.isfinite(s) for s in scores):
        return delta
    for j, w in choose(scores, top_k, temperature, mixing):
        if w > 0:
            e = experts[j]
            delta += w * e.s * (e.B.double() @ (e.A.double() @ u.double()))
    return delta
