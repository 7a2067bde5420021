"""``RoutingLinear``: PEFT's ``lora.Linear`` plus one routing vector per expert and the three phases.

Built on ``lora.Linear`` so that LoRA's parameter creation, initialisation, rank/alpha patterns, rsLoRA scaling,
dtype casting, merging, deletion and the expert-phase forward are PEFT's own code. We add:
  * ``lora_route``: a ParameterDict of zero-initialised vectors [in_features], keyed by expert name, saved under
    keys ending in ``.lora_route``;
  * a forward that follows the phase the tuner sets: "expert" (plain LoRA), "router" (sigmoid-gated LoRA of one
    expert, eq. 2) or "route" (all experts, token-level top-k, eq. 3-4).
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora import LoraLayer
from torch import nn

from ..ops.dispatch import routed_forward
from ..ops.expert_stack import ExpertStack, release_freed_host_memory
from ..ops.settings import RoutingSettings

PHASES = ("expert", "router", "route")
# PEFT gives every adapter of every layer its own nn.Identity when lora_dropout is 0, a few KB of Python objects
# each, which add up in a large library. It holds no state, so the experts without dropout share this one.
NO_DROPOUT = nn.Identity()


class RoutingLinear(LoraLinear):
    """A linear (or GPT-2 Conv1D) layer with a library of routed LoRA experts."""

    adapter_layer_names = LoraLayer.adapter_layer_names + ("lora_route",)

    # Set by RoutingLoraModel for every layer whenever the phase or the library changes.
    routing_phase: str = "expert"
    routing_settings: RoutingSettings = RoutingSettings()
    routing_strategy: str = "auto"  # one of ops.STRATEGIES; "auto" picks the fastest path that applies
    # Optional callable(layer, routes) called in the route phase: the hook point for routing diagnostics.
    routing_observer = None
    # Set by RoutingLoraModel in the route phase of a prototype router (tuner.prototype_router), else None.
    prototype_router = None
    _expert_stack: ExpertStack | None = None

    def sync_expert_stack(self) -> None:
        """Follow a library change at once: new experts are copied into the stack while their memory is fresh."""
        replaced = self._expert_stack
        self._expert_stack = ExpertStack.synced(replaced, self)
        if replaced is not None and replaced is not self._expert_stack:
            on_host = replaced.a.device.type == "cpu"
            del replaced  # the layer held the last reference: the replaced stack's slots are freed here
            if on_host:
                release_freed_host_memory()

    def expert_stack(self) -> ExpertStack:
        """The layer's experts stacked for the route phase, synced only when the library or its tensors changed."""
        # under torch.compile the stack is trusted: every library change and dtype/device move re-syncs or drops it
        stale = self._expert_stack is None or (
            not torch.compiler.is_compiling() and not self._expert_stack.follows(self))
        if stale:
            self.sync_expert_stack()
        return self._expert_stack

    @property
    def current_expert_stack(self) -> ExpertStack | None:
        """The stack as it is now, without syncing it (None before the experts are stacked or after a drop)."""
        return self._expert_stack

    def drop_expert_stack(self) -> None:
        """Forget the stack; the next route-phase forward stacks the experts anew."""
        self._expert_stack = None

    def _apply(self, fn, *args, **kwargs):
        module = super()._apply(fn, *args, **kwargs)
        if self._expert_stack is not None and not self._expert_stack.holds_parameters_of(self):
            # model.to(...)/.half() gave the parameters new tensors: free the stale stack now rather than keep a
            # second copy of the library alive until the next route-phase forward restacks them
            self._expert_stack = None
        return module

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config, **kwargs) -> None:
        if not hasattr(self, "lora_route"):
            self.lora_route = nn.ParameterDict({})
        # Created before LoRA's update_layer so that its device/dtype move and set_adapter cover the vector too.
        self.lora_route[adapter_name] = nn.Parameter(torch.zeros(self.in_features))
        super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)
        if type(self.lora_dropout[adapter_name]) is nn.Identity:
            self.lora_dropout[adapter_name] = NO_DROPOUT

    @property
    def expert_names(self) -> list[str]:
        """Experts adapting this layer, in library order."""
        return list(self.lora_A.keys())

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.routing_phase == "expert" or self.disable_adapters or kwargs.get("adapter_names") is not None:
            return super().forward(x, *args, **kwargs)
        if self.merged:
            raise RuntimeError(
                "A merged LoRA cannot be routed: call model.unmerge_adapter() before set_phase('router'/'route')."
            )
        result = self.base_layer(x, *args, **kwargs)
        if self.routing_phase == "route":
            return self._add_routed(x, result)
        delta = self._gated_delta(x)
        return result if delta is None else result + delta.to(result.dtype)

    def _gated_delta(self, x: torch.Tensor) -> torch.Tensor | None:
        """Router phase (eq. 2): sigmoid(v . u) * s * B A u for the active expert."""
        delta = None
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            lora_a, lora_b = self.lora_A[name], self.lora_B[name]
            u = self._cast_input_dtype(x, lora_a.weight.dtype)
            gate = torch.sigmoid(u @ self.lora_route[name].to(u.dtype)).unsqueeze(-1)
            term = lora_b(lora_a(self.lora_dropout[name](u))) * self.scaling[name] * gate
            delta = term if delta is None else delta + term
        return delta

    def _add_routed(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """Route phase (eq. 3-4): each token through its top-k experts of this layer, added to the base output."""
        if not self.lora_A:
            return result
        stack = self.expert_stack()
        tokens = self._cast_input_dtype(x, stack.dtype).reshape(-1, x.shape[-1])
        decision = None
        if self.prototype_router is not None:
            decision = self.prototype_router.decision_for(stack.names, tokens.shape[0])
        if result.dtype == stack.dtype and result.is_contiguous() and not torch.is_grad_enabled():
            _, routes = routed_forward(tokens, stack, self.routing_settings, self.routing_strategy,
                                       out=result.view(-1, result.shape[-1]), decision=decision)
        else:
            delta, routes = routed_forward(tokens, stack, self.routing_settings, self.routing_strategy,
                                           decision=decision)
            result = result + delta.view(result.shape).to(result.dtype)
        if self.routing_observer is not None:
            self.routing_observer(self, routes)
        return result

    def __repr__(self) -> str:
        return "routing_lora." + super().__repr__()
