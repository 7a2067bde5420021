"""Experts to and from the Hugging Face Hub: push one, then grow another model's library from the repo id.

By default this runs offline: huggingface_hub's upload call is replaced by one that writes the commit into a
temporary HF cache, exactly where a download would put it, and the download side is huggingface_hub's real code
(in offline mode). With `--repo you/name` and a login (HF_TOKEN), it pushes to and pulls from the real Hub.
Run: python examples/hub_round_trip.py [--repo you/name]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

import torch
from peft import get_peft_model

from peft_routing import LLAMA_PROJECTIONS, RoutingLoraConfig
from peft_routing.demo.tiny_models import tiny_chat_llama

TARGETS = LLAMA_PROJECTIONS


def make_library(seed: int):
    """A model with two (random) experts standing in for trained ones."""
    torch.manual_seed(seed)
    config = RoutingLoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False, top_k=1)
    model = get_peft_model(tiny_chat_llama(), config, adapter_name="coco")
    model.add_adapter("snli", RoutingLoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".lora_route." in name:
                parameter.normal_()
    return model.eval()


def offline_hub() -> None:
    """Point huggingface_hub at an empty temporary cache, offline, and make uploads land in that cache."""
    from huggingface_hub import HfApi, constants

    cache = Path(tempfile.mkdtemp(prefix="hf-cache-"))
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE, constants.HF_HUB_CACHE = True, str(cache)
    revision = "0" * 40

    def upload_folder(self, *, repo_id, folder_path, path_in_repo=None, revision_=None, **kwargs):
        repo = cache / f"models--{repo_id.replace('/', '--')}"
        shutil.copytree(folder_path, repo / "snapshots" / revision / (path_in_repo or ""), dirs_exist_ok=True)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(revision)

    HfApi.create_repo = lambda self, repo_id, **kwargs: None
    HfApi.upload_folder = upload_folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repo", help="a real Hub repo to push to (needs a login); default: offline")
    args = parser.parse_args()
    repo = args.repo or "your-org/snli-expert"
    if args.repo is None:
        offline_hub()

    team_a = make_library(seed=0)
    team_a.push_expert_to_hub("snli", repo)  # adapter_config.json + adapter_model.safetensors, one commit
    print(f"pushed expert 'snli' to {repo}")

    team_b = get_peft_model(tiny_chat_llama(), RoutingLoraConfig(r=4, lora_alpha=8, target_modules=TARGETS),
                            adapter_name="local_task")
    name = team_b.add_expert(repo)  # downloads (or finds in the cache), checks every shape, then adds
    print(f"team B's library: {team_b.experts} (added {name!r} from {repo})")

    ids = torch.tensor([[5, 6, 7, 8, 9]])
    team_a.set_phase("expert", "snli")
    team_b.set_phase("expert", name)
    with torch.no_grad():
        same = torch.equal(team_a(input_ids=ids).logits, team_b(input_ids=ids).logits)
    print(f"the pulled expert gives bit-identical outputs: {same}")
    assert same


if __name__ == "__main__":
    main()
