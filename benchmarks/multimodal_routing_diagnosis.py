"""Why token routing loses the image tasks of the multimodal half: which positions go wrong, and which fixes help.

Uses the multimodal half's cached experts (run ``benchmarks/continual.py --multimodal`` first). A prompt holds
three kinds of positions: the image's tokens (projected vision features), the question's text, and the positions
that predict the answer. For each kind this measures how often top-1 routing picks the task's own expert, then
scores the image tasks with the choice *forced* for one kind at a time (own expert, or no expert at all), which
says where the loss comes from. Finally it scores the routing rules and router budgets the literature offers,
and one calibration of ours (tokens centred on the tasks' mean input, ``CenteredScores``).

    python benchmarks/multimodal_routing_diagnosis.py     # ~15 min, writes results/multimodal_routing_diagnosis.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

import torch

# The diagnostic patches below act on the PyTorch path; the compiled CPU kernel picks its own top-k and would
# silently ignore the forced choices.
os.environ.setdefault("PEFT_ROUTING_CPU_KERNEL", "0")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from continual import CACHE, RESULTS, Bench, Store, half_settings  # noqa: E402

import peft_routing.ops.strategies as strategies  # noqa: E402
from peft_routing import RoutingLinear  # noqa: E402
from peft_routing.ops import Routes, standardize  # noqa: E402
from peft_routing.workflow import (  # noqa: E402
    IGNORE_INDEX,
    ChatCollator,
    answer_accuracy,  # noqa: E402
    train_router,  # noqa: E402
)
from peft_routing.workflow.evaluation import chunks  # noqa: E402

KINDS = ("image", "question", "answer")
OFF = -1  # a forced choice of "no expert": the base layer alone at these positions


@contextlib.contextmanager
def patched(name: str, replacement):
    """Replace ``peft_routing.ops.strategies.<name>`` while active: how the diagnostic switches below reach the
    route phase."""
    original = getattr(strategies, name)
    setattr(strategies, name, replacement)
    try:
        yield
    finally:
        setattr(strategies, name, original)


class PositionForcing:
    """Overrides the top-1 choice at chosen kinds of positions of the current batch (a diagnostic patch).

    ``kinds`` [B*T] labels every flattened position 0/1/2 (KINDS) or -2 for padding; ``forced`` maps a kind to
    an expert index or OFF. Layers flatten [B, T, d] to [B*T, d], so the labels line up with their rows.
    """

    def __init__(self) -> None:
        self.kinds: torch.Tensor | None = None
        self.forced: dict[int, int] = {}
        self.original = strategies.select_experts

    def select(self, scores: torch.Tensor, settings) -> Routes:
        routes = self.original(scores, settings)
        if self.kinds is None or not self.forced or self.kinds.numel() != scores.shape[0]:
            return routes  # a decode step or an unlabelled batch: routed as usual
        ids, weights = routes.expert_ids.clone(), routes.weights.clone()
        for kind, expert in self.forced.items():
            rows = self.kinds == kind
            ids[rows, 0] = max(expert, 0)
            weights[rows] = 0.0
            weights[rows, 0] = 0.0 if expert == OFF else 1.0
        return Routes(ids, weights)

    def active(self):
        return patched("select_experts", self.select)


class ScorePatch:
    """A scoring rule patched in where the standardised scores are computed (run with score_norm='standardize')."""

    def scores(self, tokens: torch.Tensor, stack) -> torch.Tensor:
        raise NotImplementedError

    def active(self):
        return patched("stack_scores", lambda tokens, stack, score_norm: self.scores(tokens, stack))


class ArrowScores(ScorePatch):
    """Arrow's training-free scores (Ostapenko et al., 2024): |p_j . u| with p_j the top right singular vector of
    expert j's B A in this layer."""

    def __init__(self) -> None:
        self.prototypes: dict[int, torch.Tensor] = {}

    def scores(self, tokens: torch.Tensor, stack) -> torch.Tensor:
        if id(stack) not in self.prototypes:
            rows = []
            for j in range(stack.num_experts):
                q, r = torch.linalg.qr(stack.b_t[j].t().float())  # B = Q R, so B A = Q (R A): same right vectors
                rows.append(torch.linalg.svd(r @ stack.a[j].float(), full_matrices=False).Vh[0])
            self.prototypes[id(stack)] = torch.stack(rows).to(tokens.dtype)
        return (tokens @ self.prototypes[id(stack)].t()).abs()


class CenteredScores(ScorePatch):
    """Scores of tokens centred on the library's mean input, per layer: (u - m) . v, or standardised after centring.

    m is the average over tasks of each task's mean input to the layer, measured on 32 of its own training
    examples with its own expert (a statistic each task can store with its expert, like REPRO's prototypes).
    Since (u - m) . v_j = u . v_j - m . v_j, the raw variant is a per-expert bias that takes away what a routing
    vector scores on an average input: the calibration that vectors trained on positives only lack.
    """

    def __init__(self, means: dict[int, torch.Tensor], standardized: bool) -> None:
        self.means, self.standardized = means, standardized

    def scores(self, tokens: torch.Tensor, stack) -> torch.Tensor:
        centred = tokens - self.means[id(stack)].to(tokens.dtype)
        if self.standardized:
            return standardize(centred) @ stack.standardized_vectors().t() / centred.shape[-1] ** 0.5
        return centred @ stack.vectors.t()


@torch.no_grad()
def library_means(library, tokenizer, tasks: dict, names: list[str], examples: int = 32) -> dict[int, torch.Tensor]:
    """id(layer's stack) -> the average over ``names`` of each task's mean input to that layer (own expert on)."""
    collator = ChatCollator(tokenizer)
    layers = [m for m in library.modules() if isinstance(m, RoutingLinear)]
    per_task = []
    for name in names:
        library.set_phase("expert", name)
        sums = {layer: 0.0 for layer in layers}
        count = 0
        hooks = [layer.register_forward_pre_hook(
            lambda layer, args: sums.__setitem__(layer, sums[layer] + args[0].reshape(-1, args[0].shape[-1]).sum(0)))
            for layer in layers]
        try:
            for example in tasks[name].train[:examples]:
                batch = collator([example])
                batch.pop("labels")
                library(**batch)
                count += batch["input_ids"].shape[1]
        finally:
            for hook in hooks:
                hook.remove()
        per_task.append({layer: total / count for layer, total in sums.items()})
    library.set_phase("route")
    return {id(layer.expert_stack()): sum(t[layer] for t in per_task) / len(per_task) for layer in layers}


def position_kinds(batch: dict[str, torch.Tensor], labels: torch.Tensor, image_token: int) -> torch.Tensor:
    """0 image, 1 question text, 2 predicts an answer token, -2 padding; flattened [B*T]."""
    ids = batch["input_ids"]
    kinds = torch.full_like(ids, 1)
    kinds[ids == image_token] = 0
    width = ids.shape[1]
    answer = labels[:, 1:] if labels.shape[1] == width else labels  # labels may keep only the last columns
    predicts = torch.zeros_like(ids, dtype=torch.bool)
    predicts[:, width - 1 - answer.shape[1]:width - 1] = answer != IGNORE_INDEX  # position p predicts p + 1
    kinds[predicts] = 2
    kinds[batch["attention_mask"] == 0] = -2
    return kinds.reshape(-1)


@torch.no_grad()
def forced_accuracy(model, tokenizer, examples, forcing: PositionForcing, image_token: int,
                    forced: dict[int, int]) -> float:
    """Teacher-forced exact match (as evaluation.answer_accuracy) with ``forced`` choices at some position kinds."""
    collator = ChatCollator(tokenizer)
    correct = 0
    forcing.forced = forced
    for chunk in chunks(examples, 16, None):
        batch = collator(list(chunk))
        labels = batch.pop("labels")
        forcing.kinds = position_kinds(batch, labels, image_token)
        logits = model(**batch).logits
        hits = (logits[:, :-1].argmax(-1) == labels[:, 1:]) | (labels[:, 1:] == IGNORE_INDEX)
        correct += int(hits.all(dim=1).sum())
    forcing.kinds, forcing.forced = None, {}
    return 100.0 * correct / len(examples)


@torch.no_grad()
def shares_by_kind(model, tokenizer, examples, image_token: int) -> dict[str, dict[str, float]]:
    """Per kind of position: the share (%) of top-1 choices, over all routed modules, that went to each expert."""
    collator = ChatCollator(tokenizer)
    layers = [m for m in model.modules() if isinstance(m, RoutingLinear)]
    experts = layers[0].expert_names
    counts = torch.zeros(3, len(experts))
    for example in examples:
        batch = collator([example])
        kinds = position_kinds(batch, batch.pop("labels"), image_token)
        choices = []
        for layer in layers:
            layer.routing_observer = lambda layer, routes: choices.append(routes.expert_ids[:, 0])
        try:
            model(**batch)
        finally:
            for layer in layers:
                layer.routing_observer = None
        chosen = torch.stack(choices)  # [modules, T], every layer holds the experts in library order
        for kind in range(3):
            counts[kind] += torch.bincount(chosen[:, kinds == kind].reshape(-1), minlength=len(experts))
    shares = 100.0 * counts / counts.sum(dim=1, keepdim=True).clamp(min=1)
    return {name: {e: round(float(shares[i, j]), 1) for j, e in enumerate(experts)}
            for i, name in enumerate(KINDS) if counts[i].sum() > 0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--router-steps", type=int, default=100, help="total router steps of the 'longer' variant")
    parser.add_argument("--rules-only", action="store_true", help="skip the routing shares and forced choices")
    parser.add_argument("--tasks", nargs="+", default=["color", "count"], help="image tasks to diagnose")
    args = parser.parse_args()
    settings = half_settings(True, args.quick)
    bench = Bench(settings, Store(CACHE))
    library_tasks = list(settings.tasks)
    library = bench.library(library_tasks)
    image_token = bench.base.config.image_token_index
    forcing = PositionForcing()
    result: dict = {"library": library_tasks, "shares": {}, "forced": {}}
    for rule_name, rule in {} if args.rules_only else {"raw": dict(top_k=1, score_norm="none"),
                                                      "standardize": dict(top_k=1, score_norm="standardize")}.items():
        library.set_phase("route", **rule)
        for t in library_tasks:
            shares = shares_by_kind(library, bench.tokenizer, bench.tasks[t].test[:10], image_token)
            result["shares"][f"{rule_name}/{t}"] = shares
            for kind, by_expert in shares.items():
                print(f"top-1 shares, {rule_name:<11} data {t:<10} {kind:<8} "
                      + " ".join(f"{e} {v:5.1f}" for e, v in by_expert.items()), flush=True)
    library.set_phase("route", top_k=1, score_norm="none")
    variants = {"routed": {}, "own expert everywhere": {0: "own", 1: "own", 2: "own"},
                "own expert on image tokens": {0: "own"}, "own expert on question text": {1: "own"},
                "own expert at answer positions": {2: "own"}, "own on text (question + answer)": {1: "own", 2: "own"},
                "no expert on image tokens": {0: OFF}, "no expert on image tokens, own on text": {0: OFF, 1: "own",
                                                                                                 2: "own"}}
    with forcing.active():
        for t in [] if args.rules_only else args.tasks:
            own = library_tasks.index(t)
            for label, spec in variants.items():
                forced = {kind: own if choice == "own" else choice for kind, choice in spec.items()}
                score = forced_accuracy(library, bench.tokenizer, bench.tasks[t].test, forcing, image_token, forced)
                result["forced"].setdefault(label, {})[t] = score
                print(f"{t:<8} {label:<42} {score:5.1f}", flush=True)
    result["rules"] = {}

    def score_rules(suffix: str, rules: dict) -> None:
        for label, rule in rules.items():
            patch = rule.get("patch")  # a ScorePatch replaces the standardised scores while active
            library.set_phase("route", top_k=rule["top_k"], mixing=rule.get("mixing", "softmax"),
                              score_norm="standardize" if patch else rule.get("score_norm", "none"))
            with patch.active() if patch else contextlib.nullcontext():
                scores = {t: answer_accuracy(library, bench.tokenizer, bench.tasks[t].test) for t in library_tasks}
            result["rules"][label + suffix] = scores
            print(f"{label + suffix:<52} " + " ".join(f"{t} {v:5.1f}" for t, v in scores.items()), flush=True)

    arrow = ArrowScores()  # its prototypes are computed once, for both rules
    rules = {"top-1 raw": dict(top_k=1), "top-1 standardize": dict(top_k=1, score_norm="standardize"),
             "top-2 standardize": dict(top_k=2, score_norm="standardize"),
             # every expert weighted by its own gate sigmoid(v . u), exactly as each was trained in stage 2
             "all experts, sigmoid gates": dict(top_k=len(library_tasks), mixing="sigmoid"),
             "top-1 Arrow (training-free)": dict(top_k=1, patch=arrow),
             "top-2 Arrow (training-free)": dict(top_k=2, patch=arrow)}
    score_rules("", rules)
    means = library_means(library, bench.tokenizer, bench.tasks, library_tasks)
    score_rules("", {f"top-{k} {'standardize' if standardized else 'raw'}, centred on the tasks' mean input":
                     dict(top_k=k, patch=CenteredScores(means, standardized))
                     for standardized, k in ((False, 1), (False, 2), (True, 1), (True, 2))})
    # longer router training: every expert's routing vectors continued to --router-steps in total (stage 2 only)
    for t in library_tasks:
        train_router(library, t, bench.tasks[t].train, bench.tokenizer,
                     max_steps=args.router_steps - settings.router_steps, learning_rate=settings.router_lr,
                     per_device_train_batch_size=settings.batch_size, seed=settings.seed, disable_tqdm=True)
    score_rules(f", {args.router_steps} router steps", dict(list(rules.items())[:4]))
    out = RESULTS / ("multimodal_routing_diagnosis_quick.json" if args.quick else "multimodal_routing_diagnosis.json")
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
