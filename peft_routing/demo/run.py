"""The demo: SmolLM2-135M learns three tasks one after another, and we compare what it keeps.

Methods, all on the same generated tasks (``demo.tasks``) and the same training budget per task:
  * zero_shot: the base model;
  * seq_ft: one LoRA trained on the tasks in order (Seq-FT: it starts from the first task's LoRA, which is the
    same procedure as training it from scratch on that task, then continues on each next task);
  * experts: each task's own expert, told the task (the oracle);
  * routing: the library of experts, each token routed top-k with no task id (the paper's token rule);
  * routing_recommended: the same library under the recommended router (``RECOMMENDED_ROUTER``: each sequence
    takes the expert whose task prototype is nearest to its prompt, in the same forward; a prompt near none of
    them, like the general probe's, runs on the base model).
The general probe (multiple-choice capitals) is never trained on: it shows whether the base model's own
knowledge survives. Outputs: ``results.json``, ``routing.png`` (where each task's tokens go) and the library.

The budget is small so that the whole run takes minutes on 2 CPU cores (the library's defaults are the paper's):
adapters on all 7 projections of the top 10 of SmolLM2's 30 blocks, r=16, 40 expert steps at batch 8 and lr 1e-3
(constant), 3 router steps at batch 8 and lr 1e-2, the LM head applied to answer positions only, 256 training and
40 test examples per task.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..io.atomic import write_json_atomic
from ..ops.settings import RECOMMENDED_ROUTER
from ..tuner.config import LLAMA_PROJECTIONS, RoutingLoraConfig
from ..workflow.diagnostics import plot_routing, routing_shares
from ..workflow.evaluation import answer_accuracy, choice_accuracy
from ..workflow.library import ExpertLibrary, LibraryError
from ..workflow.training import learn_task, new_expert_config, train_expert
from .base_models import SMOLLM2, load_base_model
from .tasks import Task, capital_questions, make_task


@dataclass
class DemoSettings:
    tasks: tuple[str, ...] = ("sentiment", "dates", "reverse")
    train_examples: int = 256
    test_examples: int = 40
    top_layers: int = 10
    rank: int = 16
    alpha: int = 32
    batch_size: int = 8
    expert_steps: int = 40
    expert_lr: float = 1e-3
    router_steps: int = 3
    router_lr: float = 1e-2
    top_k: int = 1
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def expert_args(self) -> dict[str, Any]:
        return dict(max_steps=self.expert_steps, learning_rate=self.expert_lr, lr_scheduler_type="constant",
                    per_device_train_batch_size=self.batch_size, seed=self.seed, logging_steps=10)

    def router_args(self) -> dict[str, Any]:
        return dict(max_steps=self.router_steps, learning_rate=self.router_lr,
                    per_device_train_batch_size=self.batch_size,
                    seed=self.seed, logging_steps=1)


def run_demo(out_dir: str | Path, settings: DemoSettings | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Run the demo, print its table, and write ``results.json``, ``routing.png`` and ``library/`` under out_dir.

    Args:
        out_dir: the output folder.
        settings: the demo's budget and tasks (default: ``DemoSettings()``).
        overwrite: replace the library of an earlier demo in ``out_dir``.
    """
    settings = settings or DemoSettings()
    start = time.perf_counter()
    out = Path(out_dir)
    library = _fresh_library(out / "library", overwrite)
    torch.manual_seed(settings.seed)
    base, tokenizer = load_base_model(SMOLLM2)
    tasks = [make_task(name, settings.train_examples, settings.test_examples, settings.seed) for name in settings.tasks]
    probe = capital_questions(settings.seed)
    _say(f"{len(tasks)} tasks: " + "; ".join(f"{t.name} ({t.description})" for t in tasks))

    def score(model, label: str) -> dict[str, float]:
        scores = {t.name: answer_accuracy(model, tokenizer, t.test, progress=f"{label}: {t.name}") for t in tasks}
        scores["general"] = choice_accuracy(model, tokenizer, probe, progress=f"{label}: general probe")
        return scores

    methods: dict[str, dict[str, float]] = {"zero_shot": score(base, "zero-shot")}
    model, reports = _learn_all(base, tokenizer, tasks, settings, library)
    methods["experts"] = _own_expert_scores(model, tokenizer, tasks)
    model.set_phase("route", top_k=settings.top_k, score_norm="none")
    methods["routing"] = score(model, "routing")
    shares = {t.name: routing_shares(model, tokenizer, t.test[:16]) for t in tasks}
    plot_routing(shares, out / "routing.png", title="SmolLM2-135M: share of tokens per expert and block")
    model.set_phase("route", **RECOMMENDED_ROUTER)
    methods["routing_recommended"] = score(model, "routing (recommended)")
    methods["seq_ft"] = score(_sequential_finetune(model, tokenizer, tasks, settings), "Seq-FT")

    expert_seconds = sum(r.expert.seconds for r in reports.values())
    router_seconds = sum(r.router.seconds for r in reports.values())
    results = {
        "tasks": [t.name for t in tasks],
        "methods": {k: {name: round(v, 2) for name, v in methods[k].items()} for k in
                    ("zero_shot", "seq_ft", "routing", "routing_recommended", "experts")},
        "settings": asdict(settings),
        "training": {name: report.as_dict() for name, report in reports.items()},
        "seconds": {"expert_stage": round(expert_seconds, 1), "router_stage": round(router_seconds, 1),
                    "router_share_of_expert": round(router_seconds / expert_seconds, 4),
                    "total": round(time.perf_counter() - start, 1)},
        "routing_shares": {name: s.as_dict() for name, s in shares.items()},
    }
    write_json_atomic(out / "results.json", results)
    print(format_table(results))
    _say(f"wrote {out / 'results.json'}, {out / 'routing.png'} and the library {library.root}")
    return results


def format_table(results: dict[str, Any]) -> str:
    """The demo's table: one row per method, one column per task, their average, and the general probe.

    Args:
        results: what ``run_demo`` returns.
    """
    tasks = results["tasks"]
    header = f"{'method':<22}" + "".join(f"{t:>11}" for t in tasks) + f"{'task avg':>10}{'general':>9}"
    lines = [header, "-" * len(header)]
    for method, scores in results["methods"].items():
        cells = "".join(f"{scores[t]:>11.1f}" for t in tasks)
        average = sum(scores[t] for t in tasks) / len(tasks)
        general = f"{scores['general']:>9.1f}" if "general" in scores else f"{'-':>9}"
        lines.append(f"{method:<22}{cells}{average:>10.1f}{general}")
    seconds = results["seconds"]
    lines.append(f"training: expert stage {seconds['expert_stage']:.0f} s, "
                 f"router stage {seconds['router_stage']:.0f} s "
                 f"({100 * seconds['router_share_of_expert']:.1f}% of the expert stage); "
                 f"total {seconds['total']:.0f} s")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------ stages
def _fresh_library(root: Path, overwrite: bool) -> ExpertLibrary:
    if root.exists() and any(root.iterdir()):
        if not overwrite:
            raise LibraryError(f"{root} already exists (from an earlier demo?). Pass --overwrite or another --out.")
        import shutil

        ExpertLibrary.open(root)  # only ever delete something that is a library
        shutil.rmtree(root)
    return ExpertLibrary.create(root, SMOLLM2)


def _learn_all(base, tokenizer, tasks: list[Task], settings: DemoSettings, library: ExpertLibrary):
    from peft import get_peft_model

    config = RoutingLoraConfig(
        r=settings.rank, lora_alpha=settings.alpha, target_modules=LLAMA_PROJECTIONS, top_k=settings.top_k,
        layers_to_transform=list(range(base.config.num_hidden_layers - settings.top_layers,
                                       base.config.num_hidden_layers)),
    )
    model = get_peft_model(base, config, adapter_name=tasks[0].name)
    reports = {}
    for number, task in enumerate(tasks, start=1):
        _say(f"task {number}/{len(tasks)}: learning {task.name!r} from its own {len(task.train)} examples only")
        report = learn_task(model, task.name, task.train, tokenizer, expert_args=settings.expert_args(),
                            router_args=settings.router_args())
        library.add_from_model(model, task.name, training=report.as_dict())
        reports[task.name] = report
    return model, reports


def _own_expert_scores(model, tokenizer, tasks: list[Task]) -> dict[str, float]:
    scores = {}
    for task in tasks:
        model.set_phase("expert", task.name)
        scores[task.name] = answer_accuracy(model, tokenizer, task.test, progress=f"own expert: {task.name}")
    return scores


def _sequential_finetune(model, tokenizer, tasks: list[Task], settings: DemoSettings):
    """Seq-FT: one LoRA, trained on each task in turn (the first task's LoRA is the first expert, copied)."""
    _say("Seq-FT: one LoRA trained on the tasks in order")
    model.add_adapter("seq_ft", new_expert_config(model.base_model))
    with torch.no_grad():
        for layer in model.base_model.routing_layers():
            layer.lora_A["seq_ft"].weight.copy_(layer.lora_A[tasks[0].name].weight)
            layer.lora_B["seq_ft"].weight.copy_(layer.lora_B[tasks[0].name].weight)
    for task in tasks[1:]:
        train_expert(model, "seq_ft", task.train, tokenizer, **settings.expert_args())
    model.set_phase("expert", "seq_ft")
    return model


def _say(message: str) -> None:
    print(f"[demo] {message}", flush=True)

