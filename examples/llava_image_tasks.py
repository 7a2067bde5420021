"""A LLaVA-style model learns two image tasks one after another; only its language model is adapted.

Runs in seconds offline: the model is a tiny LLaVA built from a config (CLIP vision tower + 2-block Llama, random
weights, a character tokenizer; peft_routing.demo.tiny_models), and the images are drawn with PIL. With a real LLaVA
checkpoint, pass its model and AutoProcessor instead; nothing else changes.

What it shows: the image-task training path (processor chat template, image tokens, answer-only loss), the vision
side left untouched, and each expert learning its task. What it cannot show: routing. With random weights the
hidden states carry almost no context, and the token that predicts every answer is the same template token
("assistant\n"), so the routing vectors have nothing to tell the tasks apart by; the routed figure it prints is
near chance or below. Routing needs a pretrained model's contextual features: see the SmolLM2 demo
(`peft-routing demo`), where the routed library matches each task's own expert.
Run: python examples/llava_image_tasks.py
"""

from __future__ import annotations

import random

from peft import get_peft_model
from PIL import Image, ImageDraw

from peft_routing import RoutingLoraConfig
from peft_routing.demo.tiny_models import tiny_chat_llava
from peft_routing.workflow import answer_accuracy, learn_task

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (30, 60, 220)}
FAST_EXPERT = dict(max_steps=40, learning_rate=1e-2, lr_scheduler_type="constant", per_device_train_batch_size=8)
FAST_ROUTER = dict(max_steps=4, per_device_train_batch_size=8)


def picture(colour: str, shape: str) -> Image.Image:
    image = Image.new("RGB", (32, 32), "white")
    draw = ImageDraw.Draw(image)
    box = (6, 6, 26, 26)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLOURS[colour])
    return image


def records(task: str, n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        colour, shape = rng.choice(list(COLOURS)), rng.choice(["circle", "square"])
        if task == "colour":
            rows.append({"prompt": "What colour is it?", "response": colour, "image": picture(colour, shape)})
        else:
            rows.append({"prompt": "Which shape?", "response": shape, "image": picture(colour, shape)})
    return rows


def main() -> None:
    model, processor = tiny_chat_llava()
    config = RoutingLoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                   "gate_proj", "up_proj", "down_proj"])
    model = get_peft_model(model, config, adapter_name="colour")  # the vision tower and projector stay frozen
    for task in ("colour", "shape"):
        report = learn_task(model, task, records(task, 64, seed=1), processor, expert_args=FAST_EXPERT,
                            router_args=FAST_ROUTER)
        print(f"learned {task}: loss {report.expert.losses[0][1]:.2f} -> {report.expert.losses[-1][1]:.3f}")
    adapted = {n.split(".lora_A")[0] for n, _ in model.named_parameters() if ".lora_A." in n}
    assert all(".language_model." in n for n in adapted), "only the language model is adapted"
    for task in ("colour", "shape"):
        model.set_phase("expert", task)
        own = answer_accuracy(model, processor, _examples(task))
        model.set_phase("route")
        routed = answer_accuracy(model, processor, _examples(task))
        print(f"{task}: own expert {own:.1f}%, routed library {routed:.1f}% (held-out images; random tiny model, "
              "see the docstring)")


def _examples(task: str):
    from peft_routing.workflow import load_examples

    return load_examples(records(task, 32, seed=2))


if __name__ == "__main__":
    main()
