"""Learn one task on several processes at once (data parallel), then save the expert once.

``learn_task`` trains through transformers' Trainer, so ``torchrun`` / ``accelerate launch`` spread each batch over
the processes and average the gradients: every rank ends with the same expert, and rank 0 alone writes it.

    torchrun --nproc_per_node 2 examples/learn_data_parallel.py --base BASE_FOLDER --data task.jsonl \\
        --name my_task --out experts/my_task [--cpu]

``--cpu`` trains on CPU processes (gloo), as on a machine without GPUs. Each rank prints a fingerprint of its
trained weights, so you can see that they agree.
"""

from __future__ import annotations

import argparse
import hashlib

import torch
from accelerate import PartialState
from peft import get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from peft_routing import LLAMA_PROJECTIONS, RoutingLoraConfig
from peft_routing.workflow import learn_task


def fingerprint(model, expert: str) -> str:
    """sha256 of the expert's tensors, in a fixed order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.base_model.expert_state_dict(expert).items()):
        digest.update(name.encode() + tensor.detach().float().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="a transformers causal LM folder or Hub id")
    parser.add_argument("--data", required=True, help="the task's JSONL")
    parser.add_argument("--name", required=True)
    parser.add_argument("--out", required=True, help="the expert folder to write (rank 0 only)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cpu", action="store_true", help="CPU processes with the gloo backend")
    args = parser.parse_args()

    torch.manual_seed(0)  # the same initial expert on every rank
    model = AutoModelForCausalLM.from_pretrained(args.base)
    tokenizer = AutoTokenizer.from_pretrained(args.base)
    config = RoutingLoraConfig(r=8, lora_alpha=16, target_modules=list(LLAMA_PROJECTIONS))
    model = get_peft_model(model, config, adapter_name=args.name)
    stage = dict(use_cpu=args.cpu, ddp_backend="gloo" if args.cpu else None, per_device_train_batch_size=4,
                 disable_tqdm=True, seed=0)
    learn_task(model, args.name, args.data, tokenizer,
               expert_args=dict(stage, max_steps=args.steps, learning_rate=2e-2),
               router_args=dict(stage, max_steps=max(1, args.steps // 4)))
    state = PartialState()
    print(f"rank {state.process_index}/{state.num_processes}: expert {args.name!r} fingerprint "
          f"{fingerprint(model, args.name)}", flush=True)
    if state.is_main_process:
        model.base_model.save_expert(args.name, args.out)
        print(f"saved {args.out}")
    state.wait_for_everyone()


if __name__ == "__main__":
    main()
