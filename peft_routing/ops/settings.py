"""``RoutingSettings``: the library-wide rule by which the route phase picks and mixes experts."""

from __future__ import annotations

import math
from dataclasses import dataclass

SCORE_NORMS = ("none", "standardize")
MIXINGS = ("softmax", "sigmoid")


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


@dataclass(frozen=True)
class RoutingSettings:
    """How the route phase scores, picks and mixes experts (``ops.routing`` has the equations).

    Args:
        top_k: experts chosen per token and layer (capped at the library's size).
        temperature: softmax temperature over the chosen experts' scores.
        score_norm: ``"none"`` (the paper's raw ``v . u``) or ``"standardize"`` (PHATGOOSE).
        mixing: ``"softmax"`` over the chosen experts, or ``"sigmoid"`` of each score (all may be ~0).
    """

    top_k: int = 1
    temperature: float = 1.0
    score_norm: str = "none"
    mixing: str = "softmax"

    def __post_init__(self) -> None:
        check_routing_fields(self.top_k, self.temperature, self.score_norm, self.mixing)

    def replace(self, **overrides) -> RoutingSettings:
        """A copy with the overrides that are not None applied (and validated)."""
        values = dict(vars(self))
        values.update({k: v for k, v in overrides.items() if v is not None})
        return RoutingSettings(**values)
