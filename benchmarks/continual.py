"""Continual-learning benchmark: every method of the benchmark protocol side by side on SmolLM2-135M.

Text half (default): tasks sentiment, dates, reverse, units in sequence (peft_routing.demo.tasks, seeded), plus
"shout" as the distractor expert; the general probe is 40 multiple-choice capitals no method trains on.
Multimodal half (``--multimodal``): SmolLM2 inside a LLaVA whose vision side was aligned once and frozen
(peft_routing.smollm2_llava); tasks color and count (images), count_text (text, related to count) and dates; probes:
the capitals and the alignment stage's own skill (pick a scene's caption). Methods: zero_shot,
experts (oracle task id), seq_ft, mtl, merge_linear, merge_ties, mr_lora, repro, routing (top-1 raw score, the
paper's rule) and its variants (top-2, standardised score). Every trained adapter and every score is cached under
``~/.cache/peft-routing/continual`` by a key of its settings, so an interrupted run resumes where it stopped.

    python benchmarks/continual.py --quick        # smoke run (minutes), writes benchmarks/results/continual_quick.json
    python benchmarks/continual.py                # full run, writes benchmarks/results/continual.json and PNGs
    python benchmarks/continual.py --multimodal   # the multimodal half -> results/continual_multimodal.json
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import random
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from continual_baselines import (  # noqa: E402
    MERGES,
    accuracy_with_choices,
    add_merged_expert,
    general_texts,
    general_with_choices,
    mr_lora_choices,
    nll_with_choices,
    repro_choices,
    repro_prototypes,
    router_examples,
)
from continual_report import cost_table, growth_table, method_table, order_table, transfer  # noqa: E402
from peft import PeftModel, get_peft_model  # noqa: E402

import peft_routing  # noqa: E402,F401
from peft_routing import LLAMA_PROJECTIONS, RoutingLoraConfig, RoutingSettings  # noqa: E402
from peft_routing.demo.base_models import load_base_model  # noqa: E402
from peft_routing.demo.image_tasks import caption_questions  # noqa: E402
from peft_routing.demo.tasks import capital_questions, make_task  # noqa: E402
from peft_routing.io import cache_root, write_json_atomic  # noqa: E402
from peft_routing.ops.prototypes import PROMPT_FLOOR_SLACK  # noqa: E402
from peft_routing.tuner.expert_folder import read_expert_folder  # noqa: E402
from peft_routing.tuner.prototype import Prototype, prototype_from  # noqa: E402
from peft_routing.workflow import (  # noqa: E402
    answer_accuracy,
    answer_nll,
    choice_accuracy,
    compute_prototype,
    learn_task,
    own_expert_share,
    plot_routing,
    routing_shares,
    train_expert,
)
from peft_routing.workflow.prototypes import DEFAULT_FEATURE  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
CACHE = cache_root() / "continual"
VERSION = 1  # bump when a change invalidates cached adapters or scores


@dataclass(frozen=True)
class Settings:
    tasks: tuple[str, ...] = ("sentiment", "dates", "reverse", "units", "units_cm")  # units/units_cm: related
    distractors: tuple[str, ...] = ("shout",)
    train_examples: int = 256
    test_examples: int = 200  # one question is 0.5 point
    probe_questions: int = 40
    top_layers: int = 10
    rank: int = 16
    batch_size: int = 8
    expert_steps: int = 80  # at 40 the experts fall short of MTL on both halves (RESULTS.md, "A larger step budget")
    expert_lr: float = 1e-3
    router_steps: int = 30  # 3 in the first full run; 30 recovered dates (RESULTS.md, routing_diagnosis.py)
    router_lr: float = 1e-2
    replay_per_task: int = 20  # MR-LoRA's replay buffer
    router_lora_steps: int = 30
    prototype_examples: int = 128  # REPRO
    orders: int = 4
    seed: int = 0
    base: str = "smollm2"  # or "smollm2-llava" (base_models.load_base_model)
    probes: tuple[str, ...] = ("general",)  # "general": capitals; "captions": the alignment stage's skill
    nll_texts: int = 120  # the continuous general probe: MMLU questions with worked explanations (lm-eval)
    related: tuple[tuple[str, str], ...] = (("units_cm", "units"),)  # (task, its related task) for transfer


QUICK = Settings(train_examples=24, test_examples=6, probe_questions=8, expert_steps=3, router_steps=1,
                 batch_size=4, router_lora_steps=3, replay_per_task=4, prototype_examples=8, orders=2, nll_texts=8)
MULTIMODAL_CHANGES = dict(tasks=("color", "count", "count_text", "dates"), base="smollm2-llava",
                          probes=("general", "captions"), related=(("count", "count_text"),))
NLL = "general_nll"


def half_settings(multimodal: bool, quick: bool = False) -> Settings:
    """The settings of one half of the benchmark (the smoke run keeps its tiny budget)."""
    settings = QUICK if quick else Settings()
    return replace(settings, **MULTIMODAL_CHANGES) if multimodal else settings


# Every rule of the route phase compared, as complete set_phase("route", ...) keyword sets: each rule's changes to
# the default rule (the paper's token top-1).
TOKEN_RULE = asdict(RoutingSettings())
TOKEN_ROUTERS = {"routing": dict(top_k=1, score_norm="none"), "routing_top2": dict(top_k=2, score_norm="none"),
                 "routing_standardize": dict(top_k=1, score_norm="standardize"),
                 "routing_top2_standardize": dict(top_k=2, score_norm="standardize")}
PROTOTYPE_ROUTERS = {
    "routing_prototype": dict(router="prototype"),
    "routing_prototype_base": dict(router="prototype", fallback="base"),
    "routing_tp_restrict2": dict(router="token+prototype", prototype_candidates=2, top_k=1,
                                 score_norm="standardize"),
    "routing_tp_prior": dict(router="token+prototype", prototype_prior=1.0, top_k=2, score_norm="standardize"),
    "routing_tp_gate": dict(router="token+prototype", prototype_margin=0.02, top_k=2, score_norm="standardize"),
    "routing_tp_restrict2_base": dict(router="token+prototype", prototype_candidates=2, top_k=2,
                                      score_norm="standardize", fallback="base"),
    # the same, the whole prompt deciding (REPRO's choice, taken inside the one pass)
    "routing_prompt": dict(router="prototype", prototype_pooling="prompt"),
    "routing_prompt_base": dict(router="prototype", prototype_pooling="prompt", fallback="base"),
    "routing_tp_prompt_restrict2_base": dict(router="token+prototype", prototype_candidates=2, top_k=2,
                                             score_norm="standardize", fallback="base", prototype_pooling="prompt"),
    # prototypes of the prompt's last position (compute_prototype(pooling="last")): weighted towards the question
    "routing_last_prompt_base": dict(router="prototype", prototype_pooling="prompt", fallback="base",
                                     prototype_feature="last"),
    "routing_tp_last_prompt_restrict2_base": dict(router="token+prototype", prototype_candidates=2, top_k=2,
                                                  score_norm="standardize", fallback="base",
                                                  prototype_pooling="prompt", prototype_feature="last"),
}
# A rule's one key that is not a set_phase field: the experts' prototype feature (compute_prototype's pooling).
FEATURE_KEY = "prototype_feature"
RULES = {**TOKEN_ROUTERS, **PROTOTYPE_ROUTERS}
RECOMMENDED = "routing_last_prompt_base"


def without_feature(rule: dict[str, Any]) -> dict[str, Any]:
    """A rule's set_phase("route", ...) changes alone (the prototype feature left out)."""
    return {k: v for k, v in rule.items() if k != FEATURE_KEY}


def phase_rule(rule: dict[str, Any]) -> dict[str, Any]:
    """The complete set_phase("route", ...) keywords of a rule."""
    return {**TOKEN_RULE, **without_feature(rule)}


def feature_of(rule: dict[str, Any]) -> str:
    """The prototype feature a rule's library carries."""
    return rule.get(FEATURE_KEY, "causal_mean")


if without_feature(RULES[RECOMMENDED]) != peft_routing.RECOMMENDED_ROUTER or \
        feature_of(RULES[RECOMMENDED]) != DEFAULT_FEATURE:
    raise RuntimeError(f"RULES[{RECOMMENDED!r}] must be peft_routing.RECOMMENDED_ROUTER over prototypes of "
                       "compute_prototype's default feature, which the README recommends.")
POSITION_EXAMPLES = 16  # test examples per task for the routing accuracy by kind of position


# --------------------------------------------------------------------------------------------------- the cache
# The training budget of the first runs, whose score keys carry no training field (so their cache stays valid
# whatever the defaults become); any other budget adds the fields that differ.
KEYLESS_TRAINING = dict(expert_steps=40, expert_lr=1e-3, rank=16, top_layers=10, batch_size=8)


def changed_training(settings: Settings) -> dict[str, Any]:
    """The fields that shape every adapter and differ from the first runs' budget."""
    return {f: getattr(settings, f) for f, v in KEYLESS_TRAINING.items() if getattr(settings, f) != v}


def cache_key(description: dict[str, Any]) -> str:
    text = json.dumps({"version": VERSION, **description}, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


@dataclass
class Store:
    """Trained adapters (folders + a meta file written last) and scores, by key; writes are atomic."""

    root: Path
    scores: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if self.scores_file.is_file():
            self.scores = json.loads(self.scores_file.read_text())

    @property
    def scores_file(self) -> Path:
        return self.root / "scores.json"

    def adapter(self, key: str) -> tuple[Path, dict[str, Any]] | None:
        meta = self.root / "meta" / f"{key}.json"
        if not meta.is_file():  # the meta file is written after the folder: no meta, no (complete) adapter
            return None
        return self.root / "adapters" / key, json.loads(meta.read_text())

    def put_adapter(self, key: str, model, name: str, meta: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
        folder = self.root / "adapters" / key
        model.save_expert(name, folder, overwrite=True)
        write_json_atomic(self.root / "meta" / f"{key}.json", meta)
        return folder, meta

    def score(self, key: str, compute: Callable[[], float]) -> float:
        return self.record(key, lambda: round(float(compute()), 3))

    def record(self, key: str, compute: Callable[[], Any]) -> Any:
        """Any JSON value by key (a score, or a dict of them), computed once."""
        if key not in self.scores:
            self.scores[key] = compute()
            write_json_atomic(self.scores_file, self.scores)
        return self.scores[key]


# ------------------------------------------------------------------------------------------------ the harness
class Bench:
    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings, self.store = settings, store
        self.base, self.tokenizer = load_base_model(settings.base)
        names = settings.tasks + settings.distractors
        self.tasks = {n: make_task(n, settings.train_examples, settings.test_examples, settings.seed) for n in names}
        probes = {"general": lambda: capital_questions(settings.seed)[: settings.probe_questions],
                  "captions": lambda: caption_questions(settings.seed, settings.probe_questions)}
        self.probes = {name: probes[name]() for name in settings.probes}  # captions draw images: only if asked
        self.nll_examples = general_texts(settings.nll_texts)
        self.data_id = dict(train=settings.train_examples, test=settings.test_examples, seed=settings.seed)
        if settings.base != "smollm2":  # the text half's cache keys stay as they were
            self.data_id["base"] = settings.base
        # the training split is drawn before the test split, so adapters do not depend on the test size
        self.train_id = {k: v for k, v in self.data_id.items() if k != "test"}
        # Scores of routed libraries, Seq-FT and merges are keyed by task names, not adapter folders: a run with
        # another training budget must not read them. The first runs' budget keeps its keys.
        if budget := changed_training(settings):
            self.data_id["training"] = budget

    # ------------------------------------------------------------------------------------------- training
    def config(self) -> RoutingLoraConfig:
        layers = getattr(self.base.config, "text_config", self.base.config).num_hidden_layers
        return RoutingLoraConfig(r=self.settings.rank, lora_alpha=2 * self.settings.rank,
                                 target_modules=LLAMA_PROJECTIONS,
                                 layers_to_transform=list(range(layers - self.settings.top_layers, layers)), top_k=1,
                                 language_model_only=self.settings.base != "smollm2")

    def _expert_args(self, steps: int | None = None) -> dict[str, Any]:
        s = self.settings
        return dict(max_steps=steps or s.expert_steps, learning_rate=s.expert_lr, lr_scheduler_type="constant",
                    per_device_train_batch_size=s.batch_size, seed=s.seed, disable_tqdm=True, logging_steps=10)

    def _router_args(self) -> dict[str, Any]:
        s = self.settings
        return dict(max_steps=s.router_steps, learning_rate=s.router_lr, per_device_train_batch_size=s.batch_size,
                    seed=s.seed, disable_tqdm=True, logging_steps=1)

    def _training_id(self) -> dict[str, Any]:
        s = self.settings
        return dict(data=self.train_id, rank=s.rank, layers=s.top_layers, bs=s.batch_size, lr=s.expert_lr,
                    steps=s.expert_steps)

    def expert(self, task: str) -> tuple[Path, dict[str, Any]]:
        """Task expert + its routing vectors (stage 1 + stage 2) + its prototype, from that task's data alone."""
        folder, meta = self._trained_expert(task)
        if "prompt_floor" not in (read_expert_folder(folder).config.prototype or {}):  # cached before prompt floors
            model = self.single(folder, task)
            compute_prototype(model, task, self.tasks[task].train, self.tokenizer,
                              max_examples=self.settings.prototype_examples)
            model.save_expert(task, folder, overwrite=True)
        return folder, meta

    def _trained_expert(self, task: str) -> tuple[Path, dict[str, Any]]:
        key = cache_key(dict(kind="expert", task=task, **self._training_id(), router=(self.settings.router_steps,
                                                                                        self.settings.router_lr)))
        if (cached := self.store.adapter(key)) is not None:
            return cached
        _say(f"training expert {task!r}")
        model = get_peft_model(copy.deepcopy(self.base), self.config(), adapter_name=task)
        report = learn_task(model, task, self.tasks[task].train, self.tokenizer, expert_args=self._expert_args(),
                            router_args=dict(self._router_args(),
                                                prototype_examples=self.settings.prototype_examples))
        meta = dict(seconds=report.expert.seconds + report.router.seconds, expert_seconds=report.expert.seconds,
                    router_seconds=report.router.seconds,
                    examples=(report.expert.steps + report.router.steps) * self.settings.batch_size)
        return self.store.put_adapter(key, model, task, meta)

    def lora(self, kind: str, name: str, examples, steps: int, start: Path | None = None,
             extra: dict[str, Any] | None = None) -> tuple[Path, dict[str, Any]]:
        """A plain LoRA (stage 1 only): Seq-FT stages, MTL, MR-LoRA's router. ``start`` continues a saved one."""
        key = cache_key(dict(kind=kind, **self._training_id(), lora_steps=steps, start=start.name if start else None,
                             **(extra or {})))
        if (cached := self.store.adapter(key)) is not None:
            return cached
        _say(f"training {kind} {extra or ''}")
        if start is None:
            model = get_peft_model(copy.deepcopy(self.base), self.config(), adapter_name=name)
        else:
            model = PeftModel.from_pretrained(copy.deepcopy(self.base), start, adapter_name=name)
        report = train_expert(model, name, examples, self.tokenizer, **self._expert_args(steps))
        return self.store.put_adapter(key, model, name, dict(seconds=report.seconds,
                                                             examples=report.steps * self.settings.batch_size))

    # ------------------------------------------------------------------------------------------- models
    def library(self, names, feature: str = "causal_mean") -> Any:
        """The base model with these experts (cached folders), in the route phase, their prototypes pooling
        ``feature`` (an expert carrying another is given one, computed once and cached)."""
        names = list(names)
        model = PeftModel.from_pretrained(copy.deepcopy(self.base), self.expert(names[0])[0], adapter_name=names[0])
        for name in names[1:]:
            model.add_expert(self.expert(name)[0], adapter_name=name)
        for name in names:
            if getattr(model.base_model.expert_prototype(name), "pooling", None) != feature:
                model.base_model.set_prototype(name, self.prototype(name, feature))
        model.set_phase("route")
        return model.eval()

    def prototype(self, task: str, feature: str) -> Prototype:
        """``task``'s expert's prototype pooling ``feature``, computed from the same training examples."""
        folder = self.expert(task)[0]

        def compute() -> dict[str, Any]:
            found = compute_prototype(self.single(folder, task), task, self.tasks[task].train, self.tokenizer,
                                      max_examples=self.settings.prototype_examples, pooling=feature)
            return dict(fields=found.fields(), vector=found.vector.tolist())

        record = self.store.record(cache_key(dict(kind="prototype", expert=folder.name, feature=feature,
                                                  n=self.settings.prototype_examples)), compute)
        return prototype_from(record["fields"], torch.tensor(record["vector"]), f"{task} ({feature})")

    def single(self, folder: Path, name: str) -> Any:
        model = PeftModel.from_pretrained(copy.deepcopy(self.base), folder, adapter_name=name)
        model.set_phase("expert", name)
        return model.eval()

    # ------------------------------------------------------------------------------------------- scoring
    def routing_id(self, experts, rule: dict[str, Any] | None = None) -> dict[str, Any]:
        """The score-cache identity of a routed library: its experts, the rule and how the routers were trained
        (without the router settings a re-run with longer router training would read the old scores)."""
        s, rule = self.settings, {**TOKEN_RULE, **(rule or {})}
        found = {"m": "routing", "experts": list(experts), "top_k": rule["top_k"], "score_norm": rule["score_norm"],
                 "router": [s.router_steps, s.router_lr]}
        others = {k: v for k, v in rule.items() if k not in ("top_k", "score_norm") and v != TOKEN_RULE.get(k)}
        if others:  # the token rules keep the keys they always had
            found["rule"] = {**others, "prototype_examples": s.prototype_examples}
        if rule["fallback"] == "base" and rule["prototype_pooling"] == "prompt":  # the prompt floor decides
            found["rule"]["prompt_floor_slack"] = PROMPT_FLOOR_SLACK
        return found

    def routed_library(self, names, rule: dict[str, Any]) -> Any:
        """The library of ``names`` in the route phase under ``rule`` (every field set, none left from before)."""
        model = self.library(names, feature_of(rule))
        model.set_phase("route", **phase_rule(rule))
        return model

    def scores(self, model_id: dict[str, Any], build: Callable[[], Any], items) -> dict[str, float]:
        """Scores of one model on ``items`` (task names and/or probes), building the model only if needed."""
        built = []

        def model():
            if not built:
                built.append(build())
            return built[0]

        out = {}
        for item in items:
            key = cache_key(dict(kind="score", model=model_id, item=item, data=self.data_id,
                                 probe=self.settings.probe_questions))
            if item == NLL:
                key = cache_key(dict(kind="nll", model=model_id, data=self.data_id, texts=self.settings.nll_texts))
                out[item] = self.store.score(key, lambda: answer_nll(model(), self.tokenizer, self.nll_examples))
            elif item in self.probes:
                out[item] = self.store.score(
                    key, lambda item=item: choice_accuracy(model(), self.tokenizer, self.probes[item]))
            else:
                out[item] = self.store.score(
                    key, lambda item=item: answer_accuracy(model(), self.tokenizer, self.tasks[item].test))
        return out


# ------------------------------------------------------------------------------------------------- the methods
def run(settings: Settings, run_name: str, routers_only: bool = False,
        rules: list[str] | None = None) -> dict[str, Any]:
    start = time.perf_counter()
    bench = Bench(settings, Store(CACHE))
    tasks, everything = list(settings.tasks), list(settings.tasks) + list(settings.probes)
    methods: dict[str, dict[str, float]] = {}
    cost: dict[str, dict[str, Any]] = {}

    methods["zero_shot"] = bench.scores({"m": "zero_shot"}, lambda: bench.base, everything + [NLL])
    experts = {t: bench.expert(t) for t in tasks + list(settings.distractors)}
    methods["experts"] = {}
    for t in tasks:
        methods["experts"].update(bench.scores({"m": "expert", "a": str(experts[t][0])},
                                               lambda t=t: bench.single(experts[t][0], t), [t]))
    expert_seconds = sum(experts[t][1]["seconds"] for t in tasks)
    expert_examples = sum(experts[t][1]["examples"] for t in tasks)
    stage1_seconds = sum(experts[t][1]["expert_seconds"] for t in tasks)
    stage1_examples = len(tasks) * settings.expert_steps * settings.batch_size  # without the router stage
    cost["experts"] = dict(s=stage1_seconds, n=stage1_examples, passes=1)

    # ours: routing over the task experts, by every rule compared (token rules, then the prototype routers)
    everything = everything + [NLL]
    libraries: dict[str, Any] = {}  # by prototype feature

    def routed(rule):
        feature = feature_of(rule)
        if feature not in libraries:
            libraries[feature] = bench.library(tasks, feature)
        libraries[feature].set_phase("route", **phase_rule(rule))
        return libraries[feature]

    by_position: dict[str, dict[str, dict[str, float]]] = {}
    image_token = image_token_id(bench.base)
    for method, rule in RULES.items():
        if rules is not None and method not in rules:
            continue
        model_id = bench.routing_id(tasks, rule)
        methods[method] = bench.scores(model_id, lambda rule=rule: routed(rule), everything)
        cost[method] = dict(s=expert_seconds, n=expert_examples, passes=1)
        by_position[method] = {t: bench.store.record(
            cache_key(dict(kind="by_position", model=model_id, item=t, data=bench.data_id, n=POSITION_EXAMPLES)),
            lambda rule=rule, t=t: own_expert_share(routed(rule), bench.tokenizer,
                                                    bench.tasks[t].test[:POSITION_EXAMPLES], t, image_token))
            for t in tasks}
    if routers_only:  # the routers beside the oracle and REPRO, without the slow baselines
        methods["repro"], accuracy, _ = repro(bench, tasks)
        distractor, related = distractor_and_related(bench, tasks, methods, everything)
        general_nll = {method: scores.pop(NLL) for method, scores in methods.items() if NLL in scores}
        return {"tasks": tasks, "general": list(settings.probes), "methods": methods, "recommended": RECOMMENDED,
                "test_examples": {t: len(bench.tasks[t].test) for t in tasks}, "general_nll": general_nll,
                "routing_by_position": by_position, "distractor": distractor, "related": related,
                "routing_accuracy": {"repro": accuracy}, "settings": asdict(settings),
                "seconds": round(time.perf_counter() - start, 1)}

    # Seq-FT and the accuracy matrices for BWT/FWT, over task orders
    orders = task_orders(tasks, methods["experts"], settings)
    matrices, order_avgs, seq_cost = {}, {}, {}
    for order_name, order in orders.items():
        matrix, seconds, examples = seq_ft_matrix(bench, order, experts)
        matrices[f"seq_ft/{order_name}"] = dict(order=order, matrix=matrix)
        order_avgs.setdefault(order_name, {})["seq_ft"] = sum(matrix[-1]) / len(order)
        seq_cost[order_name] = (seconds, examples)
    canonical = orders["canonical"]
    final = bench.scores({"m": "seq_ft", "order": canonical}, lambda: bench.single(
        seq_ft_stage(bench, canonical, len(canonical) - 1, experts)[0], "seq_ft"), everything)
    methods["seq_ft"] = final
    cost["seq_ft"] = dict(s=seq_cost["canonical"][0], n=seq_cost["canonical"][1], passes=1)

    # routing: the library grown in each order (experts are order-free; the matrix shows what each addition does).
    # The recommended router in every order (its order spread is a target); the paper's rule in the canonical one,
    # which keeps a full run within about two hours on two cores.
    for order_name, order in orders.items():
        for method in ("routing", RECOMMENDED) if order_name == "canonical" else (RECOMMENDED,):
            matrix = growth_matrix(bench, order, RULES[method])
            matrices[f"{method}/{order_name}"] = dict(order=order, matrix=matrix)
            order_avgs[order_name][method] = sum(matrix[-1]) / len(order)

    # MTL: one LoRA on all tasks' data at once, the same total steps
    union = [e for t in tasks for e in bench.tasks[t].train]
    random.Random(settings.seed).shuffle(union)
    mtl_folder, mtl_meta = bench.lora("mtl", "mtl", union, settings.expert_steps * len(tasks), extra={"tasks": tasks})
    methods["mtl"] = bench.scores({"m": "mtl", "a": str(mtl_folder)}, lambda: bench.single(mtl_folder, "mtl"),
                                  everything)
    cost["mtl"] = dict(s=mtl_meta["seconds"], n=mtl_meta["examples"], passes=1)

    # task-arithmetic merges (PEFT add_weighted_adapter)
    for method in MERGES:
        def merged(method=method):
            model = bench.library(tasks)
            add_merged_expert(model, tasks, method)
            return model
        methods[method] = bench.scores({"m": method, "experts": tasks}, merged, everything)
        cost[method] = dict(s=stage1_seconds, n=stage1_examples, passes=1)

    # MR-LoRA style and REPRO: sequence-level choice of one expert, then a pass with it
    methods["mr_lora"], routing_accuracy_mr, mr_meta = mr_lora(bench, tasks, experts)
    cost["mr_lora"] = dict(s=stage1_seconds + mr_meta["seconds"], n=stage1_examples + mr_meta["examples"],
                           passes=2)
    methods["repro"], routing_accuracy_repro, repro_seconds = repro(bench, tasks)
    cost["repro"] = dict(s=stage1_seconds + repro_seconds, n=stage1_examples, passes=2)

    # growth with distractors (paper Table 4) and routing heatmaps (paper Figure 3)
    growth = [dict(experts=list(canonical[: i + 1]), scores=bench.scores(
        bench.routing_id(canonical[: i + 1]),
        lambda i=i: bench.library(canonical[: i + 1]), list(canonical[: i + 1]) + list(settings.probes)))
        for i in range(len(canonical))]
    with_distractors = list(canonical) + list(settings.distractors)
    growth.append(dict(experts=with_distractors, scores=bench.scores(
        bench.routing_id(with_distractors),
        lambda: bench.library(with_distractors), everything)))
    distractor, related = distractor_and_related(bench, canonical, methods, everything)
    heatmap = RESULTS / f"{run_name}_routing.png"
    library = routed(RULES["routing"])
    plot_routing({t: routing_shares(library, bench.tokenizer, bench.tasks[t].test[:8]) for t in tasks}, heatmap,
                 title=f"{settings.base}, top-1 routing: share of each task's tokens per expert and block")

    zero = [methods["zero_shot"][t] for t in canonical]
    general_nll = {method: scores.pop(NLL) for method, scores in methods.items() if NLL in scores}
    for step in growth:
        step["scores"].pop(NLL, None)
    results = {
        "tasks": tasks, "general": list(settings.probes), "methods": methods,
        "recommended": RECOMMENDED, "test_examples": {t: len(bench.tasks[t].test) for t in tasks},
        "general_nll": general_nll, "distractor": distractor, "related": related,
        "routing_by_position": by_position,
        "orders": order_avgs,
        "transfer": {name: transfer(m["matrix"], [methods["zero_shot"][t] for t in m["order"]])
                     for name, m in matrices.items()},
        "matrices": matrices,
        "growth": growth,
        "routing_accuracy": {"mr_lora": routing_accuracy_mr, "repro": routing_accuracy_repro},
        "train_seconds": {m: round(c["s"], 1) for m, c in cost.items()} | {"zero_shot": 0.0},
        "train_examples": {m: c["n"] for m, c in cost.items()} | {"zero_shot": 0},
        "infer_passes": {m: c["passes"] for m, c in cost.items()} | {"zero_shot": 1},
        "settings": asdict(settings), "heatmap": heatmap.name, "zero_shot_canonical": zero,
        "seconds": round(time.perf_counter() - start, 1),
    }
    return results


def image_token_id(model) -> int | None:
    """The image placeholder's token id of a multimodal model (None for a text model)."""
    return getattr(model.config, "image_token_id", getattr(model.config, "image_token_index", None))


def distractor_and_related(bench: Bench, tasks: list[str], methods: dict[str, dict[str, float]], everything):
    """The recommended router with the distractor expert added, and each task's score without its related expert
    (cross-modal / cross-task transfer), the paper's token rule beside it."""
    with_distractors = list(tasks) + list(bench.settings.distractors)
    recommended_rule = RULES[RECOMMENDED]
    distractor = {"without": dict(methods[RECOMMENDED]), "with": bench.scores(
        bench.routing_id(with_distractors, recommended_rule),
        lambda: bench.routed_library(with_distractors, recommended_rule), everything)}
    related = {}
    for task, partner in bench.settings.related:
        without = [t for t in tasks if t != partner]
        related[f"{task} without {partner}"] = {
            "with": methods[RECOMMENDED][task], "routing_with": methods["routing"][task],
            "without": bench.scores(bench.routing_id(without, recommended_rule),
                                    lambda without=without: bench.routed_library(without, recommended_rule),
                                    [task])[task],
            "routing_without": bench.scores(bench.routing_id(without), lambda without=without: bench.library(without),
                                            [task])[task]}
    for scores in distractor.values():
        scores.pop(NLL, None)
    return distractor, related


def task_orders(tasks: list[str], expert_scores: dict[str, float], settings: Settings) -> dict[str, list[str]]:
    """canonical, easy-to-hard and hard-to-easy (by the own expert's score), and seeded random orders."""
    by_ease = sorted(tasks, key=lambda t: (-expert_scores[t], tasks.index(t)))
    orders = {"canonical": tasks, "easy_to_hard": by_ease, "hard_to_easy": by_ease[::-1]}
    rng = random.Random(settings.seed)
    while len(orders) < settings.orders:
        shuffled = tasks[:]
        rng.shuffle(shuffled)
        orders[f"random_{len(orders) - 2}"] = shuffled
    return dict(list(orders.items())[: max(settings.orders, 1)])


def seq_ft_stage(bench: Bench, order: list[str], stage: int, experts) -> tuple[Path, dict[str, Any]]:
    """Seq-FT after ``order[: stage + 1]``: one LoRA, trained on each task in turn with the expert budget."""
    if stage == 0:
        return bench.lora("seq_ft", "seq_ft", bench.tasks[order[0]].train, bench.settings.expert_steps,
                          extra={"tasks": order[:1]})
    previous, _ = seq_ft_stage(bench, order, stage - 1, experts)
    return bench.lora("seq_ft", "seq_ft", bench.tasks[order[stage]].train, bench.settings.expert_steps,
                      start=previous, extra={"tasks": order[: stage + 1]})


def seq_ft_matrix(bench: Bench, order: list[str], experts) -> tuple[list[list[float]], float, int]:
    matrix, seconds, examples = [], 0.0, 0
    for stage in range(len(order)):
        folder, meta = seq_ft_stage(bench, order, stage, experts)
        seconds, examples = seconds + meta["seconds"], examples + meta["examples"]
        scores = bench.scores({"m": "seq_ft", "order": order[: stage + 1]},
                              lambda folder=folder: bench.single(folder, "seq_ft"), matrix_items(order, stage))
        matrix.append([scores.get(t) for t in order])
    return matrix, seconds, examples


def growth_matrix(bench: Bench, order: list[str], rule: dict[str, Any]) -> list[list[float]]:
    matrix = []
    for i in range(len(order)):
        present = list(order[: i + 1])
        scores = bench.scores(bench.routing_id(present, rule),
                              lambda present=present: bench.routed_library(present, rule), matrix_items(order, i))
        matrix.append([scores.get(t) for t in order])
    return matrix


def matrix_items(order: list[str], stage: int) -> list[str]:
    """The tasks row ``stage`` of an accuracy matrix scores: every task learnt so far and the next one. That is all
    BWT and FWT read (a[T-1][j], a[j][j], a[j-1][j]); the entries further right (a task two or more stages before
    it is learnt) stay null, which keeps the four orders' matrices within the run's time budget."""
    return list(order[: stage + 2])


def mr_lora(bench: Bench, tasks: list[str], experts):
    s = bench.settings
    replay = router_examples([bench.tasks[t] for t in tasks], s.replay_per_task)
    folder, meta = bench.lora("mr_router", "mr_router", replay, s.router_lora_steps,
                              extra={"tasks": tasks, "replay": s.replay_per_task})
    state: dict[str, Any] = {}

    def model():
        if "model" not in state:
            m = bench.library(tasks)
            m.add_expert(folder, adapter_name="mr_router")
            state["model"] = m
        return state["model"]

    def choices(examples):
        return mr_lora_choices(model(), bench.tokenizer, "mr_router", tasks, examples)

    return two_pass_scores(bench, "mr_lora", tasks, model, choices) + (meta,)


def repro(bench: Bench, tasks: list[str]):
    start = time.perf_counter()
    state: dict[str, Any] = {}

    def model():
        if "model" not in state:
            state["model"] = bench.library(tasks)
            state["prototypes"] = repro_prototypes(state["model"], bench.tokenizer, [bench.tasks[t] for t in tasks],
                                                   bench.settings.prototype_examples)
            state["seconds"] = time.perf_counter() - start
        return state["model"]

    def choices(examples):
        return repro_choices(model(), bench.tokenizer, state["prototypes"], tasks, examples)

    scores, accuracy = two_pass_scores(bench, "repro", tasks, model, choices)
    return scores, accuracy, state.get("seconds", 0.0)


def two_pass_scores(bench: Bench, method: str, tasks: list[str], model, choices):
    """Scores of a sequence-level router (pick one expert, then answer with it) and its routing accuracy in %."""
    key_id = {"m": method, "experts": tasks, "s": asdict(bench.settings)}
    scores, routed_right, total = {}, 0.0, 0
    for t in tasks:
        examples, picks = bench.tasks[t].test, []

        def picked(examples=examples):
            if not picks:
                picks.extend(choices(examples))
            return picks

        scores[t] = bench.store.score(cache_key(dict(kind="score", model=key_id, item=t)),
                                      lambda: accuracy_with_choices(model(), bench.tokenizer, examples, picked()))
        share = bench.store.score(cache_key(dict(kind="routes", model=key_id, item=t)),
                                  lambda: 100.0 * sum(p == t for p in picked()) / len(examples))
        routed_right, total = routed_right + share * len(examples) / 100, total + len(examples)
    scores[NLL] = bench.store.score(
        cache_key(dict(kind="nll", model=key_id, texts=bench.settings.nll_texts)),
        lambda: nll_with_choices(model(), bench.tokenizer, bench.nll_examples, choices(bench.nll_examples)))
    for name in bench.settings.probes:
        probe = bench.probes[name]
        scores[name] = bench.store.score(
            cache_key(dict(kind="score", model=key_id, item=name)),
            lambda probe=probe: general_with_choices(model(), bench.tokenizer, probe,
                                                     choices([q for q, _, _ in probe])))
    return scores, 100.0 * routed_right / total


def print_distractor_and_related(results: dict[str, Any]) -> None:
    """How the distractor and the related experts move the recommended router's tasks."""
    with_d, without_d = results["distractor"]["with"], results["distractor"]["without"]
    print(f"\n{RECOMMENDED} with the distractor: " + ", ".join(
        f"{item} {without_d[item]:.1f} -> {with_d[item]:.1f}" for item in with_d))
    for name, value in results["related"].items():
        print(f"{name}: {RECOMMENDED} {value['with']:.1f} -> {value['without']:.1f}; "
              f"routing {value['routing_with']:.1f} -> {value['routing_without']:.1f}")


def _say(message: str) -> None:
    print(f"[continual] {message}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny budget smoke run")
    parser.add_argument("--multimodal", action="store_true", help="the LLaVA-style half (image tasks)")
    parser.add_argument("--routers-only", action="store_true",
                        help="only the routing rules beside zero-shot, the oracle and REPRO (-> *_routers.json)")
    parser.add_argument("--expert-steps", type=int, default=None,
                        help=f"steps per expert (MTL and Seq-FT scale with it; default {Settings.expert_steps})")
    parser.add_argument("--rules", type=lambda text: text.split(","), default=None,
                        help=f"only these routing rules, comma-separated (always with routing and {RECOMMENDED})")
    args = parser.parse_args()
    if args.rules is not None:
        unknown = sorted(set(args.rules) - set(RULES))
        if unknown:
            parser.error(f"unknown rules {unknown}; choose among {sorted(RULES)}")
        args.rules = sorted(set(args.rules) | {"routing", RECOMMENDED}, key=list(RULES).index)
    settings = half_settings(args.multimodal, args.quick)
    name = "continual" + ("_multimodal" if args.multimodal else "") + ("_quick" if args.quick else "")
    if args.expert_steps not in (None, settings.expert_steps):
        settings, name = replace(settings, expert_steps=args.expert_steps), f"{name}_steps{args.expert_steps}"
    torch.manual_seed(settings.seed)
    results = run(settings, name, routers_only=args.routers_only, rules=args.rules)
    name += "_routers" if args.routers_only else ""
    write_json_atomic(RESULTS / f"{name}.json", results)
    print(method_table(results))
    if args.routers_only:
        print_distractor_and_related(results)
        return
    print()
    print(order_table(results["orders"]))
    print()
    for key, value in results["transfer"].items():
        print(f"{key:<28} BWT {value['bwt']:+6.1f}  FWT {value['fwt']:+6.1f}")
    print()
    print(growth_table(results["growth"], results["tasks"]))
    print()
    print(cost_table(results))
    print(f"\nrouting accuracy (sequence-level routers): {results['routing_accuracy']}; wrote {RESULTS / name}.json")


if __name__ == "__main__":
    main()
