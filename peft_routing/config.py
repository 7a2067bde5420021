"""``RoutingLoraConfig``: LoRA's config plus the routing knobs of the method (design.md section 2)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from peft import LoraConfig

from .registration import routing_lora_peft_type

SCORE_NORMS = ("none", "standardize")
MIXINGS = ("softmax", "sigmoid")

# LoRA options whose forward or weights our routed layers do not reproduce; refused at construction rather than
# silently ignored.
_UNSUPPORTED_LORA_OPTIONS = (
    "use_dora",
    "lora_bias",
    "use_bdlora",
    "arrow_config",
    "alora_invocation_tokens",
    "velora_config",
    "monteclora_config",
    "kasa_config",
    "target_parameters",
    "layer_replication",
    "trainable_token_indices",
)


def check_routing_fields(top_k: int, temperature: float, score_norm: str, mixing: str) -> None:
    """Raise a ValueError naming the first invalid routing setting."""
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


@dataclass
class RoutingLoraConfig(LoraConfig):
    """Configuration of one routed LoRA expert.

    Every LoRA field keeps its meaning (``r``, ``lora_alpha``, ``target_modules``, ``rank_pattern``, ``use_rslora``
    ...). The routing fields below describe how the whole library routes tokens in the ``"route"`` phase; a model
    takes them from the config it was created with (``get_peft_model`` / ``PeftModel.from_pretrained``) and
    ``set_phase("route", top_k=...)`` overrides them.
    """

    top_k: int = field(default=1, metadata={"help": "Experts chosen per token and module in the route phase."})
    temperature: float = field(default=1.0, metadata={"help": "Softmax temperature over the chosen scores."})
    score_norm: str = field(
        default="none",
        metadata={"help": "'none': raw v . u (paper). 'standardize': PHATGOOSE, standardize u and v, scale 1/sqrt(d)."},
    )
    mixing: str = field(
        default="softmax",
        metadata={"help": "'softmax' over the chosen experts (paper eq. 4) or 'sigmoid' of each score (allows none)."},
    )
    language_model_only: bool = field(
        default=True,
        metadata={"help": "In a multimodal model adapt only the language model, never the vision tower/projector."},
    )
    # Filled by save_expert so add_expert can check that an expert fits a base model before changing anything.
    base_model_type: Optional[str] = field(default=None, metadata={"help": "model_type of the base model."})
    base_hidden_size: Optional[int] = field(default=None, metadata={"help": "hidden_size of the language model."})
    module_shapes: Optional[dict] = field(
        default=None, metadata={"help": "Adapted module path -> [out_features, in_features, r]."}
    )
    expert_name: Optional[str] = field(default=None, metadata={"help": "Name the expert was saved under."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = routing_lora_peft_type()
        check_routing_fields(self.top_k, self.temperature, self.score_norm, self.mixing)
        for option in _UNSUPPORTED_LORA_OPTIONS:
            if getattr(self, option, None):
                raise ValueError(
                    f"RoutingLoraConfig does not support `{option}` (got {getattr(self, option)!r}); leave it unset. "
                    "Routed experts are plain LoRA (A, B, scaling) plus a routing vector."
                )



@dataclass(frozen=True)
class RoutingSettings:
    """The library-wide routing rule used in the route phase."""

    top_k: int = 1
    temperature: float = 1.0
    score_norm: str = "none"
    mixing: str = "softmax"

    @classmethod
    def from_config(cls, config: RoutingLoraConfig) -> "RoutingSettings":
        return cls(config.top_k, config.temperature, config.score_norm, config.mixing)

    def replace(self, **overrides) -> "RoutingSettings":
        """A copy with the non-None overrides applied, validated like a config."""
        values = dict(vars(self))
        values.update({k: v for k, v in overrides.items() if v is not None})
        check_routing_fields(**values)
        return RoutingSettings(**values)
