"""The prototype routers in one forward pass: hooks that pool each position's prefix and tell every routed layer.

Design (ops.prototypes has the math):
  * The prototype layer is a decoder block whose *input* is pooled. Prototypes are computed on the base model, so
    that block must be at or below the lowest block any expert adapts: then the pooled features are the base
    model's whatever the library holds, and taking them costs nothing but the pooling. A library that adapts lower
    blocks is refused with a message saying so (recompute the prototypes at a lower block).
  * A pre-hook on the language model reads the 2-D attention mask (padding) and the KV cache; a pre-hook on the
    prototype block pools the hidden states and decides for every position once; each routed layer above it takes
    its columns of that decision. Layers outside the decoder blocks (a vision tower adapted with
    ``language_model_only=False``) route by their tokens alone.
  * Across a KV cache the running prefix sums travel with the cache object itself (an attribute set on it), and
    follow its ``reorder_cache`` / ``batch_select_indices`` (beam and contrastive search); a cache whose length
    does not match the sums it carries (cropped, or built without these hooks) is refused, never guessed at.
"""

from __future__ import annotations

import inspect
import weakref
from collections import Counter

import torch
from torch import nn

from ..ops.prototypes import FEATURES, PrefixState, PrototypeDecision, decide, prompt_feature, similarities
from ..ops.settings import RoutingSettings
from .prototype import Prototype

_STATE = "_peft_routing_prefix"  # (PrefixState, positions seen, (pooling, feature)) on a cache object
_FOLLOWED = "_peft_routing_follows"


class PrototypeRoutingError(RuntimeError):
    """The prototype routers cannot route this library or this call (the message says why and what to do)."""


def decoder_blocks(model: nn.Module, adapted_paths: list[str]) -> tuple[str, nn.ModuleList, dict[str, int]] | None:
    """The ModuleList of decoder blocks holding most adapted modules: (its path, it, adapted path -> block index).

    Args:
        model: the base model.
        adapted_paths: module paths of the routed layers.
    """
    modules = dict(model.named_modules())
    owner: dict[str, tuple[str, int]] = {}
    for path in adapted_paths:
        parts = path.split(".")
        for i in range(len(parts) - 1, 0, -1):
            prefix = ".".join(parts[:i])
            if parts[i].isdigit() and isinstance(modules.get(prefix), nn.ModuleList):
                owner[path] = (prefix, int(parts[i]))
                break
    if not owner:
        return None
    blocks_path = Counter(prefix for prefix, _ in owner.values()).most_common(1)[0][0]
    index = {path: block for path, (prefix, block) in owner.items() if prefix == blocks_path}
    return blocks_path, modules[blocks_path], index


class PrototypeRouter:
    """Gives every routed layer of one forward the prototypes' decision for its tokens (see the module docstring)."""

    def __init__(self, model: nn.Module, layers: dict[str, nn.Module], experts: list[str],
                 prototypes: dict[str, Prototype | None], settings: RoutingSettings) -> None:
        self.settings, self.experts = settings, list(experts)
        self.current: PrototypeDecision | None = None
        self.prompt_mask: torch.Tensor | None = None  # set by RoutingLoraModel.prompt_positions
        self._handles: list = []
        self._columns: dict[tuple[str, ...], torch.Tensor | None] = {}
        self.problem = self._library_problem(model, layers, prototypes)
        if self.problem is None:
            ordered = [prototypes[name] for name in self.experts]
            self.prototypes = torch.stack([p.vector for p in ordered])
            self.floors = torch.tensor([p.floor_for(settings.prototype_pooling) for p in ordered])
            self.layer, self.feature = ordered[0].layer, ordered[0].pooling
        self._attach(model, layers)

    # ------------------------------------------------------------------------------------------------ checks
    def _library_problem(self, model, layers, prototypes) -> str | None:
        router = self.settings.router
        lacking = [name for name in self.experts if prototypes.get(name) is None]
        if lacking:
            return (f"router={router!r} needs a task prototype for every expert; {lacking} have none. Compute them "
                    "with peft_routing.compute_prototype(model, name, data, processor), or use router='token'.")
        found = decoder_blocks(model, list(layers))
        if found is None:
            return f"router={router!r} found no decoder blocks (a ModuleList of layers) holding the routed layers."
        self._blocks_path, self._blocks, self._block_of = found
        taken_at = {name: prototypes[name].layer for name in self.experts}
        if len(set(taken_at.values())) > 1:
            return (f"the prototypes were taken at different blocks {taken_at}; recompute them at one block "
                    "(compute_prototype(..., layer=...)).")
        pooled_by = {name: prototypes[name].pooling for name in self.experts}
        if len(set(pooled_by.values())) > 1:
            return (f"the prototypes pool different features {pooled_by}; recompute them with one "
                    "(compute_prototype(..., pooling=...)).")
        layer = next(iter(taken_at.values()))
        if not 0 <= layer < len(self._blocks):
            return f"the prototypes were taken at block {layer}; this model has {len(self._blocks)} blocks."
        lowest = min(self._block_of.values(), default=layer)
        if lowest < layer:
            return (f"an expert adapts block {lowest}, below the prototype block {layer}, so the pooled features "
                    f"would depend on the library; recompute the prototypes at block {lowest} or lower "
                    f"(compute_prototype(..., layer={lowest})).")
        return None

    # ------------------------------------------------------------------------------------------------ hooks
    def _attach(self, model: nn.Module, layers: dict[str, nn.Module]) -> None:
        for path, layer in layers.items():
            inside = self.problem is None and path in self._block_of
            layer.prototype_router = self if inside or self.problem is not None else None
        if self.problem is not None:
            return  # the layers raise self.problem at their first route-phase call
        language_model = model.get_submodule(self._blocks_path.rpartition(".")[0]) if "." in self._blocks_path \
            else model
        self._signature = inspect.signature(language_model.forward)
        self._handles = [
            language_model.register_forward_pre_hook(self._before_language_model, with_kwargs=True),
            language_model.register_forward_hook(self._after_language_model, with_kwargs=True),
            self._blocks[self.layer].register_forward_pre_hook(self._before_prototype_block, with_kwargs=True),
        ]

    def detach(self, layers: dict[str, nn.Module] | None = None) -> None:
        """Remove the hooks (and the layers' reference to this router)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for layer in (layers or {}).values():
            if getattr(layer, "prototype_router", None) is self:
                layer.prototype_router = None

    def _before_language_model(self, module, args, kwargs) -> None:
        self.current = self._pending = None
        bound = self._signature.bind_partial(*args, **kwargs).arguments
        self._mask = bound.get("attention_mask")
        self._cache = bound.get("cache", bound.get("past_key_values"))  # transformers 5 renamed it "cache"
        self._past = self._cache.get_seq_length() if hasattr(self._cache, "get_seq_length") else 0

    def _before_prototype_block(self, module, args, kwargs) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        batch, width = hidden.shape[:2]
        mask, state = self._chunk_mask(batch, width), self._prefix_state()
        if self.settings.prototype_pooling == "prompt":
            pooled, state = prompt_feature(hidden, self._only_prompt(mask, hidden, state), state, self.feature)
        else:
            pooled, state = FEATURES[self.feature](hidden, mask, state)
        cosines = similarities(pooled.reshape(batch * width, -1), self.prototypes.to(hidden.device))
        self.current = decide(cosines, self.floors.to(hidden.device), self.settings)
        self._pending = (state, self._past + width, self._pooling)

    def _after_language_model(self, module, args, kwargs, output) -> None:
        cache = getattr(output, "past_key_values", None) or getattr(output, "cache", None) or self._cache
        if cache is not None and self._pending is not None:
            _store(cache, *self._pending)
        self.current = self._pending = None

    def _chunk_mask(self, batch: int, width: int) -> torch.Tensor | None:
        mask = self._mask
        if mask is None:
            return None
        if mask.dim() != 2 or mask.shape[0] != batch or mask.shape[1] < width:
            raise PrototypeRoutingError(f"prototype routing needs the 2-D attention mask [batch, positions] the "
                                        f"tokenizer gives; got shape {tuple(mask.shape)}.")
        return mask[:, -width:].bool()

    def _only_prompt(self, mask: torch.Tensor | None, hidden: torch.Tensor,
                     state: PrefixState | None) -> torch.Tensor | None:
        """The chunk's mask narrowed to the prompt positions ``prompt_mask`` marks, for a chunk that is a prompt."""
        prompt = self.prompt_mask
        if prompt is None or state is not None:
            return mask
        if prompt.shape != hidden.shape[:2]:
            raise PrototypeRoutingError(f"prompt_positions got a mask of shape {tuple(prompt.shape)} for an input "
                                        f"of shape {tuple(hidden.shape[:2])}; give one flag per input position.")
        prompt = prompt.bool().to(hidden.device)
        return prompt if mask is None else mask & prompt

    def _prefix_state(self) -> PrefixState | None:
        if self._past == 0:
            return None
        stored = getattr(self._cache, _STATE, None)
        if stored is None or stored[1:] != (self._past, self._pooling):
            raise PrototypeRoutingError(
                "prototype routing cannot continue this KV cache: it was not built by a routed forward with the "
                "same router and pooling, or it was cropped. Run the whole sequence again without the cache.")
        return stored[0]

    @property
    def _pooling(self) -> tuple[str, str]:
        """What a cache's state was pooled by: a cache continues only under the same pooling and feature."""
        return self.settings.prototype_pooling, self.feature

    # ------------------------------------------------------------------------------------------------ layers
    def decision_for(self, names: list[str], num_tokens: int) -> PrototypeDecision:
        """This forward's decision for a layer whose stack holds ``names`` and gets ``num_tokens`` tokens.

        Args:
            names: the layer's experts, in its stack's order.
            num_tokens: rows of the layer's input.
        """
        if self.problem is not None:
            raise PrototypeRoutingError(self.problem)
        decision = self.current
        if decision is None or decision.bias.shape[0] != num_tokens:
            raise PrototypeRoutingError(
                "a routed layer ran without its prototype decision (outside the language model's forward, or with "
                "another number of tokens); call the model as a whole in the route phase.")
        return decision.for_experts(self._columns_of(tuple(names), decision.bias.device))

    def _columns_of(self, names: tuple[str, ...], device) -> torch.Tensor | None:
        if names not in self._columns:
            index = {name: i for i, name in enumerate(self.experts)}
            columns = [index[name] for name in names]
            self._columns[names] = None if columns == list(range(len(self.experts))) else torch.tensor(columns)
        columns = self._columns[names]
        return None if columns is None else columns.to(device)


def _store(cache, state: PrefixState, seen: int, pooling: tuple[str, str]) -> None:
    """Keep the prefix sums on the cache object, and make its row selections carry them along."""
    setattr(cache, _STATE, (state, seen, pooling))
    if getattr(cache, _FOLLOWED, False):
        return
    reference = weakref.ref(cache)
    for method in ("reorder_cache", "batch_select_indices"):
        original = getattr(cache, method, None)
        if original is None:
            continue

        def follow(rows, *args, _original=original, **kwargs):
            owner = reference()
            stored = getattr(owner, _STATE, None)
            if stored is not None:
                setattr(owner, _STATE, (stored[0].select(rows), *stored[1:]))
            return _original(rows, *args, **kwargs)

        setattr(cache, method, follow)
    setattr(cache, _FOLLOWED, True)
