"""Task prototypes in the route phase: each position's prefix feature, and what it does to the token scores.

A task's prototype is REPRO's: the normalised mean, over at most 128 of the task's training prompts, of the
prompt's feature. Here the feature is taken in the routed forward itself, so no second pass is needed: at position t
of a sequence it pools the hidden states h_s entering the prototype layer over the prefix s <= t (padding skipped),
by one of two features (the prototype's ``pooling``):

    causal_mean:  g_t = mean_{s <= t} h_s / |h_s|     (every position alike, image tokens included)
    last:         g_t = h_t / |h_t|                    (the latest position, which attention has let read the
                                                         whole prefix: weighted towards the question)

A running state carries either across a KV cache, and at the end of a prompt g_t is the prompt's feature the
prototype was built from. With ``prototype_pooling="prompt"`` every position of a sequence uses its prompt's g (the
g of the prompt's last real position; ``prompt_feature``), generated tokens included: REPRO's one choice per
sequence, taken inside the forward. With c_tj = cos(g_t, p_j):

    router "prototype":        only the nearest prototype's expert, at full weight;
    router "token+prototype":  the token scores restricted to the ``prototype_candidates`` nearest experts where the
                               nearest leads the second by at least ``prototype_margin`` (token scores alone elsewhere),
                               or, with ``prototype_prior`` > 0, plus prior * log softmax(c_t / PRIOR_TEMPERATURE);
    fallback "base":           no expert at a position with max_j c_tj below the nearest prototype's floor, i.e.
                               the base model. Prefix pooling uses ``floor`` (the lowest similarity of the task's
                               training examples at any answer-predicting position); prompt pooling ``prompt_floor``
                               (``prompt_floor``: the training prompts' farthest distance, with slack).

The decision is one additive bias per (position, expert) on the scores every routed layer computes (0, -inf or the
prior) and a per-position keep flag, so every strategy and the CPU kernel apply it unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .routing import top_k
from .settings import RoutingSettings

# Cosines between prompt features of one model differ by a few hundredths between tasks; this makes the prior's
# softmax about as peaked as the nearest-prototype choice at prior = 1.
PRIOR_TEMPERATURE = 0.01
# The prompt floor's distance (1 - cosine) is this multiple of the farthest training prompt's. A new prompt of the
# task lies beyond the farthest of n training prompts with probability 1/(n + 1) (1 in 129 for REPRO's 128); the
# prompts' log-distances spread by about 0.25-0.45 (text half), so doubling the distance puts the floor 1.5 to 3
# such spreads past the farthest prompt, while prompts of tasks no expert learnt lie 5-40x farther
# (benchmarks/RESULTS.md, "What the base fallback lets through").
PROMPT_FLOOR_SLACK = 2.0


@dataclass
class PrefixState:
    """A batch's pooling so far: the normalised features the pooled feature averages, summed [B, d] (float32), and
    how many they are [B] (causal_mean: every real position; last: the latest one, so 0 or 1)."""

    total: torch.Tensor
    count: torch.Tensor

    def select(self, rows: torch.Tensor) -> PrefixState:
        """The state of the rows ``rows`` (beam search reorders a batch's rows between steps)."""
        return PrefixState(self.total.index_select(0, rows.to(self.total.device)),
                           self.count.index_select(0, rows.to(self.count.device)))


def _unit_features(hidden: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The normalised states [B, S, d] in float32, and the real positions [B, S] (``mask``, or all when None)."""
    real = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device) if mask is None else mask.bool()
    return torch.nn.functional.normalize(hidden.float(), dim=-1), real


def causal_mean(hidden: torch.Tensor, mask: torch.Tensor | None,
                state: PrefixState | None = None) -> tuple[torch.Tensor, PrefixState]:
    """g_t for every position of a chunk [B, S, d], continuing ``state`` (the rows' earlier positions), in float32.

    Padding (``mask`` False) adds nothing; a position with no real position in its prefix gets the zero vector.

    Args:
        hidden: [B, S, d] hidden states entering the prototype layer.
        mask: [B, S], True at real positions (None: all real).
        state: the prefix sums before this chunk (None: the chunk starts the sequences).
    """
    features, real = _unit_features(hidden, mask)
    features = features * real.unsqueeze(-1)
    total = features.cumsum(dim=1)
    count = real.cumsum(dim=1)
    if state is not None:
        total = total + state.total.unsqueeze(1)
        count = count + state.count.unsqueeze(1)
    pooled = total / count.clamp(min=1).unsqueeze(-1)
    if hidden.shape[1] == 0:  # an empty chunk changes nothing
        empty = PrefixState(features.new_zeros(hidden.shape[0], hidden.shape[2]), real.new_zeros(hidden.shape[0]))
        return pooled, state or PrefixState(empty.total, empty.count.long())
    return pooled, PrefixState(total[:, -1], count[:, -1])


def causal_last(hidden: torch.Tensor, mask: torch.Tensor | None,
                state: PrefixState | None = None) -> tuple[torch.Tensor, PrefixState]:
    """g_t = the normalised hidden state of the latest real position s <= t, for every position of a chunk [B, S, d]
    continuing ``state``, in float32. A position with no real position in its prefix gets the zero vector.

    Args:
        hidden: [B, S, d] hidden states entering the prototype layer.
        mask: [B, S], True at real positions (None: all real).
        state: the pooling before this chunk (None: the chunk starts the sequences).
    """
    features, real = _unit_features(hidden, mask)
    batch, width, size = features.shape
    positions = torch.arange(width, device=hidden.device).expand(batch, width)
    latest = torch.where(real, positions, -1).cummax(dim=1).values  # [B, S]: -1 before the chunk's first real one
    gathered = features.gather(1, latest.clamp(min=0).unsqueeze(-1).expand(-1, -1, size))
    before = features.new_zeros(batch, size) if state is None else state.total
    pooled = torch.where((latest >= 0).unsqueeze(-1), gathered, before.unsqueeze(1))
    seen = real.any(dim=1).long()  # 1 once a row has a latest position
    if state is not None:
        seen = seen | state.count.long()
    if width == 0:
        return pooled, state or PrefixState(before, seen)
    return pooled, PrefixState(pooled[:, -1], seen)


FEATURES = {"causal_mean": causal_mean, "last": causal_last}  # a prototype's ``pooling`` -> its feature


def prompt_feature(hidden: torch.Tensor, mask: torch.Tensor | None, state: PrefixState | None = None,
                   pooling: str = "causal_mean") -> tuple[torch.Tensor, PrefixState]:
    """The prompt's feature g at every position of a chunk [B, S, d]: a chunk that starts the sequences is their
    prompt; a later chunk (``state`` given) keeps the prompt's feature, so the sequence keeps its choice.

    Args:
        hidden: [B, S, d] hidden states entering the prototype layer.
        mask: [B, S], True at real positions (None: all real).
        state: the prompt's pooling (None: this chunk is the prompt).
        pooling: the prototypes' feature, a key of ``FEATURES``.
    """
    if state is None:
        _, state = FEATURES[pooling](hidden, mask)
    total = state.total / state.count.clamp(min=1).unsqueeze(-1).to(state.total.dtype)
    return total.unsqueeze(1).expand(-1, hidden.shape[1], -1), state


@dataclass
class PrototypeDecision:
    """What the prototypes decided for T positions: a bias [T, N] added to the token scores, and keep [T] (False: the
    base model alone), or None when every position keeps its experts."""

    bias: torch.Tensor
    keep: torch.Tensor | None

    def for_experts(self, columns: torch.Tensor | None) -> PrototypeDecision:
        """The decision for a layer holding only the library's experts ``columns`` (None: all, in library order).

        A position whose allowed experts all miss from the layer gets no expert there.

        Args:
            columns: [n] library indices of the layer's experts, in the layer's order.
        """
        if columns is None:
            return self
        bias = self.bias.index_select(1, columns)
        reachable = torch.isfinite(bias).any(dim=-1)
        keep = reachable if self.keep is None else self.keep & reachable
        return PrototypeDecision(bias, keep)


def similarities(pooled: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """cos(g_t, p_j) [T, N] for prefix features [T, d] and unit-norm prototypes [N, d].

    Args:
        pooled: prefix features (``causal_mean``), flattened to [T, d].
        prototypes: the library's prototypes, each of norm 1.
    """
    return torch.nn.functional.normalize(pooled, dim=-1) @ prototypes.t().to(pooled.dtype)


def decide(cosines: torch.Tensor, floors: torch.Tensor, settings: RoutingSettings) -> PrototypeDecision:
    """The routers' rule (module docstring) on the similarities [T, N] of T positions to N prototypes.

    Args:
        cosines: [T, N] ``similarities``.
        floors: [N] each prototype's floor (``fallback="base"``).
        settings: router, prototype_candidates, prototype_margin, prototype_prior and fallback.
    """
    num_experts = cosines.shape[-1]
    if settings.router == "prototype":
        candidates, margin, prior = 1, 0.0, 0.0
    else:
        candidates, margin, prior = settings.prototype_candidates, settings.prototype_margin, settings.prototype_prior
    if prior > 0:
        bias = prior * torch.log_softmax(cosines / PRIOR_TEMPERATURE, dim=-1)
    else:
        _, nearest = top_k(cosines, min(candidates, num_experts))
        allowed = torch.zeros_like(cosines, dtype=torch.bool).scatter_(1, nearest, True)
        bias = torch.zeros_like(cosines).masked_fill_(~allowed, float("-inf"))
    if margin > 0 and num_experts > 1:
        best_two, _ = top_k(cosines, 2)
        unsure = best_two[:, 0] - best_two[:, 1] < margin
        bias = bias.masked_fill(unsure.unsqueeze(-1), 0.0)
    keep = None
    if settings.fallback == "base":
        best, nearest = cosines.max(dim=-1)
        keep = best >= floors.to(cosines.dtype)[nearest]
    return PrototypeDecision(bias, keep)


def prompt_floor(cosines: torch.Tensor) -> float:
    """The prompt floor from the cosines [n] of a task's training prompts to its prototype: the farthest prompt's
    distance times ``PROMPT_FLOOR_SLACK``, as a cosine (at least -1).

    Args:
        cosines: ``similarities`` of the prompts' features to the task's prototype.
    """
    farthest = float((1.0 - cosines.float()).clamp(min=0.0).max())
    return max(-1.0, 1.0 - PROMPT_FLOOR_SLACK * farthest)


def prototype_of(prompt_features: torch.Tensor) -> torch.Tensor:
    """A task's prototype from its prompts' features [n, d]: the normalised mean of the normalised features.

    Args:
        prompt_features: the prototype's feature (``FEATURES``) at each training prompt's last position.
    """
    mean = torch.nn.functional.normalize(prompt_features.float(), dim=-1).mean(dim=0)
    return torch.nn.functional.normalize(mean, dim=0)
