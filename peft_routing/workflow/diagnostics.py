"""Where tokens go: per transformer block, the share of tokens each expert receives (paper Figure 3), and how often
each kind of position (image / question / answer) goes to the task's own expert.

``RoutingRecorder`` plugs into ``RoutingLinear.routing_observer``, the hook every route-phase layer calls with the
chosen expert ids, so recording costs one ``bincount`` per layer call. A position that a prototype router's
fallback leaves to the base model (all weights zero) counts under ``"(base)"``. Examples are run one at a time, so
padding tokens never enter the counts. ``plot_routing`` draws one heatmap (blocks x experts) per data set.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..io.atomic import staged_path
from ..tuner.layer import RoutingLinear
from .collate import IGNORE_INDEX, ChatCollator
from .data import ChatExample
from .evaluation import routing_on_prompt_only

BASE_COLUMN = "(base)"
POSITION_KINDS = ("image", "question", "answer")
_BLOCK = re.compile(r"\.(?:layers|h|blocks)\.(\d+)\.")


@dataclass
class RoutingShares:
    """shares[b, j]: the fraction of (token, module) choices in block ``blocks[b]`` that went to ``experts[j]``."""

    blocks: list[int]
    experts: list[str]
    shares: torch.Tensor

    def as_dict(self) -> dict:
        return {"blocks": self.blocks, "experts": self.experts, "shares": self.shares.tolist()}


class RoutingRecorder:
    """Counts route-phase expert choices per block while active (a context manager)."""

    def __init__(self, model) -> None:
        self.layers = {path: m for path, m in model.named_modules() if isinstance(m, RoutingLinear)}
        self.experts = list(model.base_model.experts)
        if model.base_model.routing_settings.fallback == "base":
            self.experts.append(BASE_COLUMN)
        self.counts: dict[int, torch.Tensor] = {}
        self.top_choices: list[torch.Tensor] = []  # per layer call: each token's first choice (library index)

    def __enter__(self) -> RoutingRecorder:
        for path, layer in self.layers.items():
            layer.routing_observer = self._observer(block_of(path))
        return self

    def __exit__(self, *exc) -> None:
        for layer in self.layers.values():
            layer.routing_observer = None

    def _observer(self, block: int):
        def observe(layer: RoutingLinear, routes) -> None:
            index = {name: self.experts.index(name) for name in layer.expert_names}
            to_library = torch.tensor([index[name] for name in layer.expert_names])
            ids, weights = routes.expert_ids.cpu(), routes.weights.cpu()
            chosen = to_library[ids]
            if BASE_COLUMN in self.experts:  # every weight zero: the base model alone
                chosen = chosen.masked_fill((weights == 0).all(dim=-1, keepdim=True), len(self.experts) - 1)
            self.top_choices.append(chosen[:, 0])
            counts = torch.bincount(chosen.reshape(-1), minlength=len(self.experts)).double()
            self.counts[block] = self.counts.get(block, 0) + counts

        return observe

    def shares(self) -> RoutingShares:
        blocks = sorted(self.counts)
        rows = [self.counts[b] / self.counts[b].sum().clamp(min=1) for b in blocks]
        matrix = torch.stack(rows) if rows else torch.zeros(0, len(self.experts))
        return RoutingShares(blocks, self.experts, matrix)


@torch.no_grad()
def routing_shares(model, processor, examples: Sequence[ChatExample]) -> RoutingShares:
    """Route ``examples`` (prompt and answer, unpadded) through the library and count the expert choices.

    Args:
        model: a routed-LoRA PeftModel in the route phase.
        processor: its tokenizer or multimodal processor.
        examples: the examples to route, one at a time.
    """
    if model.base_model.phase[0] != "route":
        raise ValueError("Routing shares need the route phase: call model.set_phase('route') first.")
    collator = ChatCollator(processor)
    with RoutingRecorder(model) as recorder:
        for example in examples:
            batch = collator([example])
            labels = batch.pop("labels")
            with routing_on_prompt_only(model, batch["input_ids"], labels):
                model(**batch)
    return recorder.shares()


@torch.no_grad()
def own_expert_share(model, processor, examples: Sequence[ChatExample], expert: str,
                     image_token_id: int | None = None) -> dict[str, float]:
    """% of first choices (over positions and routed modules) that go to ``expert``, per kind of position.

    Positions are "answer" where they predict an answer token, "image" where the input is ``image_token_id``, and
    "question" elsewhere (system prompt and template included).

    Args:
        model: a routed-LoRA PeftModel in the route phase.
        processor: its tokenizer or multimodal processor.
        examples: the task's examples, run one at a time.
        expert: the task's own expert.
        image_token_id: the image placeholder's token id (None: a text model).
    """
    collator = ChatCollator(processor)
    hits = dict.fromkeys(POSITION_KINDS, 0.0)
    totals = dict.fromkeys(POSITION_KINDS, 0.0)
    with RoutingRecorder(model) as recorder:
        own = recorder.experts.index(expert)
        for example in examples:
            batch = collator([example])
            labels = batch.pop("labels")[0]
            recorder.top_choices.clear()
            with routing_on_prompt_only(model, batch["input_ids"], labels.unsqueeze(0)):
                model(**batch)
            kinds = _position_kinds(batch["input_ids"][0], labels, image_token_id)
            for choices in recorder.top_choices:
                for kind in POSITION_KINDS:
                    where = kinds == POSITION_KINDS.index(kind)
                    hits[kind] += float((choices[where] == own).sum())
                    totals[kind] += float(where.sum())
    return {kind: 100.0 * hits[kind] / totals[kind] for kind in POSITION_KINDS if totals[kind]}


def _position_kinds(input_ids: torch.Tensor, labels: torch.Tensor, image_token_id: int | None) -> torch.Tensor:
    """0 image / 1 question / 2 answer for every position of one unpadded example."""
    kinds = torch.ones_like(input_ids)
    if image_token_id is not None:
        kinds[input_ids == image_token_id] = 0
    kinds[:-1][labels[1:] != IGNORE_INDEX] = 2  # position t predicts token t + 1
    return kinds


def block_of(path: str) -> int:
    """The transformer block index in a module path (``...layers.3.mlp...`` -> 3), -1 outside the blocks.

    Args:
        path: a module path.
    """
    match = _BLOCK.search(path)
    return int(match.group(1)) if match else -1


def plot_routing(shares_by_data: dict[str, RoutingShares], path: str | os.PathLike, title: str = "") -> Path:
    """One heatmap per data set (rows: transformer blocks, columns: experts), saved atomically as PNG.

    Args:
        shares_by_data: data set name -> its routing shares.
        path: the PNG file to write.
        title: the figure's title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(shares_by_data)
    figure, axes = plt.subplots(1, len(names), figsize=(2.2 + 1.6 * len(names) * 1.3, 4.2), squeeze=False)
    image = None
    for axis, name in zip(axes[0], names):
        data = shares_by_data[name]
        image = axis.imshow(data.shares.numpy(), vmin=0, vmax=1, cmap="viridis", aspect="auto")
        axis.set_title(f"data: {name}", fontsize=9)
        axis.set_xticks(range(len(data.experts)), data.experts, rotation=45, ha="right", fontsize=8)
        axis.set_yticks(range(len(data.blocks)), [str(b) for b in data.blocks], fontsize=7)
        axis.set_xlabel("expert", fontsize=8)
    axes[0][0].set_ylabel("transformer block", fontsize=8)
    if image is not None:
        figure.colorbar(image, ax=axes[0].tolist(), label="share of tokens", shrink=0.8)
    if title:
        figure.suptitle(title, fontsize=10)
    target = Path(path)
    try:
        with staged_path(target, suffix=".png") as temporary:
            figure.savefig(temporary, dpi=120, bbox_inches="tight")
    finally:
        plt.close(figure)
    return target
