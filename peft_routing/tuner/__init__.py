"""The PEFT method: the peft type, ``RoutingLoraConfig``, the ``RoutingLinear`` layer, the ``RoutingLoraModel``
tuner, expert-name rules, the expert folder format and the checks that an expert fits a model."""

from .config import LLAMA_PROJECTIONS, RoutingLoraConfig
from .fit import ExpertMismatchError
from .layer import RoutingLinear
from .model import RoutingLoraModel
from .registration import register

__all__ = ["LLAMA_PROJECTIONS", "ExpertMismatchError", "RoutingLinear", "RoutingLoraConfig", "RoutingLoraModel",
           "register"]
