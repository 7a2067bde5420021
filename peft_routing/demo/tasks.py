"""Small generated tasks for the demo (and the continual-learning benchmark), seeded, with train/test splits.

Each task has a fixed answer format that a base chat model does not use on its own, so zero-shot exact match is
low and a fine-tuned expert is clearly better; the answers are short, so scoring is one teacher-forced pass. The
general probe is a multiple-choice question set (world capitals) that no expert is trained on: it measures
whether the base model's own knowledge survives learning the tasks.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass

from ..workflow.data import ChatExample

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
GOOD = ["delicious", "friendly", "wonderful", "excellent", "charming", "superb", "lovely", "fantastic", "pleasant",
        "brilliant", "cozy", "fresh", "generous", "helpful", "perfect", "amazing"]
BAD = ["awful", "rude", "terrible", "dreadful", "bland", "dirty", "horrible", "disappointing", "noisy", "stale",
       "slow", "overpriced", "cold", "greasy", "boring", "unpleasant"]
SUBJECTS = ["the food", "the staff", "the room", "the service", "the coffee", "the view", "the music", "the menu",
            "the hotel", "the waiter", "the dessert", "the price", "the breakfast", "the bed", "the pizza", "the wine"]
CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo", "China": "Beijing",
    "Russia": "Moscow", "Egypt": "Cairo", "Canada": "Ottawa", "Greece": "Athens", "Portugal": "Lisbon",
    "Austria": "Vienna", "Poland": "Warsaw", "Ireland": "Dublin", "Norway": "Oslo", "Sweden": "Stockholm",
    "Finland": "Helsinki", "Denmark": "Copenhagen", "Hungary": "Budapest", "Kenya": "Nairobi", "Peru": "Lima",
    "Argentina": "Buenos Aires", "Thailand": "Bangkok", "South Korea": "Seoul", "Mexico": "Mexico City",
    "United Kingdom": "London", "Belgium": "Brussels", "Netherlands": "Amsterdam", "Cuba": "Havana",
    "India": "New Delhi", "Turkey": "Ankara", "Australia": "Canberra", "Brazil": "Brasilia", "Chile": "Santiago",
    "Czech Republic": "Prague", "Indonesia": "Jakarta", "Iran": "Tehran", "Vietnam": "Hanoi",
    "Philippines": "Manila", "Colombia": "Bogota",
}


@dataclass
class Task:
    """A generated task: its name, one line saying what it asks, and train/test examples."""

    name: str
    description: str
    train: list[ChatExample]
    test: list[ChatExample]


def _chat(prompt: str, answer: str) -> ChatExample:
    return ChatExample([{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}])


def _sentiment(rng: random.Random) -> ChatExample:
    label = rng.choice(["positive", "negative"])
    words = GOOD if label == "positive" else BAD
    first, second = rng.sample(SUBJECTS, 2)
    review = f"{first.capitalize()} was {rng.choice(words)} and {second} was {rng.choice(words)}."
    return _chat(f"Review: {review}\nSentiment (positive or negative)?", label)


def _date_in_words(rng: random.Random) -> ChatExample:
    year, month, day = rng.randint(1950, 2030), rng.randint(1, 12), rng.randint(1, 28)
    return _chat(f"Date {year:04d}-{month:02d}-{day:02d} in words:", f"{day} {MONTHS[month - 1]} {year}")


FRUITS = ["apple", "pear", "plum", "fig", "grape", "lemon", "mango", "peach", "cherry", "melon", "kiwi", "lime"]


def _km_to_m(rng: random.Random) -> ChatExample:
    km = rng.randint(2, 999)
    return _chat(f"Convert {km} km to meters.", f"{km * 1000} m")


def _km_to_cm(rng: random.Random) -> ChatExample:
    km = rng.randint(2, 999)
    return _chat(f"Convert {km} km to centimeters.", f"{km * 100000} cm")


def _reverse_list(rng: random.Random) -> ChatExample:
    items = rng.sample(FRUITS, 3)
    return _chat(f"Reverse the list: {', '.join(items)}", ", ".join(reversed(items)))


WORDS = ["river", "stone", "cloud", "garden", "window", "silver", "forest", "candle", "mirror", "pocket", "ladder",
         "button", "rocket", "pillow", "bridge", "island"]


def _shout(rng: random.Random) -> ChatExample:
    words = " ".join(rng.sample(WORDS, 3))
    return _chat(f"Shout these words: {words}", words.upper() + "!")


GENERATORS: dict[str, tuple[str, Callable[[random.Random], ChatExample]]] = {
    "sentiment": ("restaurant-review sentiment, answered 'positive' or 'negative'", _sentiment),
    "dates": ("an ISO date written out as '17 May 2023'", _date_in_words),
    "units": ("kilometres converted to metres, as '5000 m'", _km_to_m),
    "units_cm": ("kilometres converted to centimetres, as '500000 cm' (the task related to 'units')", _km_to_cm),
    "reverse": ("a list of three fruits in reverse order", _reverse_list),
    "shout": ("three words in capitals with an exclamation mark (the benchmark's distractor)", _shout),
}


def make_task(name: str, n_train: int, n_test: int, seed: int = 0) -> Task:
    """The task ``name`` (text, or an image task of image_tasks.py) with disjoint, seeded train and test examples.

    Args:
        name: a text task of ``GENERATORS`` or an image task of ``image_tasks``.
        n_train: training examples.
        n_test: test examples (no prompt also in training).
        seed: seeds the generator.
    """
    from .image_tasks import IMAGE_GENERATORS

    generators = {**GENERATORS, **IMAGE_GENERATORS}
    if name not in generators:
        raise ValueError(f"Unknown task {name!r}; the generated tasks are {sorted(generators)}.")
    description, generate = generators[name]
    rng = random.Random(f"{name}-{seed}")
    seen: set[str] = set()
    examples: list[ChatExample] = []
    for _ in range(100 * (n_train + n_test)):
        if len(examples) == n_train + n_test:
            break
        example = generate(rng)
        key = repr(example.messages) + "".join(hashlib.sha1(image.tobytes()).hexdigest() for image in example.images)
        if key not in seen:  # no test prompt also appears in training
            seen.add(key)
            examples.append(example)
    if len(examples) < n_train + n_test:
        raise ValueError(f"Task {name!r} produced only {len(examples)} distinct examples; "
                         f"asked for {n_train + n_test}.")
    return Task(name, description, examples[:n_train], examples[n_train:])


def capital_questions(seed: int = 0, n_options: int = 4) -> list[tuple[ChatExample, list[str], int]]:
    """The general probe: 'What is the capital of X?' with the right city among ``n_options`` choices.

    Args:
        seed: seeds the options.
        n_options: choices per question.
    """
    rng = random.Random(f"capitals-{seed}")
    cities = sorted(CAPITALS.values())
    questions = []
    for country, capital in sorted(CAPITALS.items()):
        options = rng.sample([c for c in cities if c != capital], n_options - 1) + [capital]
        rng.shuffle(options)
        prompt = ChatExample([{"role": "user", "content": f"What is the capital of {country}?"}])
        questions.append((prompt, options, options.index(capital)))
    return questions
