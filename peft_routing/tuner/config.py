"""``RoutingLoraConfig``: LoRA's config plus the routing knobs of the method."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from peft import LoraConfig

from ..io.safe_files import read_json_object
from ..ops.settings import RoutingSettings
from .config_policy import ExpertConfigError, check_config_fields, neutralise_loaded_fields
from .expert_weights import fetch_checked_tensors
from .peft_type import routing_lora_peft_type
from .prototype import read_prototype_vector

# The attention and MLP projections of Llama-style decoders (Llama, Mistral, Qwen2, SmolLM2 ...): the usual
# target_modules for adapting every linear layer of the language model.
LLAMA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

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
    router: str = field(
        default="token",
        metadata={"help": "'token' (paper), 'prototype' (REPRO in one pass) or 'token+prototype' (ops.prototypes)."},
    )
    prototype_candidates: int = field(default=1, metadata={"help": "token+prototype: nearest prototypes allowed."})
    prototype_margin: float = field(default=0.0, metadata={"help": "token+prototype: confidence gate on the lead."})
    prototype_prior: float = field(default=0.0, metadata={"help": "token+prototype: weight of the log-prior."})
    fallback: str = field(
        default="none", metadata={"help": "'base': no expert where the prefix is far from every prototype."}
    )
    prototype_pooling: str = field(
        default="prefix",
        metadata={"help": "'prefix' (each position's own prefix) or 'prompt' (the whole prompt decides the sequence)."},
    )
    language_model_only: bool = field(
        default=True,
        metadata={"help": "In a multimodal model adapt only the language model, never the vision tower/projector."},
    )
    # Filled by save_expert so add_expert can check that an expert fits a base model before changing anything.
    base_model_type: str | None = field(default=None, metadata={"help": "model_type of the base model."})
    base_hidden_size: int | None = field(default=None, metadata={"help": "hidden_size of the language model."})
    module_shapes: dict | None = field(
        default=None, metadata={"help": "Adapted module path -> [out_features, in_features, r]."}
    )
    expert_name: str | None = field(default=None, metadata={"help": "Name the expert was saved under."})
    prototype: dict | None = field(
        default=None,
        metadata={"help": "How the task prototype in prototype.safetensors was computed: layer, pooling, examples, "
                          "floor, prompt_floor (tuner.prototype)."},
    )

    def __post_init__(self) -> None:
        check_config_fields(self)  # before PEFT's own post-init, which acts on some of these fields
        super().__post_init__()
        self.peft_type = routing_lora_peft_type()
        self.routing_settings()  # validates every routing field, with RoutingSettings' messages
        # the prototype's vector, read with the config (from_pretrained) and never written into adapter_config.json
        self.prototype_vector = getattr(self, "prototype_vector", None)
        # set by from_pretrained: the folder's checked weights, which the tuner checks against the model before it
        # injects anything (PeftModel.from_pretrained / load_adapter); dropped once the expert is in
        self.loaded_from = getattr(self, "loaded_from", None)
        self.checked_tensors = getattr(self, "checked_tensors", None)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, subfolder: str | None = None, **kwargs):
        """PEFT's loader, plus the prototype vector when the config says the expert has one.

        PeftModel.from_pretrained and load_adapter read the config through this, so the prototype arrives by every
        way an expert is loaded, and the config remembers where it came from, so that the tuner checks the weights
        there before it injects anything (``RoutingLoraModel.inject_adapter``).
        """
        where = f"{pretrained_model_name_or_path}/{subfolder + '/' if subfolder else ''}adapter_config.json"
        try:
            config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        except (ValueError, TypeError) as error:
            if str(pretrained_model_name_or_path) in str(error):
                raise
            raise ExpertConfigError(f"{where}: {error}") from None
        hub_kwargs, _, _ = cls._split_kwargs(kwargs)
        hub_kwargs.pop("user_agent", None)
        if config.prototype is not None:
            config.prototype_vector = read_prototype_vector(pretrained_model_name_or_path, subfolder, **hub_kwargs)
        config.loaded_from, config.checked_tensors = fetch_checked_tensors(
            pretrained_model_name_or_path, subfolder, config.module_shapes, **hub_kwargs)
        return config

    @classmethod
    def from_json_file(cls, path_json_file: str, **kwargs) -> dict:
        """The config file's fields, read safely (size, symlinks, nesting) and neutralised (``config_policy``)."""
        known = {f.name for f in fields(cls) if f.init}
        return neutralise_loaded_fields(read_json_object(path_json_file), str(path_json_file), known)

    def drop_expert_fields(self) -> RoutingLoraConfig:
        """Forget what describes one trained expert (its name, module shapes, task prototype, where it was loaded
        from), keeping the settings: for a config copied from an expert to make another adapter (a new expert, a
        merge), which would otherwise claim the first expert's prototype as its own. Returns ``self``."""
        self.expert_name = self.module_shapes = self.prototype = None
        self.prototype_vector = self.loaded_from = self.checked_tensors = None
        return self

    def routing_settings(self) -> RoutingSettings:
        """The route-phase rule this config describes."""
        return RoutingSettings(**{f.name: getattr(self, f.name) for f in fields(RoutingSettings)})
