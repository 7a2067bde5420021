"""Why a routed task falls below its own expert: per-block routing accuracy and the literature's fixes, side by side.

Uses the continual benchmark's cached experts (run ``benchmarks/continual.py`` first; nothing is retrained except
where a variant says so). For every task, the positions whose next token is part of the answer are the ones that
decide the score; this counts, per transformer block, how often their top-1 choice is the task's own expert. Then it
scores the tasks under the variants the literature offers for miscalibrated independent routers: PHATGOOSE's
standardisation, top-2 with softmax temperatures, and longer router training (stage 2 only, the experts' LoRA kept).

    python benchmarks/routing_diagnosis.py            # ~10 min on 2 cores, writes results/routing_diagnosis.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from continual import CACHE, KEYLESS_TRAINING, QUICK, RESULTS, Bench, Settings, Store  # noqa: E402

from peft_routing import RoutingLinear  # noqa: E402
from peft_routing.workflow import (
    ChatCollator,  # noqa: E402
    answer_accuracy,  # noqa: E402
    train_router,  # noqa: E402
)
from peft_routing.workflow.diagnostics import block_of  # noqa: E402

RULES = {
    "top-1, raw score (benchmark default)": dict(top_k=1, score_norm="none"),
    "top-1, standardized (PHATGOOSE)": dict(top_k=1, score_norm="standardize"),
    "top-2, T=1": dict(top_k=2, score_norm="none", temperature=1.0),
    "top-2, T=0.1": dict(top_k=2, score_norm="none", temperature=0.1),
    "top-2, T=5": dict(top_k=2, score_norm="none", temperature=5.0),
}


@torch.no_grad()
def answer_routing_accuracy(model, tokenizer, examples, expert: str) -> dict[int, float]:
    """Per block: the share of (answer-deciding position, module) top-1 choices that went to ``expert``."""
    collator = ChatCollator(tokenizer)
    hits: dict[int, list[float]] = {}
    layers = {path: m for path, m in model.named_modules() if isinstance(m, RoutingLinear)}
    for example in examples:
        batch = collator([example])
        labels = batch.pop("labels")[0]
        deciding = torch.nonzero(labels[1:] != -100).flatten()  # position p predicts token p + 1
        records = []
        for path, layer in layers.items():
            layer.routing_observer = lambda layer, routes, path=path: records.append((path, layer, routes))
        try:
            model(**batch)
        finally:
            for layer in layers.values():
                layer.routing_observer = None
        for path, layer, routes in records:
            chosen = routes.expert_ids.reshape(batch["input_ids"].shape[1], -1)[deciding, 0]
            own = layer.expert_names.index(expert)
            hits.setdefault(block_of(path), []).append((chosen == own).double().mean().item())
    return {block: sum(v) / len(v) for block, v in sorted(hits.items())}


def _percentages(per_block: dict[int, float]) -> str:
    return " ".join(f"{100 * share:4.0f}" for share in per_block.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--router-steps", type=int, default=30, help="total router steps of the 'longer' variant")
    args = parser.parse_args()
    settings = QUICK if args.quick else Settings(router_steps=3, **KEYLESS_TRAINING)  # the first full run's experts
    bench = Bench(settings, Store(CACHE))
    tasks = list(settings.tasks)
    library = bench.library(tasks)
    result = {"settings": {"tasks": tasks, "router_steps": settings.router_steps,
                           "longer_router_steps": args.router_steps}}

    def score_all(label: str) -> dict[str, float]:
        scores = {t: answer_accuracy(library, bench.tokenizer, bench.tasks[t].test) for t in tasks}
        print(f"{label:<44} " + " ".join(f"{t} {s:5.1f}" for t, s in scores.items()), flush=True)
        return scores

    library.set_phase("route", top_k=1, score_norm="none")
    result["routing_accuracy"] = {t: answer_routing_accuracy(library, bench.tokenizer, bench.tasks[t].test, t)
                                  for t in tasks}
    for t, per_block in result["routing_accuracy"].items():
        print(f"routing accuracy at answer positions, {t:<10} " + _percentages(per_block))
    result["experts"] = {t: answer_accuracy(bench.single(bench.expert(t)[0], t), bench.tokenizer,
                                            bench.tasks[t].test) for t in tasks}
    print(f"{'own expert (oracle)':<44} " + " ".join(f"{t} {s:5.1f}" for t, s in result["experts"].items()))
    result["rules"] = {}
    for label, rule in RULES.items():
        library.set_phase("route", **rule)
        result["rules"][label] = score_all(label)

    # longer router training: continue every expert's routing vectors to --router-steps in total (stage 2 only)
    for t in tasks:
        train_router(library, t, bench.tasks[t].train, bench.tokenizer,
                     max_steps=args.router_steps - settings.router_steps, learning_rate=settings.router_lr,
                     per_device_train_batch_size=settings.batch_size, seed=settings.seed, disable_tqdm=True,
                     logging_steps=10)
    for label, rule in list(RULES.items())[:2]:
        library.set_phase("route", **rule)
        longer = f"{label}, {args.router_steps} router steps"
        result["rules"][longer] = score_all(longer)
    library.set_phase("route", top_k=1, score_norm="none")
    result["routing_accuracy_longer_router"] = {
        t: answer_routing_accuracy(library, bench.tokenizer, bench.tasks[t].test, t) for t in tasks}
    for t, per_block in result["routing_accuracy_longer_router"].items():
        print(f"after longer router training, {t:<10} " + _percentages(per_block))
    out = RESULTS / ("routing_diagnosis_quick.json" if args.quick else "routing_diagnosis.json")
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
