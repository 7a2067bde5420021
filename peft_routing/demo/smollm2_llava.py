"""A LLaVA-style multimodal SmolLM2, built and aligned offline (no pretrained vision-language model installs offline).

``llava_from_text_model`` puts a text model's weights into a ``LlavaForConditionalGeneration`` with a small CLIP
vision tower and LLaVA's two-layer projector, and builds its processor (the text model's ChatML template, extended
with image slots). ``align_vision`` is LLaVA's stage 1: the language model frozen, the vision tower and projector
learn to caption generated scenes (image_tasks.py). ``load_smollm2_llava`` does both for SmolLM2-135M-Instruct once
and caches the vision weights under ``~/.cache/peft-routing`` (never the repo); later loads take seconds. After
alignment the vision side stays frozen, as the paper freezes it, and the model is an ordinary HF multimodal model.
"""

from __future__ import annotations

import copy
import json
import random
import tempfile
import time
from dataclasses import asdict, dataclass

import torch
from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

from ..io.atomic import staged_path
from ..io.cache import cache_root
from ..workflow.collate import ChatCollator
from .chat import IMAGE_TOKEN, chatml_template, llava_processor
from .image_tasks import IMAGE_SIZE, caption_example

PATCH = 8
SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


@dataclass(frozen=True)
class VisionSettings:
    hidden_size: int = 192
    intermediate_size: int = 384
    num_hidden_layers: int = 2
    num_attention_heads: int = 4


def llava_from_text_model(text_model, tokenizer, vision: VisionSettings = VisionSettings(),
                          default_system: str | None = None, seed: int = 0):
    """(LLaVA model, processor): the text model's weights unchanged, a fresh vision tower and projector.

    Args:
        text_model: a Llama-style causal LM.
        tokenizer: its tokenizer.
        vision: the size of the new vision tower.
        default_system: a system message for conversations without one.
        seed: seeds the vision tower and projector.
    """
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    text_model = copy.deepcopy(text_model)
    if len(tokenizer) > text_model.get_input_embeddings().num_embeddings:  # a row for the image token, whose
        text_model.resize_token_embeddings(len(tokenizer))                   # embedding image features replace
    torch.manual_seed(seed)
    config = LlavaConfig(
        text_config=text_model.config, image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_config=CLIPVisionConfig(**asdict(vision), image_size=IMAGE_SIZE, patch_size=PATCH),
        vision_feature_layer=-1, tie_word_embeddings=text_model.config.tie_word_embeddings,
    )
    model = LlavaForConditionalGeneration(config)
    model.model.language_model.load_state_dict(text_model.model.state_dict())
    model.lm_head.load_state_dict(text_model.lm_head.state_dict())
    template = chatml_template(default_system)
    processor = llava_processor(tokenizer, IMAGE_SIZE, PATCH, template)
    tokenizer.chat_template = template
    return model.eval(), processor


def vision_parameters(model) -> dict[str, torch.nn.Parameter]:
    """The parameters the alignment stage trains: vision tower and projector.

    Args:
        model: a LLaVA model.
    """
    return {name: p for name, p in model.named_parameters() if ".vision_tower." in f".{name}"
            or ".multi_modal_projector." in f".{name}"}


@dataclass(frozen=True)
class AlignmentSettings:
    steps: int = 200
    batch_size: int = 16
    learning_rate: float = 1e-3
    seed: int = 0


def align_vision(model, processor, settings: AlignmentSettings = AlignmentSettings()) -> dict:
    """LLaVA stage 1: train vision tower + projector to caption scenes, the language model frozen.

    Args:
        model: a LLaVA model.
        processor: its processor.
        settings: steps, batch size, learning rate and seed.
    """
    from transformers import Trainer, TrainingArguments

    trained = vision_parameters(model)
    for name, param in model.named_parameters():
        param.requires_grad_(name in trained)
    rng = random.Random(f"alignment-{settings.seed}")
    examples = [caption_example(rng) for _ in range(settings.steps * settings.batch_size)]
    with tempfile.TemporaryDirectory(prefix="align-") as out:
        args = TrainingArguments(output_dir=out, max_steps=settings.steps, learning_rate=settings.learning_rate,
                                 per_device_train_batch_size=settings.batch_size, lr_scheduler_type="cosine",
                                 warmup_steps=max(1, settings.steps // 20), logging_steps=max(1, settings.steps // 10),
                                 save_strategy="no", report_to=[], remove_unused_columns=False, seed=settings.seed,
                                 use_cpu=not torch.cuda.is_available())
        trainer = Trainer(model=model, args=args, train_dataset=examples,
                          data_collator=ChatCollator(processor, answer_logits_only=True))
        started = time.perf_counter()
        output = trainer.train()
    for param in model.parameters():
        param.requires_grad_(False)
    return {"seconds": time.perf_counter() - started, "train_loss": output.training_loss, **asdict(settings)}


def load_smollm2_llava(settings: AlignmentSettings = AlignmentSettings()):
    """(model, processor): SmolLM2-135M-Instruct as a LLaVA whose vision side was aligned once and cached.

    Args:
        settings: the alignment's settings (part of the cache key).
    """
    from safetensors.torch import load_file, save_file

    from .smollm2 import load_smollm2

    text_model, tokenizer = load_smollm2()
    model, processor = llava_from_text_model(text_model, tokenizer, default_system=SMOLLM2_SYSTEM, seed=settings.seed)
    key = "_".join(f"{v}" for v in asdict(settings).values())
    folder = cache_root() / f"smollm2-llava-v1-{key}"
    if not (folder / "vision.safetensors").is_file():
        report = align_vision(model, processor, settings)
        with staged_path(folder, folder=True) as staging:
            staging.mkdir()
            save_file({n: p.detach().contiguous() for n, p in vision_parameters(model).items()},
                      str(staging / "vision.safetensors"))
            (staging / "alignment.json").write_text(json.dumps(report, indent=2))
    weights = load_file(str(folder / "vision.safetensors"))
    missing = set(vision_parameters(model)) - set(weights)
    if missing:
        raise RuntimeError(f"The cached vision weights in {folder} lack {sorted(missing)[:3]}; delete the folder.")
    model.load_state_dict(weights, strict=False)
    return model.eval(), processor
