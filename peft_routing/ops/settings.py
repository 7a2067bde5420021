"""``RoutingSettings``: the library-wide rule by which the route phase picks and mixes experts."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from functools import cached_property
from types import MappingProxyType

SCORE_NORMS = ("none", "standardize")
MIXINGS = ("softmax", "sigmoid")
ROUTERS = ("token", "prototype", "token+prototype")
FALLBACKS = ("none", "base")
POOLINGS = ("prefix", "prompt")
# The one-pass router benchmarks/continual.py recommends (set_phase("route", **RECOMMENDED_ROUTER)), measured over
# prototypes of compute_prototype's default feature; it needs every expert to carry a task prototype, so the default
# stays the paper's token rule, which any library can run.
RECOMMENDED_ROUTER = MappingProxyType(dict(router="prototype", prototype_pooling="prompt", fallback="base"))


def check_routing_fields(top_k: int, temperature: float, score_norm: str, mixing: str) -> None:
    """Raise a ValueError naming the first invalid routing setting.

    Args:
        top_k: experts per token, an integer >= 1.
        temperature: the softmax temperature, a finite number > 0.
        score_norm: one of ``SCORE_NORMS``.
        mixing: one of ``MIXINGS``.
    """
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be an integer >= 1, got {top_k!r}.")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}.")
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}.")
    if score_norm not in SCORE_NORMS:
        raise ValueError(f"score_norm must be one of {SCORE_NORMS}, got {score_norm!r}.")
    if mixing not in MIXINGS:
        raise ValueError(f"mixing must be one of {MIXINGS}, got {mixing!r}.")


def check_prototype_fields(router: str, prototype_candidates: int, prototype_margin: float, prototype_prior: float,
                           fallback: str, prototype_pooling: str) -> None:
    """Raise a ValueError naming the first invalid prototype-routing setting (``RoutingSettings`` has their meaning).

    Args:
        router: one of ``ROUTERS``.
        prototype_candidates: an integer >= 1.
        prototype_margin: a finite number >= 0.
        prototype_prior: a finite number >= 0.
        fallback: one of ``FALLBACKS``.
        prototype_pooling: one of ``POOLINGS``.
    """
    if router not in ROUTERS:
        raise ValueError(f"router must be one of {ROUTERS}, got {router!r}.")
    if isinstance(prototype_candidates, bool) or not isinstance(prototype_candidates, int) or prototype_candidates < 1:
        raise ValueError(f"prototype_candidates must be an integer >= 1, got {prototype_candidates!r}.")
    for name, value in (("prototype_margin", prototype_margin), ("prototype_prior", prototype_prior)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}.")
    if fallback not in FALLBACKS:
        raise ValueError(f"fallback must be one of {FALLBACKS}, got {fallback!r}.")
    if prototype_pooling not in POOLINGS:
        raise ValueError(f"prototype_pooling must be one of {POOLINGS}, got {prototype_pooling!r}.")


@dataclass(frozen=True)
class RoutingSettings:
    """How the route phase scores, picks and mixes experts (``ops.routing`` has the equations).

    Args:
        top_k: experts chosen per token and layer (capped at the library's size).
        temperature: softmax temperature over the chosen experts' scores.
        score_norm: ``"none"`` (the paper's raw ``v . u``) or ``"standardize"`` (PHATGOOSE).
        mixing: ``"softmax"`` over the chosen experts, or ``"sigmoid"`` of each score (all may be ~0).
        router: ``"token"`` (the paper: token scores alone), ``"prototype"`` (REPRO in one pass: every position
            takes the expert whose task prototype is nearest to its prefix, at full weight) or
            ``"token+prototype"`` (token scores, restricted to or biased towards the nearest prototypes).
        prototype_candidates: token+prototype: the token top-k picks among this many nearest prototypes' experts.
        prototype_margin: token+prototype: restrict only where the nearest prototype's cosine leads the second's by
            at least this much; elsewhere the token scores alone decide (a confidence gate).
        prototype_prior: token+prototype: when > 0, add ``prior * log softmax(cosines / PRIOR_TEMPERATURE)`` to the
            token scores instead of restricting them.
        fallback: ``"base"``: a position whose pooled feature is farther from every prototype than the nearest
            expert's own training examples were (the prototype's floor; with prompt pooling, its prompt floor) gets
            no expert, i.e. the base model; ``"none"``: never.
        prototype_pooling: what a position is compared with the prototypes by. ``"prefix"``: the mean feature of
            its own prefix (strictly causal). ``"prompt"``: the whole prompt's mean feature, for every position of
            the prompt and every token generated after it, i.e. REPRO's one choice per sequence. The "prompt" is
            the input of a sequence's first forward; the KV cache carries the choice on to later calls.
    """

    top_k: int = 1
    temperature: float = 1.0
    score_norm: str = "none"
    mixing: str = "softmax"
    router: str = "token"
    prototype_candidates: int = 1
    prototype_margin: float = 0.0
    prototype_prior: float = 0.0
    fallback: str = "none"
    prototype_pooling: str = "prefix"

    def __post_init__(self) -> None:
        check_routing_fields(self.top_k, self.temperature, self.score_norm, self.mixing)
        check_prototype_fields(self.router, self.prototype_candidates, self.prototype_margin, self.prototype_prior,
                               self.fallback, self.prototype_pooling)

    @cached_property
    def layer_rule(self) -> RoutingSettings:
        """What each layer applies to its biased scores: the prototype router's one expert at full weight is top-1
        with softmax mixing; every other rule is itself."""
        if self.router == "prototype" and (self.top_k, self.mixing) != (1, "softmax"):
            return self.replace(top_k=1, mixing="softmax")
        return self

    @property
    def uses_prototypes(self) -> bool:
        """Whether the route phase needs the experts' prototypes (any router but ``"token"``)."""
        return self.router != "token"

    def replace(self, **overrides) -> RoutingSettings:
        """A copy with the overrides that are not None applied (and validated)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return RoutingSettings(**values)
