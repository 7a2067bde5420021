"""How well do task prototypes separate a library's tasks from each other and from prompts no expert learnt?

For the text half of ``continual.py`` (its cached experts; run that first), every prompt's feature is the one the
prompt router compares (the causal mean of the normalised hidden states entering the prototype block, at the prompt's
last position, on the base model). Two similarities are compared:
- ``raw``: the cosine to each prototype, as the router uses it;
- ``centred``: the cosine after subtracting the mean of the prototypes from the feature and from every prototype,
  which removes what all prompts share (the chat template), a candidate for the next router.
For each, a task's floor is the lowest similarity of its own 128 training prompts to its prototype; ``library`` is
the raw cosine with the floor the experts carry for prefix pooling (``compute_prototype``: the lowest cosine at any
position that predicts an answer token, the prompt router's threshold before prompt floors existed), and
``prompt_floor`` the raw cosine with the prompt floor they carry (twice the farthest training prompt's distance,
``ops.prototypes.prompt_floor``; what the recommended router uses). The tables give, for each task's test prompts and
for prompts no expert learnt (capitals, MMLU explanations, the "shout" task): the share routed to each task's expert
and to the base model.

For each prompt set, ``distance_ratio`` gives the smallest and largest distance (1 - cosine) to the nearest
prototype over that prototype's farthest training prompt's distance: the prompt floor sends a prompt to the base
model above a ratio of ``PROMPT_FLOOR_SLACK``.

    python benchmarks/prototype_margins.py               # -> results/prototype_margins.json (a few minutes)
    python benchmarks/prototype_margins.py --multimodal  # the LLaVA half, captions probe included

``last`` and ``text_mean`` are two candidate features that weight the question over the images, decided the same way
(their own prototypes and prompt floors, by the library's ``prototype_of`` and ``prompt_floor``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from continual import CACHE, RESULTS, Bench, Store, half_settings, image_token_id  # noqa: E402

from peft_routing.ops.prototypes import prompt_floor, prototype_of  # noqa: E402
from peft_routing.workflow import ChatExample  # noqa: E402
from peft_routing.workflow.collate import IGNORE_INDEX, ChatCollator  # noqa: E402
from peft_routing.workflow.evaluation import chunks  # noqa: E402
from peft_routing.workflow.prototypes import prototype_features  # noqa: E402


def prompt_features(model, processor, examples, layer: int) -> torch.Tensor:
    """[n, d] the prompt router's feature of each example's prompt (the library's own: adapters off)."""
    return prototype_features(model, processor, list(examples), layer, 16)[0].float()


def question_features(model, processor, examples, layer: int, image_token: int | None) -> dict[str, torch.Tensor]:
    """Two candidate features that weight the question over the images, at the prompt's last position (base model):
    ``last``, the normalised hidden state there; ``text_mean``, the mean of normalised states over text positions."""
    collator, found = ChatCollator(processor), {"last": [], "text_mean": []}
    with model.disable_adapter(), torch.no_grad():
        for chunk in chunks(list(examples), 16, None):
            batch = collator(list(chunk))
            labels = batch.pop("labels")
            hidden = torch.nn.functional.normalize(
                model(**batch, output_hidden_states=True).hidden_states[layer].float(), dim=-1)
            last = (labels[:, 1:] != IGNORE_INDEX).int().argmax(dim=1)  # the position predicting the answer's first
            rows = torch.arange(len(last))
            found["last"].append(hidden[rows, last])
            text = batch["attention_mask"].bool() & (torch.arange(hidden.shape[1]) <= last[:, None])
            if image_token is not None:
                text &= batch["input_ids"] != image_token
            found["text_mean"].append((hidden * text.unsqueeze(-1)).sum(1) / text.sum(1, keepdim=True))
    return {name: torch.cat(parts) for name, parts in found.items()}


def similarity(features: torch.Tensor, prototypes: torch.Tensor, centre: torch.Tensor | None) -> torch.Tensor:
    if centre is not None:
        features, prototypes = features - centre, prototypes - centre
    return torch.nn.functional.normalize(features, dim=-1) @ torch.nn.functional.normalize(prototypes, dim=-1).T


def decisions(cos: torch.Tensor, floors: torch.Tensor, names: list[str]) -> dict[str, float]:
    """% of prompts to each expert (nearest prototype, above its floor) and to the base model."""
    best, nearest = cos.max(dim=1)
    to_base = best < floors[nearest]
    shares = {name: 100.0 * float(((nearest == i) & ~to_base).float().mean()) for i, name in enumerate(names)}
    return shares | {"(base)": 100.0 * float(to_base.float().mean())}


def distance_ratio(cos: torch.Tensor, farthest: torch.Tensor) -> list[float]:
    """[min, max] over prompts of the distance to the nearest prototype / its farthest training prompt's."""
    best, nearest = cos.max(dim=1)
    ratio = (1 - best) / (1 - farthest[nearest])
    return [float(ratio.min()), float(ratio.max())]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--multimodal", action="store_true", help="the LLaVA half of continual.py")
    multimodal = parser.parse_args().multimodal
    bench = Bench(half_settings(multimodal), Store(CACHE))
    tasks = list(bench.settings.tasks)
    model = bench.library(tasks)
    tuner = model.base_model
    prototypes = torch.stack([tuner.expert_prototype(t).vector.float() for t in tasks])
    layer = tuner.expert_prototype(tasks[0]).layer
    n_train = bench.settings.prototype_examples
    train = {t: prompt_features(model, bench.tokenizer, bench.tasks[t].train[:n_train], layer) for t in tasks}
    probes = {f"{t} (test)": bench.tasks[t].test for t in tasks}
    probes["capitals"] = [ChatExample(q.prompt_messages + [{"role": "assistant", "content": options[right]}])
                          for q, options, right in bench.probes["general"]]
    if "captions" in bench.probes:
        probes["captions"] = [ChatExample(q.messages + [{"role": "assistant", "content": options[right]}],
                                          images=q.images) for q, options, right in bench.probes["captions"]]
    probes["mmlu"] = bench.nll_examples[:40]
    probes["shout (no expert)"] = bench.tasks["shout"].test[:100]
    features = {name: prompt_features(model, bench.tokenizer, examples, layer) for name, examples in probes.items()}
    results = {}
    carried = {"library": torch.tensor([tuner.expert_prototype(t).floor for t in tasks]),
               "prompt_floor": torch.tensor([tuner.expert_prototype(t).prompt_floor for t in tasks])}
    for variant, centre in (("library", None), ("prompt_floor", None), ("raw", None),
                            ("centred", prototypes.mean(dim=0))):
        floors = carried[variant] if variant in carried else torch.stack(
            [similarity(train[t], prototypes[i : i + 1], centre).min() for i, t in enumerate(tasks)])
        results[variant] = {"floors": dict(zip(tasks, floors.tolist())),
                            "routes": {name: decisions(similarity(f, prototypes, centre), floors, tasks)
                                       for name, f in features.items()}}
    farthest = torch.stack([similarity(train[t], prototypes[i : i + 1], None).min() for i, t in enumerate(tasks)])
    results["distance_ratio"] = {name: distance_ratio(similarity(f, prototypes, None), farthest)
                                 for name, f in features.items()}
    for name, (low, high) in results["distance_ratio"].items():
        print(f"{name:<20} distance / farthest training prompt's: {low:.2f} to {high:.2f}")
    candidates = {name: question_features(model, bench.tokenizer, examples, layer, image_token_id(bench.base))
                  for name, examples in {**{t: bench.tasks[t].train[:n_train] for t in tasks}, **probes}.items()}
    for variant in ("last", "text_mean"):  # prototypes and prompt floors (slack 2) of the candidate features
        own = {t: candidates[t][variant] for t in tasks}
        candidate_prototypes = torch.stack([prototype_of(own[t]) for t in tasks])
        floors = torch.tensor([prompt_floor(similarity(own[t], candidate_prototypes[i : i + 1], None).squeeze(1))
                               for i, t in enumerate(tasks)])
        results[f"{variant}, prompt floor"] = {"floors": dict(zip(tasks, floors.tolist())), "routes": {
            name: decisions(similarity(candidates[name][variant], candidate_prototypes, None), floors, tasks)
            for name in probes}}
    header = f"{'prompts':<20}" + "".join(f"{t[:9]:>10}" for t in tasks + ["(base)"])
    for variant, found in ((k, v) for k, v in results.items() if k != "distance_ratio"):
        print(f"\n{variant} similarity; floors " + ", ".join(f"{t} {v:.4f}" for t, v in found["floors"].items()))
        print(header)
        for name, shares in found["routes"].items():
            print(f"{name:<20}" + "".join(f"{shares[t]:>10.1f}" for t in tasks + ["(base)"]))
    out = RESULTS / ("prototype_margins_multimodal.json" if multimodal else "prototype_margins.json")
    out.write_text(json.dumps(results, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
