"""The generated tasks: seeded, disjoint splits of the asked size, answers the tasks' rules give."""

from __future__ import annotations

import re

import pytest

from peft_routing.demo.tasks import CAPITALS, GENERATORS, MONTHS, capital_questions, make_task


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_splits_are_disjoint_seeded_and_full(name):
    task = make_task(name, 256, 40, seed=3)
    assert len(task.train) == 256 and len(task.test) == 40
    prompts = lambda examples: {e.prompt_messages[-1]["content"] for e in examples}  # noqa: E731
    assert not prompts(task.train) & prompts(task.test)
    assert [e.messages for e in make_task(name, 256, 40, seed=3).test] == [e.messages for e in task.test]


def test_answers_follow_each_rule():
    for e in make_task("dates", 20, 0).train:
        year, month, day = map(int, re.search(r"(\d{4})-(\d{2})-(\d{2})", e.prompt_messages[0]["content"]).groups())
        assert e.answer == f"{day} {MONTHS[month - 1]} {year}"
    for e in make_task("units", 20, 0).train:
        km = int(re.search(r"Convert (\d+) km", e.prompt_messages[0]["content"]).group(1))
        assert e.answer == f"{km * 1000} m"
    for e in make_task("reverse", 20, 0).train:
        items = e.prompt_messages[0]["content"].split(": ", 1)[1].split(", ")
        assert e.answer.split(", ") == items[::-1]


def test_asking_for_more_examples_than_a_task_has_fails_clearly():
    with pytest.raises(ValueError, match="produced only"):
        make_task("reverse", 2000, 0)  # 12 * 11 * 10 = 1320 distinct lists


def test_probe_has_the_right_answer_among_distinct_options():
    for question, options, right in capital_questions():
        assert len(set(options)) == 4 and question.prompt_messages[0]["content"].startswith("What is the capital")
        country = question.prompt_messages[0]["content"].removeprefix("What is the capital of ").rstrip("?")
        assert options[right] == CAPITALS[country]
