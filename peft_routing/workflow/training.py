"""The two training stages of one new task, on that task's data only, through transformers' ``Trainer``.

* ``train_expert``: stage 1, the task's LoRA (A, B); every other parameter is frozen.
* ``train_router``: stage 2, the task's routing vectors only (zero-initialised), with the LoRA frozen and the
  output gated by ``sigmoid(v . u)``. Paper defaults: 100 steps at batch 32.
* ``learn_task``: both, then the model is left in the route phase, ready to answer with the whole library.

Nothing here takes or reaches for earlier tasks' data. Because training is ``Trainer``, everything it offers comes
for free: ``accelerate launch`` / DeepSpeed / FSDP, gradient accumulation, bf16, gradient checkpointing, logging.
Pass any ``TrainingArguments`` field as a keyword (``max_steps=60, learning_rate=1e-4``) or a whole
``training_args=TrainingArguments(...)``.
"""

from __future__ import annotations

import copy
import inspect
import os
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerState, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from ..tuner.config import RoutingLoraConfig
from ..tuner.model import RoutingLoraModel
from .collate import ChatCollator, accepts_logits_to_keep
from .data import as_examples
from .prototypes import MAX_PROTOTYPE_EXAMPLES, compute_prototype

# The paper's settings (arXiv 2511.01831, section 4): experts at lr 4e-5 with cosine decay; routing
# vectors 100 steps at batch 32. Epochs of the expert stage are not stated; 3 matches its Seq-FT/MTL baselines.
# The router learning rate is not stated either: vectors start at zero and only their direction matters once
# standardised, so they need a far larger step than LoRA weights (chosen on our demo tasks).
EXPERT_DEFAULTS: dict[str, Any] = dict(
    learning_rate=4e-5, lr_scheduler_type="cosine", num_train_epochs=3, per_device_train_batch_size=8,
)
ROUTER_DEFAULTS: dict[str, Any] = dict(
    learning_rate=1e-2, lr_scheduler_type="constant", max_steps=100, per_device_train_batch_size=32,
)

_COMMON: dict[str, Any] = dict(
    save_strategy="no", report_to="none", logging_steps=10, logging_first_step=True, remove_unused_columns=False,
    label_names=["labels"], dataloader_num_workers=0, dataloader_pin_memory=False, weight_decay=0.0,
)


@dataclass
class StageReport:
    """What one training stage did: its steps, wall time and logged losses [(step, loss), ...]."""

    expert: str
    phase: str
    steps: int
    seconds: float
    examples: int
    losses: list[tuple[int, float]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return dict(expert=self.expert, phase=self.phase, steps=self.steps, seconds=round(self.seconds, 2),
                    examples=self.examples, losses=[[s, round(v, 5)] for s, v in self.losses])


@dataclass
class LearnReport:
    expert: StageReport
    router: StageReport

    def as_dict(self) -> dict[str, Any]:
        return {"expert": self.expert.as_dict(), "router": self.router.as_dict()}


def train_expert(model, expert: str, data, processor, *, config: RoutingLoraConfig | None = None,
                 training_args: TrainingArguments | None = None, max_length: int | None = None,
                 answer_logits_only: bool = True, **overrides: Any) -> StageReport:
    """Stage 1: train the LoRA of ``expert`` on ``data`` (a JSONL path, a list of records or a ``datasets``).

    A new name adds an empty expert first, with ``config`` or, by default, the library's first expert's settings.

    Args:
        model: a routed-LoRA PeftModel.
        expert: the expert to train (created if new).
        data: the task's examples.
        processor: the model's tokenizer or multimodal processor, with a chat template.
        config: the new expert's config (default: shaped like the library's first expert).
        training_args: a whole ``TrainingArguments`` instead of the stage's defaults.
        max_length: cut longer prompts from the left.
        answer_logits_only: run the LM head on the answer positions only (where the model takes
            ``logits_to_keep``).
        **overrides: ``TrainingArguments`` fields (``max_steps=60, learning_rate=1e-4``);
            ``resume_from_checkpoint=path`` continues from a Trainer checkpoint, and checkpoints
            (``save_strategy="steps"``) need an ``output_dir``.
    """
    tuner = _routing_tuner(model)
    examples = as_examples(data)  # every record checked before the model changes
    with rolled_back_on_failure(tuner, expert):
        if expert not in tuner.experts:
            model.add_adapter(expert, config or new_expert_config(tuner))
        tuner.set_phase("expert", expert)
        return _run_stage(model, "expert", expert, examples, processor, EXPERT_DEFAULTS, training_args, max_length,
                          answer_logits_only, overrides)


def train_router(model, expert: str, data, processor, *, training_args: TrainingArguments | None = None,
                 max_length: int | None = None, answer_logits_only: bool = True,
                 prototype_examples: int = MAX_PROTOTYPE_EXAMPLES, **overrides: Any) -> StageReport:
    """Stage 2: train the routing vectors of ``expert`` (its LoRA frozen) on the same task's data, then compute its
    task prototype (``compute_prototype``) from at most ``prototype_examples`` of them.

    Args:
        model: a routed-LoRA PeftModel holding ``expert``.
        expert: the expert whose routing vectors are trained.
        data: the task's examples (a JSONL path, a list of records or a ``datasets``).
        processor: the model's tokenizer or multimodal processor, with a chat template.
        training_args: a whole ``TrainingArguments`` instead of the stage's defaults.
        max_length: cut longer prompts from the left.
        answer_logits_only: run the LM head on the answer positions only (where the model takes
            ``logits_to_keep``).
        prototype_examples: examples the prototype is computed from (0: compute none).
        **overrides: ``TrainingArguments`` fields.
    """
    tuner = _routing_tuner(model)
    if expert not in tuner.experts:
        raise ValueError(f"No expert named {expert!r} to train a router for; the experts are {tuner.experts}. "
                         "Run train_expert first.")
    examples = as_examples(data)
    with rolled_back_on_failure(tuner, expert):
        tuner.set_phase("router", expert)
        report = _run_stage(model, "router", expert, examples, processor, ROUTER_DEFAULTS, training_args,
                            max_length, answer_logits_only, overrides)
        if prototype_examples > 0:
            compute_prototype(model, expert, examples, processor, max_examples=prototype_examples)
    return report


def learn_task(model, expert: str, data, processor, *, config: RoutingLoraConfig | None = None,
               expert_args: dict[str, Any] | None = None, router_args: dict[str, Any] | None = None,
               max_length: int | None = None, answer_logits_only: bool = True,
               output_dir: str | os.PathLike | None = None, resume_from_checkpoint: bool = False) -> LearnReport:
    """Both stages for one new task, then the route phase over the whole library.

    With ``output_dir``, each stage keeps Trainer checkpoints in ``output_dir/expert`` and ``output_dir/router``
    (every ``save_steps`` of its args, and at its end); ``resume_from_checkpoint=True`` then continues each stage
    from its latest checkpoint, so a killed run, started again, ends with the weights of an uninterrupted one.

    Args:
        model: a routed-LoRA PeftModel.
        expert: the new task's expert name.
        data: the task's examples (a JSONL path, a list of records or a ``datasets``).
        processor: the model's tokenizer or multimodal processor, with a chat template.
        config: the new expert's config (default: shaped like the library's first expert).
        expert_args: ``TrainingArguments`` fields of the expert stage (e.g. ``{"max_steps": 60}``).
        router_args: ``TrainingArguments`` fields of the router stage.
        max_length: cut longer prompts from the left.
        answer_logits_only: run the LM head on the answer positions only (where the model takes
            ``logits_to_keep``).
        output_dir: where the stages keep their checkpoints (none are kept without it).
        resume_from_checkpoint: continue each stage from its latest checkpoint in ``output_dir``, if it has one.
    """
    examples = as_examples(data)
    common = dict(max_length=max_length, answer_logits_only=answer_logits_only)
    tuner = _routing_tuner(model)
    expert_args, router_args = (_checkpointed(args, output_dir, stage, resume_from_checkpoint)
                                for args, stage in ((expert_args, "expert"), (router_args, "router")))
    with rolled_back_on_failure(tuner, expert):
        expert_report = train_expert(model, expert, examples, processor, config=config, **common, **expert_args)
        router_report = train_router(model, expert, examples, processor, **common, **router_args)
        tuner.set_phase("route")
    return LearnReport(expert_report, router_report)


@contextmanager
def rolled_back_on_failure(tuner: RoutingLoraModel, expert: str) -> Iterator[None]:
    """On any failure in the block (an error, Ctrl-C), put the model back as it was: a new expert is removed, an
    existing one gets its tensors and prototype back, and the phase is restored.

    Args:
        tuner: the model's ``RoutingLoraModel``.
        expert: the expert the block trains.
    """
    existed = expert in tuner.experts
    saved = {k: v.detach().clone() for k, v in tuner.expert_state_dict(expert).items()} if existed else {}
    prototype = tuner.expert_prototype(expert) if existed else None
    phase, settings = tuner.phase, asdict(tuner.routing_settings)
    try:
        yield
    except BaseException:
        if not existed and expert in tuner.experts:
            tuner.remove_expert(expert)
        elif existed:
            current = tuner.expert_state_dict(expert)
            with torch.no_grad():
                for key, tensor in saved.items():
                    current[key].copy_(tensor)
            config = tuner.peft_config[expert]
            config.prototype = prototype.fields() if prototype else None
            config.prototype_vector = prototype.vector if prototype else None
        tuner.set_phase("route", **settings)
        if phase[0] != "route" and phase[1] in tuner.experts:
            tuner.set_phase(phase[0], phase[1])
        raise


def new_expert_config(tuner: RoutingLoraModel) -> RoutingLoraConfig:
    """A trainable config for a new expert, shaped like the library's first one (same modules, rank, alpha).

    Args:
        tuner: the model's ``RoutingLoraModel`` (``model.base_model``).
    """
    if not tuner.experts:
        raise ValueError("The library has no expert to copy settings from; pass config=RoutingLoraConfig(...).")
    config = copy.deepcopy(tuner.peft_config[tuner.experts[0]]).drop_expert_fields()
    config.inference_mode, config.init_lora_weights = False, True
    return config


# ------------------------------------------------------------------------------------------------------ internals
def _routing_tuner(model) -> RoutingLoraModel:
    tuner = getattr(model, "base_model", None)
    if not isinstance(tuner, RoutingLoraModel):
        raise TypeError("Training needs a routed-LoRA PeftModel: get_peft_model(base, RoutingLoraConfig(...), "
                        "adapter_name=...) or PeftModel.from_pretrained(base, expert_folder) after "
                        "`import peft_routing`.")
    return tuner



def _checkpointed(args: dict[str, Any] | None, output_dir, stage: str, resume: bool) -> dict[str, Any]:
    """A stage's TrainingArguments fields with its checkpoint folder and, when resuming, its latest checkpoint."""
    values = dict(args or {})
    if output_dir is None:
        if resume:
            raise ValueError("resume_from_checkpoint=True needs the output_dir the checkpoints were written to.")
        return values
    folder = Path(output_dir) / stage
    values.setdefault("output_dir", str(folder))
    values.setdefault("save_strategy", "steps")
    latest = get_last_checkpoint(str(folder)) if resume and folder.is_dir() else None
    if latest is not None:
        values.setdefault("resume_from_checkpoint", latest)
    return values


def _stage_args(defaults: dict[str, Any], training_args: TrainingArguments | None, overrides: dict[str, Any],
                output_dir: str) -> TrainingArguments:
    if training_args is not None:
        values = {k: v for k, v in training_args.to_dict().items() if k in _init_fields()}
        values.update(overrides)
    else:
        values = {**_COMMON, **defaults, "output_dir": output_dir, **overrides}
    unknown = set(values) - _init_fields()
    if unknown:
        raise TypeError(f"Unknown training option(s) {sorted(unknown)}: use TrainingArguments field names.")
    return TrainingArguments(**values)


def _init_fields() -> set[str]:
    return set(inspect.signature(TrainingArguments.__init__).parameters) - {"self"}


def _run_stage(model, phase: str, expert: str, data, processor, defaults, training_args, max_length,
               answer_logits_only: bool, overrides: dict[str, Any]) -> StageReport:
    examples = as_examples(data)
    collator = ChatCollator(processor, max_length=max_length,
                            answer_logits_only=answer_logits_only and accepts_logits_to_keep(model))
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="peft-routing-") as scratch:
        args = _stage_args(defaults, training_args, overrides, scratch)
        _check_checkpoints_are_kept(args, scratch)
        trainer = Trainer(model=model, args=args, train_dataset=examples, data_collator=collator)
        resume = args.resume_from_checkpoint  # a TrainingArguments field Trainer reads only from train()'s argument
        if resume is True:
            resume = get_last_checkpoint(args.output_dir)
        finished = _finished_state(resume)
        if finished is not None:
            # Trainer resumed at its last step still runs one more; the weights are all a finished stage needs
            trainer._load_from_checkpoint(resume)
            trainer.state, steps = finished, finished.global_step
        else:
            with warnings.catch_warnings():
                # Trainer itself calls this deprecated transformers property; the warning is not the user's to fix
                warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated",
                                        category=FutureWarning)
                steps = trainer.train(resume_from_checkpoint=resume).global_step
    model.eval()
    losses = [(int(e["step"]), float(e["loss"])) for e in trainer.state.log_history if "loss" in e]
    return StageReport(expert, phase, steps, time.perf_counter() - start, len(examples), losses)


def _finished_state(checkpoint: str | None) -> TrainerState | None:
    """The Trainer state of a checkpoint written at the end of its run, None for any other (or no) checkpoint."""
    if not checkpoint:
        return None
    state_file = Path(checkpoint) / "trainer_state.json"
    if not state_file.is_file():
        return None
    state = TrainerState.load_from_json(str(state_file))
    return state if state.max_steps > 0 and state.global_step >= state.max_steps else None


def _check_checkpoints_are_kept(args: TrainingArguments, scratch: str) -> None:
    """Checkpoints, and a resume from the latest one, need a folder of the user's: the scratch one is deleted."""
    if args.output_dir != scratch:
        return
    if args.save_strategy != "no":
        raise ValueError(f"save_strategy={str(args.save_strategy)!r} writes checkpoints, but no output_dir was "
                         "given: they would be deleted on return. Pass output_dir=... to keep them.")
    if args.resume_from_checkpoint is True:
        raise ValueError("resume_from_checkpoint=True resumes from the latest checkpoint in output_dir; pass "
                         "output_dir=... (or the checkpoint's path instead of True).")
