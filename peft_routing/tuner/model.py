"""``RoutingLoraModel``: the PEFT tuner that holds a library of routed LoRA experts.

It subclasses PEFT's ``LoraModel`` (as AdaLoRA does) so that target matching, rank/alpha patterns, injection,
adapter deletion, dtype casting, merging and PEFT's save/load all stay PEFT's code. What it adds:
  * layers are ``RoutingLinear`` (LoRA + a routing vector per expert);
  * in a multimodal model only the language model is adapted unless ``language_model_only=False``;
  * expert names are validated before anything changes (``names``);
  * the phases of the method (``set_phase``) and the expert-library verbs (``add_expert``, ``remove_expert``,
    ``save_expert``, ``push_expert_to_hub``), all reachable from the ``PeftModel`` that ``get_peft_model`` returns.
Quantized base layers (bitsandbytes, GPTQ, ...) are not supported yet: the dispatch below refuses them clearly.
"""

from __future__ import annotations

import copy
import functools
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path

import torch
from peft.tuners.lora import LoraModel
from peft.tuners.tuners_utils import check_target_module_exists
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..io.hub import push_folder_to_hub, resolve_expert_folder
from ..ops import cpu_kernel
from ..ops.dispatch import STRATEGIES
from ..ops.settings import RoutingSettings
from .config import RoutingLoraConfig
from .expert_folder import ExpertFiles, read_expert_folder, write_expert_folder
from .expert_tensors import KEY_PREFIX, ROUTE_SUFFIX
from .fit import plan_expert_load, text_hidden_size, text_num_blocks
from .language_model import is_beside_language_model, language_model_path
from .layer import PHASES, RoutingLinear
from .library_lock import LibraryLock
from .names import check_expert_name
from .prototype import Prototype, check_prototype_fits, prototype_from
from .prototype_router import PrototypeRouter


class ExpertConfigs(dict):
    """The tuner's ``peft_config`` dict, which still answers for removed experts.

    ``PeftModel`` caches its active adapter name and looks up ``peft_config[name]`` on every forward (for the task
    type). After ``remove_expert`` of that expert, or of the last one, PEFT would raise KeyError; we answer with the
    removed expert's config instead (only ``[]`` falls back: ``in``, ``keys()`` and iteration list live experts only).
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.removed: dict = {}

    def __delitem__(self, name) -> None:
        self.removed[name] = self[name]
        super().__delitem__(name)

    def __missing__(self, name):
        if isinstance(name, str) and name in self.removed:
            return self.removed[name]
        raise KeyError(name)


def _changes_library(method: Callable) -> Callable:
    """Run ``method`` alone, with no forward running (``library_lock``'s contract)."""

    @functools.wraps(method)
    def changing(self, *args, **kwargs):
        with self.library_lock.changing():
            return method(self, *args, **kwargs)

    return changing


class RoutingLoraModel(LoraModel):
    """PEFT tuner for routed LoRA experts; see the module docstring."""

    prefix: str = "lora_"
    _routing_phase: str = "expert"
    _train_phase: bool | None = None  # None: follow the active expert's inference_mode, as PEFT does
    _routing_settings: RoutingSettings | None = None
    # (phase, trained expert) whose requires_grad flags are in place; None after anything else may have changed them
    _grads_applied: tuple | None = None
    _layer_cache: list | None = None
    _prototype_router: PrototypeRouter | None = None
    _merged_adapters: frozenset = frozenset()  # made by add_weighted_adapter: plain LoRA, never routed
    _merging: str | None = None  # the adapter add_weighted_adapter is injecting right now

    def __init__(self, model: nn.Module, peft_config, adapter_name: str, **kwargs) -> None:
        object.__setattr__(self, "library_lock", LibraryLock())  # before PEFT's __init__ injects the first expert
        super().__init__(model, peft_config, adapter_name, **kwargs)
        self.peft_config = ExpertConfigs(self.peft_config)
        self.model.peft_config = self.peft_config
        # every forward of the base model holds the library unchanged, by whichever PEFT path it is called
        self.model.register_forward_pre_hook(self._hold_library)
        self.model.register_forward_hook(self._release_library, always_call=True)

    def _hold_library(self, module, args) -> None:
        # torch.compile cannot trace a thread lock: a compiled forward holds none (README, "Threads")
        if not torch.compiler.is_compiling():
            self.library_lock.acquire_read()

    def _release_library(self, module, args, output) -> None:
        if not torch.compiler.is_compiling():
            self.library_lock.release_read()

    def generate(self, *args, **kwargs):
        """The model's ``generate``, with the library held unchanged for the whole call (every step routes alike)."""
        with self.library_lock.reading():
            return self.model.generate(*args, **kwargs)

    # ----------------------------------------------------------------------------------------------------- PEFT hooks
    @staticmethod
    def _create_new_module(lora_config, adapter_name, target, **kwargs):
        base = target.get_base_layer() if hasattr(target, "get_base_layer") else target
        if isinstance(base, Conv1D):
            if not lora_config.fan_in_fan_out:
                lora_config.fan_in_fan_out = True  # as PEFT does for GPT-2's Conv1D
            kwargs["is_target_conv_1d_layer"] = True
        elif not isinstance(base, nn.Linear) or type(base).__module__.startswith(("bitsandbytes", "auto_gptq")):
            raise ValueError(
                f"Routed LoRA supports torch.nn.Linear and transformers Conv1D layers, not {type(base).__name__}. "
                "Remove this module from target_modules (quantized layers are not supported yet)."
            )
        return RoutingLinear(target, adapter_name, config=lora_config, **kwargs)

    def _check_target_module_exists(self, peft_config, key: str):
        if getattr(peft_config, "language_model_only", False) and self._is_non_language_module(key):
            return False
        return check_target_module_exists(peft_config, key)

    @_changes_library
    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        """PEFT's injection, after every check of the expert (every way an expert arrives comes through here).

        A config read by ``RoutingLoraConfig.from_pretrained`` (``PeftModel.from_pretrained``, ``load_adapter``)
        carries the folder's checked weights; they are checked against this model before anything is injected. If
        injection fails half-way, every layer it wrapped is put back, so the base model is as it was.
        """
        others = [name for name in self.peft_config if name != adapter_name]
        check_expert_name(adapter_name, model, others)
        config = self.peft_config.get(adapter_name)
        if config is not None:
            if not isinstance(config, RoutingLoraConfig):
                raise ValueError(
                    f"Adapter {adapter_name!r} has a {type(config).__name__}; a routed model holds routed experts "
                    "only. Add a plain LoRA folder with model.add_expert(path, allow_missing_routes=True).")
            if adapter_name == self._merging:  # PEFT copied the first expert's config: a merge is no task
                config.drop_expert_fields()
            _check_prototype(config, model, f"expert {adapter_name!r}")
            tensors, config.checked_tensors = config.checked_tensors, None
            if tensors is not None:
                files = ExpertFiles(config, tensors, config.loaded_from or f"expert {adapter_name!r}")
                plan_expert_load(model, files, self._check_target_module_exists, allow_missing_routes=False)
        try:
            super().inject_adapter(model, adapter_name, *args, **kwargs)
        except BaseException:
            _undo_injection(model, adapter_name)
            raise
        self._apply_phase(library_changed=True)

    @_changes_library
    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str, *args,
                             **kwargs) -> None:
        """PEFT's merge of experts into a new plain-LoRA adapter, usable in the expert phase only.

        The merge has no trained routing vectors, so it is kept out of the routed library: ``set_phase('route')``
        and ``set_phase('router', ...)`` refuse while it exists (its zero vector would take tokens from the trained
        experts). Call it in the expert phase; ``delete_adapter(adapter_name)`` removes it again. A merge is no
        task, so it carries no prototype, whatever its experts carry.
        """
        if self.phase[0] != "expert":
            raise ValueError(
                f"add_weighted_adapter makes a plain LoRA adapter, which the {self.phase[0]!r} phase would route as "
                "if it were a trained expert. Call set_phase('expert', name) first, then "
                f"set_phase('expert', {adapter_name!r}) to use the merge.")
        if adapter_name in self.peft_config:  # PEFT would return without a word, and the name would count as a merge
            raise ValueError(f"An adapter named {adapter_name!r} exists already; choose another name for the merge.")
        self._merging = adapter_name
        try:
            super().add_weighted_adapter(adapters, weights, adapter_name, *args, **kwargs)
        except BaseException:
            if adapter_name in self.peft_config:  # injected, then the merge failed: no half-made adapter stays
                self.delete_adapter(adapter_name)
            raise
        finally:
            self._merging = None
        self._merged_adapters = self._merged_adapters | {adapter_name}

    @property
    def merged_adapters(self) -> list[str]:
        """Adapters made by ``add_weighted_adapter``: usable with set_phase('expert', name), never routed."""
        return [name for name in self.peft_config if name in self._merged_adapters]

    @_changes_library
    def delete_adapter(self, adapter_name: str) -> None:
        was_phase_expert = self.phase[1] == adapter_name
        super().delete_adapter(adapter_name)
        self._merged_adapters = self._merged_adapters - {adapter_name}
        if was_phase_expert:
            self._routing_phase = "route"
        self._apply_phase(library_changed=True)

    # ------------------------------------------------------------------------------------------------------ library
    @property
    def experts(self) -> list[str]:
        """Names of the experts in the library, in the order they were added."""
        return list(self.peft_config.keys())

    @property
    def routing_settings(self) -> RoutingSettings:
        """The route-phase rule: from the first expert's config unless set_phase('route', ...) changed it."""
        if self._routing_settings is None:
            first = next(iter(self.peft_config.values()), None)
            return first.routing_settings() if first is not None else RoutingSettings()
        return self._routing_settings

    @property
    def phase(self) -> tuple[str, str | None]:
        """(phase, expert): the expert is PEFT's active adapter in the expert/router phases, None in route."""
        if self._routing_phase == "route" or not self.active_adapters:
            return self._routing_phase, None
        return self._routing_phase, self.active_adapters[0]

    @_changes_library
    def set_phase(
        self,
        phase: str,
        expert: str | None = None,
        *,
        top_k: int | None = None,
        temperature: float | None = None,
        score_norm: str | None = None,
        mixing: str | None = None,
        router: str | None = None,
        prototype_candidates: int | None = None,
        prototype_margin: float | None = None,
        prototype_prior: float | None = None,
        fallback: str | None = None,
        prototype_pooling: str | None = None,
    ) -> None:
        """Switch between the method's three phases.

        * ``"expert", name``: plain LoRA of ``name``; only its A/B are trainable.
        * ``"router", name``: ``W0 u + sigmoid(v . u) s B A u``; only its routing vectors are trainable.
        * ``"route"``: every expert, per token top-k routing; nothing trainable. Keyword overrides change the rule.

        Args:
            phase: ``"expert"``, ``"router"`` or ``"route"``.
            expert: the expert trained in the expert/router phases (none in the route phase).
            top_k: experts per token (route phase; kept for later calls).
            temperature: softmax temperature (route phase).
            score_norm: ``"none"`` or ``"standardize"`` (route phase).
            mixing: ``"softmax"`` or ``"sigmoid"`` (route phase).
            router: ``"token"``, ``"prototype"`` or ``"token+prototype"`` (route phase; ``RoutingSettings``).
            prototype_candidates: token+prototype: nearest prototypes the token top-k picks among.
            prototype_margin: token+prototype: the confidence gate on the nearest prototype's lead.
            prototype_prior: token+prototype: weight of the additive log-prior (0: restrict instead).
            fallback: ``"base"``: no expert where the prefix is far from every prototype; ``"none"``.
            prototype_pooling: ``"prefix"`` (each position's prefix) or ``"prompt"`` (the prompt decides).
        """
        overrides = dict(top_k=top_k, temperature=temperature, score_norm=score_norm, mixing=mixing, router=router,
                         prototype_candidates=prototype_candidates, prototype_margin=prototype_margin,
                         prototype_prior=prototype_prior, fallback=fallback, prototype_pooling=prototype_pooling)
        if phase not in PHASES:
            raise ValueError(f"Unknown phase {phase!r}; use one of {PHASES}.")
        if phase != "expert" and self.merged_adapters:
            raise ValueError(
                f"set_phase({phase!r}) routes the library, but {self.merged_adapters} were made by "
                "add_weighted_adapter and have no trained routing vectors. Remove them with delete_adapter(name) "
                "first (or use them with set_phase('expert', name)).")
        if phase == "route":
            if expert is not None:
                raise ValueError("set_phase('route') uses every expert; do not pass an expert name.")
            self._routing_settings = self.routing_settings.replace(**overrides)
        else:
            if expert not in self.peft_config:
                raise ValueError(f"set_phase({phase!r}, expert) needs one of the experts {self.experts}, "
                                 f"got {expert!r}.")
            if any(v is not None for v in overrides.values()):
                raise ValueError("Routing options apply to set_phase('route') only.")
            self.set_adapter(expert)
        self._routing_phase, self._train_phase = phase, phase != "route"
        self._apply_phase()
        if phase == "route":
            self._prepare_cpu_kernel()

    def _prepare_cpu_kernel(self) -> None:
        """Build (or load) the CPU kernel now, not inside the first forward or a torch.compile trace of it."""
        layers = self.routing_layers()
        if layers and layers[0].base_layer.weight.device.type == "cpu":
            cpu_kernel.ready()  # False at once where PEFT_ROUTING_CPU_KERNEL=0

    @_changes_library
    def set_routing_strategy(self, strategy: str) -> None:
        """Force how the route phase computes; for testing and benchmarking, as every strategy gives the same result
        up to float rounding.

        Args:
            strategy: one of ``peft_routing.ops.STRATEGIES``: ``"auto"`` (the default) picks per call; ``"torch"``
                is auto without the compiled kernels; ``"cpu_kernel"``, ``"triton"``, ``"dense"``, ``"sorted"``,
                ``"padded"``, ``"grouped"``, ``"gather"`` and ``"loop"`` force one path.
        """
        if strategy not in STRATEGIES:
            raise ValueError(f"Unknown routing strategy {strategy!r}; use one of {STRATEGIES}.")
        for layer in self.routing_layers():
            layer.routing_strategy = strategy

    @_changes_library
    def set_adapter(self, *args, **kwargs):
        """PEFT's set_adapter, then the phase's trainable flags again (PEFT makes the whole adapter trainable, which
        Trainer's resume path would otherwise turn into training LoRA A/B in the router phase)."""
        self._grads_applied = None
        result = super().set_adapter(*args, **kwargs)
        self._apply_phase()
        return result

    @_changes_library
    def set_requires_grad(self, adapter_names, requires_grad: bool = True) -> None:
        """PEFT's explicit switch of an adapter's gradients (LoRA A/B and routing vectors alike); the next
        ``set_phase`` sets the phase's flags afresh instead of trusting the ones it set before."""
        super().set_requires_grad(adapter_names, requires_grad)
        self._grads_applied = None

    def _check_merge_allowed(self) -> None:
        """Merging is plain LoRA's: allowed in the expert phase only (every other phase computes what no merged
        weight can: a per-token mixture, or a gate on each token)."""
        super()._check_merge_allowed()
        phase = self.phase[0]
        if phase != "expert":
            raise ValueError(
                f"Cannot merge in the {phase!r} phase: a merged weight holds one fixed update, but this phase routes "
                "(or gates) every token, so the merged model would silently compute something else. To merge one "
                "expert, call set_phase('expert', name) first; to drop every expert, use unload().")

    def _apply_phase(self, library_changed: bool = False) -> None:
        """Push the phase to every layer and set requires_grad for exactly the parameters it trains.

        The layers' expert stacks follow a library change at once (not on a phase switch), and the
        requires_grad walk (O(layers x experts)) is skipped when the flags it would set are already in place, so that
        switching route settings (top_k, ...) between forwards costs next to nothing.
        """
        phase, expert = self.phase
        settings = self.routing_settings
        train = self._train_phase
        if train is None:  # before any set_phase: behave like PEFT's LoRA (trainable unless loaded for inference)
            train = expert is not None and not self.peft_config[expert].inference_mode
        if not train:
            expert = None
        if library_changed:
            self._layer_cache = self._grads_applied = None
        grads = (phase, expert)
        for layer in self.routing_layers():
            layer.routing_phase, layer.routing_settings = phase, settings
            if library_changed:
                layer.sync_expert_stack()
            if grads == self._grads_applied:
                continue
            for name in layer.lora_A:
                train_lora = phase == "expert" and name == expert
                layer.lora_A[name].requires_grad_(train_lora)
                layer.lora_B[name].requires_grad_(train_lora)
                layer.lora_route[name].requires_grad_(phase == "router" and name == expert)
        self._grads_applied = grads
        self._sync_prototype_router(phase, settings)

    def _sync_prototype_router(self, phase: str, settings: RoutingSettings) -> None:
        """Hooks of a prototype router in the route phase (built anew: the library or the rule may have changed)."""
        wanted = phase == "route" and settings.uses_prototypes
        if self._prototype_router is None and not wanted:
            return
        layers = {path: m for path, m in self.model.named_modules() if isinstance(m, RoutingLinear)}
        if self._prototype_router is not None:
            self._prototype_router.detach(layers)
            self._prototype_router = None
        if wanted:
            prototypes = {name: self.expert_prototype(name) for name in self.experts}
            self._prototype_router = PrototypeRouter(self.model, layers, self.experts, prototypes, settings)

    @contextmanager
    def prompt_positions(self, mask: torch.Tensor) -> Iterator[None]:
        """Forwards inside the block take only ``mask``'s positions as each sequence's prompt.

        Only ``prototype_pooling="prompt"`` reads it: a teacher-forced pass over prompt + answer then routes as
        ``generate()`` on the prompt alone would (the answer does not take part in the choice). Elsewhere it changes
        nothing.

        Args:
            mask: [batch, positions] of the coming forwards' input, True at the prompt's positions.
        """
        router = self._prototype_router
        if router is None:
            yield
            return
        router.prompt_mask = mask
        try:
            yield
        finally:
            router.prompt_mask = None

    # --------------------------------------------------------------------------------------------------- prototypes
    def expert_prototype(self, name: str) -> Prototype | None:
        """The expert's task prototype (checked), or None when it has none.

        Args:
            name: the expert.
        """
        config = self.peft_config[name]
        return prototype_from(config.prototype, getattr(config, "prototype_vector", None), f"expert {name!r}")

    @_changes_library
    def set_prototype(self, name: str, prototype: Prototype) -> None:
        """Give an expert its task prototype (``peft_routing.compute_prototype`` computes one from task data).

        Args:
            name: the expert.
            prototype: the prototype; checked against this model before anything changes.
        """
        if name not in self.peft_config:
            raise ValueError(f"No expert named {name!r}; the experts are {self.experts}.")
        checked = prototype_from(prototype.fields(), prototype.vector, f"expert {name!r}")
        check_prototype_fits(checked, text_hidden_size(self.model), text_num_blocks(self.model), f"expert {name!r}")
        config = self.peft_config[name]
        config.prototype, config.prototype_vector = checked.fields(), checked.vector
        self._apply_phase()


    def routing_layers(self) -> list[RoutingLinear]:
        """The routed layers, cached until the library changes (walking every module grows with the library)."""
        if self._layer_cache is None:
            self._layer_cache = [m for m in self.model.modules() if isinstance(m, RoutingLinear)]
        return self._layer_cache

    def _is_non_language_module(self, key: str) -> bool:
        """True for modules beside the language model (vision tower, projector ...): see ``language_model``."""
        if not hasattr(self, "_language_model_path"):
            self._language_model_path = language_model_path(self.model)
        return is_beside_language_model(key, self._language_model_path)

    # ------------------------------------------------------------------------------------------------ expert verbs
    @_changes_library
    def add_expert(
        self,
        path_or_repo_id: str | os.PathLike,
        adapter_name: str | None = None,
        revision: str | None = None,
        subfolder: str | None = None,
        *,
        allow_missing_routes: bool = False,
        token: str | None = None,
        allow_pickle: bool = False,
    ) -> str:
        """Add an expert from a local folder or a Hub repo; returns its name.

        Everything is checked (name, module paths, shapes, routing vectors) before the model changes, and a failure
        while loading removes the half-added expert, so a failed call leaves the model as it was.

        Args:
            path_or_repo_id: a local expert folder or a Hub repo id.
            adapter_name: the expert's name (default: the name it was saved under, else the folder's name).
            revision: the Hub revision.
            subfolder: the expert's folder inside the repo or local folder.
            allow_missing_routes: accept a plain LoRA folder; its routing vectors start at zero.
            token: a Hub token for private or gated repos.
            allow_pickle: read ``adapter_model.bin`` when there is no safetensors file (only from people you trust).
        """
        folder = resolve_expert_folder(path_or_repo_id, revision=revision, subfolder=subfolder, token=token)
        files = read_expert_folder(folder, allow_pickle=allow_pickle)
        name = adapter_name or files.config.expert_name or _default_name(path_or_repo_id, subfolder)
        check_expert_name(name, self.model, self.experts)
        plan = plan_expert_load(self.model, files, self._check_target_module_exists, allow_missing_routes)
        _check_prototype(files.config, self.model, f"{files.source}")
        config = copy.deepcopy(files.config)
        config.inference_mode = True
        self.peft_config[name] = config
        try:
            self.inject_adapter(self.model, name)
            self._cast_adapter_dtype(name, autocast_adapter_dtype=True)
            self._copy_expert_tensors(name, plan)
        except BaseException:
            if name in self.peft_config:
                self.delete_adapter(name)
            raise
        self._apply_phase(library_changed=True)
        return name

    def _copy_expert_tensors(self, name: str, plan: dict[str, dict[str, torch.Tensor]]) -> None:
        layers = dict(self.model.named_modules())
        with torch.no_grad():
            for path, tensors in plan.items():
                layer = layers[path]
                layer.lora_A[name].weight.copy_(tensors["lora_A"])
                layer.lora_B[name].weight.copy_(tensors["lora_B"])
                layer.lora_route[name].copy_(tensors["lora_route"])

    @_changes_library
    def remove_expert(self, name: str) -> None:
        """Remove an expert from the library (its files on disk are untouched).

        Args:
            name: the expert to remove.
        """
        if name not in self.peft_config:
            raise ValueError(f"No expert named {name!r}; the experts are {self.experts}.")
        self.delete_adapter(name)

    def expert_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        """The expert's tensors under PEFT's checkpoint keys (no adapter name inside).

        Args:
            name: the expert.
        """
        if name not in self.peft_config:
            raise ValueError(f"No expert named {name!r}; the experts are {self.experts}.")
        tensors = {}
        for path, layer in self.model.named_modules():
            if isinstance(layer, RoutingLinear) and name in layer.lora_A:
                tensors[f"{KEY_PREFIX}{path}.lora_A.weight"] = layer.lora_A[name].weight
                tensors[f"{KEY_PREFIX}{path}.lora_B.weight"] = layer.lora_B[name].weight
                tensors[f"{KEY_PREFIX}{path}{ROUTE_SUFFIX}"] = layer.lora_route[name]
        return tensors

    def expert_config_for_saving(self, name: str) -> RoutingLoraConfig:
        """The expert's config with what add_expert needs to check a base model: type, hidden size, shapes.

        Args:
            name: the expert.
        """
        config = copy.deepcopy(self.peft_config[name])
        layers = {p: m for p, m in self.model.named_modules() if isinstance(m, RoutingLinear) and name in m.lora_A}
        config.base_model_type = getattr(getattr(self.model, "config", None), "model_type", None)
        config.base_hidden_size = text_hidden_size(self.model)
        config.module_shapes = {p: [m.out_features, m.in_features, m.r[name]] for p, m in sorted(layers.items())}
        config.expert_name = name
        config.inference_mode = True
        for setting in fields(RoutingSettings):
            setattr(config, setting.name, getattr(self.routing_settings, setting.name))
        return config

    def save_expert(
        self, name: str, directory: str | os.PathLike, as_plain_lora: bool = False, overwrite: bool = False
    ) -> Path:
        """Write one expert as a standard adapter folder (atomically).

        ``as_plain_lora=True`` writes a stock ``LoraConfig`` folder that PEFT loads without this package (same
        expert-phase output) and puts the routing vectors into ``routing_vectors.safetensors``.

        Args:
            name: the expert to save.
            directory: the folder to write.
            as_plain_lora: write a stock LoRA folder (routing vectors in a side file).
            overwrite: replace an existing non-empty folder (only once the new one is complete).
        """
        tensors = self.expert_state_dict(name)
        config = self.expert_config_for_saving(name)
        return write_expert_folder(directory, config, tensors, as_plain_lora=as_plain_lora, overwrite=overwrite)

    def push_expert_to_hub(
        self,
        name: str,
        repo_id: str,
        *,
        as_plain_lora: bool = False,
        private: bool | None = None,
        token: str | None = None,
        revision: str | None = None,
        subfolder: str | None = None,
        commit_message: str | None = None,
    ):
        """Upload one expert folder to a Hub model repo (created if needed); add_expert(repo_id) reads it back.

        Args:
            name: the expert to upload.
            repo_id: the Hub model repo.
            as_plain_lora: upload a stock LoRA folder (routing vectors in a side file).
            private: visibility of a newly created repo.
            token: a Hub token with write access.
            revision: the branch to commit to.
            subfolder: upload into this folder of the repo.
            commit_message: the commit's message.
        """
        tensors = self.expert_state_dict(name)
        config = self.expert_config_for_saving(name)
        return push_folder_to_hub(
            lambda folder: write_expert_folder(folder, config, tensors, as_plain_lora=as_plain_lora),
            repo_id,
            private=private,
            token=token,
            revision=revision,
            path_in_repo=subfolder,
            commit_message=commit_message or f"Upload routed LoRA expert {name!r}",
        )


def _undo_injection(model: nn.Module, name: str) -> None:
    """Take ``name`` out of every routed layer; a layer left with no expert is replaced by its base layer."""
    for path, module in list(model.named_modules()):
        if not isinstance(module, RoutingLinear) or name not in module.lora_A:
            continue
        if len(module.lora_A) > 1:
            module.delete_adapter(name)
            continue
        parent_path, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent_path) if parent_path else model, child, module.get_base_layer())


def _check_prototype(config: RoutingLoraConfig, model: nn.Module, where: str) -> None:
    """Refuse a malformed prototype, or one that does not fit ``model``; keep the vector in float32, unit norm."""
    vector = getattr(config, "prototype_vector", None)
    if config.prototype is None and vector is None:
        return
    prototype = prototype_from(config.prototype, vector, where)
    check_prototype_fits(prototype, text_hidden_size(model), text_num_blocks(model), where)
    config.prototype_vector = prototype.vector


def _default_name(path_or_repo_id: str | os.PathLike, subfolder: str | None) -> str:
    """An expert name from where it came from: the subfolder, else the last path / repo component."""
    if subfolder:
        return Path(subfolder).name
    return Path(str(path_or_repo_id).rstrip("/")).name.replace(".", "_")


