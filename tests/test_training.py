"""The training API on tiny models: the loss goes down, only the intended parameters change, earlier experts stay
bit-identical, and the answer-only labels / LM-head shortcut give the same loss as the plain computation."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import get_peft_model
from testing_utils import LLAMA_TARGETS, task_records, tiny_chat_llama, tiny_chat_tokenizer

from peft_routing import RoutingLoraConfig
from peft_routing.workflow import (
    IGNORE_INDEX,
    ChatCollator,
    ChatExample,
    answer_accuracy,
    learn_task,
    load_examples,
    train_expert,
    train_router,
)

FAST = dict(max_steps=30, learning_rate=5e-2, per_device_train_batch_size=4, disable_tqdm=True, logging_steps=1,
            lr_scheduler_type="constant")
ROUTER_FAST = dict(max_steps=4, per_device_train_batch_size=4, disable_tqdm=True, logging_steps=1)


def went_down(losses: list[tuple[int, float]]) -> bool:
    """The last three logged losses average at most 60% of the first three (a real decrease, not noise)."""
    first, last = [v for _, v in losses[:3]], [v for _, v in losses[-3:]]
    return sum(last) < 0.6 * sum(first)


def routing_model(first: str = "alpha"):
    config = RoutingLoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, top_k=1)
    return get_peft_model(tiny_chat_llama(), config, adapter_name=first), tiny_chat_tokenizer()


def snapshot(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def changed(before: dict[str, torch.Tensor], model) -> set[str]:
    """Parameters that differ from ``before`` (or are new)."""
    return {name for name, p in model.named_parameters() if name not in before or not torch.equal(before[name], p)}


def test_stages_train_only_their_own_parameters_and_lower_the_loss():
    model, tokenizer = routing_model()
    before = snapshot(model)
    report = train_expert(model, "alpha", task_records("A", "yes"), tokenizer, **FAST)
    moved = changed(before, model)
    assert moved and all(".lora_A.alpha." in n or ".lora_B.alpha." in n for n in moved)
    assert went_down(report.losses), report.losses

    before = snapshot(model)
    router = train_router(model, "alpha", task_records("A", "yes"), tokenizer, **ROUTER_FAST)
    moved = changed(before, model)
    assert moved and all(n.endswith(".lora_route.alpha") for n in moved), moved
    assert router.steps == 4 and router.phase == "router"


def test_learning_a_new_task_leaves_earlier_experts_bit_identical():
    model, tokenizer = routing_model()
    learn_task(model, "alpha", task_records("A", "yes"), tokenizer, expert_args=FAST, router_args=ROUTER_FAST)
    before = snapshot(model)
    report = learn_task(model, "beta", task_records("b", "no", seed=1), tokenizer, expert_args=FAST,
                        router_args=ROUTER_FAST)
    moved = changed(before, model)
    assert moved and all(".beta" in name for name in moved)
    assert not any(".alpha" in name or "lora" not in name for name in moved)
    assert model.base_model.experts == ["alpha", "beta"] and model.base_model.phase == ("route", None)
    assert went_down(report.expert.losses)
    # the new expert copied the library's settings: same modules, same rank
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.r["beta"] == layer.r["alpha"] == 4


def test_training_options_from_transformers_work():
    """Gradient accumulation, gradient checkpointing and bf16 mixed precision come from Trainer, not from us."""
    model, tokenizer = routing_model()
    report = train_expert(model, "alpha", task_records("A", "yes"), tokenizer, **dict(
        FAST, gradient_accumulation_steps=2, gradient_checkpointing=True, max_steps=6))
    assert report.steps == 6 and report.losses[-1][1] < report.losses[0][1]
    model, tokenizer = routing_model()
    mixed = train_expert(model, "alpha", task_records("A", "yes"), tokenizer, **dict(
        FAST, bf16=True, use_cpu=not torch.cuda.is_available(), max_steps=6))  # bf16 on CPU needs use_cpu
    assert mixed.steps == 6 and mixed.losses[-1][1] < mixed.losses[0][1]
    with pytest.raises(TypeError, match="Unknown training option"):
        train_expert(model, "alpha", task_records("A", "yes"), tokenizer, not_an_option=1)


def test_router_needs_an_existing_expert_and_training_needs_a_routing_model():
    model, tokenizer = routing_model()
    with pytest.raises(ValueError, match="No expert named 'ghost'"):
        train_router(model, "ghost", task_records("A", "yes"), tokenizer)
    with pytest.raises(TypeError, match="routed-LoRA PeftModel"):
        train_expert(tiny_chat_llama(), "alpha", task_records("A", "yes"), tokenizer)


# ----------------------------------------------------------------------------------------------------- collation
texts = st.text(alphabet="abcdefgh XYZ0123:.,", min_size=1, max_size=12).filter(lambda s: s.strip())


@settings(max_examples=20, deadline=None)
@given(st.lists(st.tuples(texts, texts), min_size=1, max_size=4))
def test_labels_cover_exactly_the_answer_and_the_lm_head_shortcut_keeps_the_loss(pairs):
    tokenizer = tiny_chat_tokenizer()
    model = tiny_chat_llama()
    examples = load_examples([{"prompt": p, "response": r} for p, r in pairs])
    full = ChatCollator(tokenizer)(examples)
    for row, (_, answer) in zip(full["labels"], pairs):
        labelled = tokenizer.decode(row[row != IGNORE_INDEX])
        assert labelled == answer + "<|im_end|>\n"
    short = ChatCollator(tokenizer, answer_logits_only=True)(examples)
    assert short["logits_to_keep"] < full["input_ids"].shape[1] or len(pairs[0][1]) > 9
    with torch.no_grad():
        reference = model(**full).loss
        shortcut = model(**short).loss
    torch.testing.assert_close(shortcut, reference, rtol=1e-5, atol=1e-6)


def test_greedy_exact_match_equals_generating_the_answer():
    """answer_accuracy (one teacher-forced pass) must agree, example by example, with greedy generate()."""
    model, tokenizer = routing_model()
    records = task_records("A", "yes", n=12) + task_records("b", "ab", n=12, seed=3)
    train_expert(model, "alpha", records, tokenizer, **dict(FAST, max_steps=8))
    model.eval()
    examples = load_examples(records)
    collator = ChatCollator(tokenizer)
    agreed_hits = 0
    for example in examples:
        batch = collator.prompts([example])
        with torch.no_grad():
            output = model.generate(**batch, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        generated = tokenizer.decode(output[0, batch["input_ids"].shape[1]:])
        greedy_right = generated.startswith(example.answer + "<|im_end|>")
        scored_right = answer_accuracy(model, tokenizer, [example]) == 100.0
        assert greedy_right == scored_right, (example.messages, generated)
        agreed_hits += greedy_right
    assert 0 < agreed_hits, "the check is vacuous unless some answers are right"


def test_prompts_for_generation_end_with_the_generation_prompt():
    tokenizer = tiny_chat_tokenizer()
    example = ChatExample([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])
    ids = ChatCollator(tokenizer).prompts([example])["input_ids"][0]
    assert tokenizer.decode(ids).endswith("<|im_start|>assistant\n") and "yo" not in tokenizer.decode(ids)
