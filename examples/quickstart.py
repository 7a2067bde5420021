"""Quickstart: teach a small Llama two tasks one after another, then route between them in one forward pass.

Runs offline in well under a minute on a CPU. Task "count" continues ascending runs of tokens 0-15, task
"mirror" descending runs of tokens 16-31; each expert sees only its own task's data. After both stages, the
route phase sends each token to an expert without being told the task.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import peft_routing  # noqa: F401  registers the adapter type with PEFT
from peft_routing import RoutingLoraConfig

VOCAB, LENGTH = 32, 12


def task_batch(task: str, size: int, generator: torch.Generator) -> torch.Tensor:
    """Each task has its own "domain" (half of the vocabulary), as real tasks differ in what their text looks like."""
    half = VOCAB // 2
    starts = torch.randint(0, half, (size, 1), generator=generator)
    steps = torch.arange(LENGTH)[None]
    return (starts + steps) % half if task == "count" else half + (starts - steps) % half


def train(model, task: str, steps: int, lr: float, generator: torch.Generator) -> float:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        ids = task_batch(task, 32, generator)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    return loss.item()


def accuracy(model, task: str, generator: torch.Generator) -> float:
    ids = task_batch(task, 64, generator)
    with torch.no_grad():
        predictions = model(input_ids=ids).logits[:, 1:-1].argmax(-1)
    return (predictions == ids[:, 2:]).float().mean().item() * 100


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=None, help="where to save the experts (default: a temp folder)")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="peft-routing-quickstart-"))
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    base = LlamaForCausalLM(config)  # a random "base model": it knows neither task
    base.save_pretrained(out / "base")

    lora = dict(r=16, lora_alpha=32, target_modules="all-linear")
    model = get_peft_model(base, RoutingLoraConfig(**lora), adapter_name="count")
    for task in ("count", "mirror"):
        if task not in model.experts:
            model.add_adapter(task, RoutingLoraConfig(**lora))
        model.set_phase("expert", task)  # stage 1: this task's LoRA only
        expert_loss = train(model, task, steps=300, lr=3e-3, generator=generator)
        model.set_phase("router", task)  # stage 2: this task's routing vectors only
        router_loss = train(model, task, steps=40, lr=2e-2, generator=generator)
        model.save_expert(task, out / task)
        print(f"learnt {task!r}: expert loss {expert_loss:.3f}, router loss {router_loss:.3f} -> {out / task}")

    fresh = LlamaForCausalLM.from_pretrained(out / "base").eval()
    library = PeftModel.from_pretrained(fresh, str(out / "count"), adapter_name="count")
    library.add_expert(out / "mirror")
    print(f"library {library.experts}; next-token accuracy (%) on fresh sequences:")
    print(f"{'task':<8} {'base':>6} {'own expert':>11} {'routed (no task id)':>20}")
    for task in ("count", "mirror"):
        with library.disable_adapter():
            base_accuracy = accuracy(library, task, torch.Generator().manual_seed(1))
        library.set_phase("expert", task)
        own = accuracy(library, task, torch.Generator().manual_seed(1))
        library.set_phase("route", top_k=1)
        routed = accuracy(library, task, torch.Generator().manual_seed(1))
        print(f"{task:<8} {base_accuracy:6.1f} {own:11.1f} {routed:20.1f}")


if __name__ == "__main__":
    main()
