"""Generated image tasks for the multimodal half of the benchmark: small scenes of coloured shapes, seeded.

A scene is 1-4 shapes of one kind and one colour on a white 32x32 image, in distinct cells of a 2x2 grid. From a
scene come the alignment stage's caption ("two red circles") and the tasks' questions: its colour, its count, its
shape. ``count_text`` asks the same counting question about a written list, the text task related to an image task
(the paper's cross-modal rows). No files, no downloads: everything is drawn with PIL from the seed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

from ..workflow.data import ChatExample

IMAGE_SIZE = 32
COLORS = {"red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 60, 220), "yellow": (230, 200, 20),
          "purple": (140, 40, 170), "orange": (240, 130, 20)}
SHAPES = ["circle", "square", "triangle"]
COUNT_WORDS = ["one", "two", "three", "four"]
LIST_ITEMS = ["circle", "square", "triangle", "star", "heart", "arrow", "ring", "cross"]


@dataclass(frozen=True)
class Scene:
    color: str
    shape: str
    cells: tuple[int, ...]  # which of the 4 grid cells hold a shape
    margin: int = 3  # pixels between a shape and its cell's border (2-4: the shapes' size varies)

    @property
    def count(self) -> int:
        return len(self.cells)

    @property
    def caption(self) -> str:
        plural = "s" if self.count > 1 else ""
        return f"{COUNT_WORDS[self.count - 1]} {self.color} {self.shape}{plural}"

    def draw(self) -> Image.Image:
        image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), "white")
        pen = ImageDraw.Draw(image)
        half = IMAGE_SIZE // 2
        for cell in self.cells:
            x0, y0 = (cell % 2) * half + self.margin, (cell // 2) * half + self.margin
            box = (x0, y0, x0 + half - 2 * self.margin, y0 + half - 2 * self.margin)
            fill = COLORS[self.color]
            if self.shape == "circle":
                pen.ellipse(box, fill=fill)
            elif self.shape == "square":
                pen.rectangle(box, fill=fill)
            else:
                pen.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) // 2, box[1])], fill=fill)
        return image


def random_scene(rng: random.Random) -> Scene:
    count = rng.randint(1, 4)
    cells = tuple(sorted(rng.sample(range(4), count)))
    return Scene(rng.choice(sorted(COLORS)), rng.choice(SHAPES), cells, margin=rng.randint(2, 4))


def image_chat(scene: Scene, question: str, answer: str) -> ChatExample:
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}
    return ChatExample([user, {"role": "assistant", "content": answer}], images=[scene.draw()])


def caption_example(rng: random.Random) -> ChatExample:
    """The alignment stage's data: describe the scene.

    Args:
        rng: the random source of the scene.
    """
    scene = random_scene(rng)
    return image_chat(scene, "Describe the image.", scene.caption)


def _color(rng: random.Random) -> ChatExample:
    scene = random_scene(rng)
    return image_chat(scene, "What color are the shapes? Answer with one word.", scene.color)


def _count(rng: random.Random) -> ChatExample:
    scene = random_scene(rng)
    return image_chat(scene, "How many shapes are there? Answer with a digit.", str(scene.count))


def _shape(rng: random.Random) -> ChatExample:
    scene = random_scene(rng)
    return image_chat(scene, "Which shape is shown? Answer with one word.", scene.shape)


def _count_text(rng: random.Random) -> ChatExample:
    items = [rng.choice(LIST_ITEMS) for _ in range(rng.randint(1, 4))]
    question = f"How many shapes are in this list: {', '.join(items)}? Answer with a digit."
    return ChatExample([{"role": "user", "content": question}, {"role": "assistant", "content": str(len(items))}])


IMAGE_GENERATORS = {
    "color": ("the colour of the shapes in an image, one word", _color),
    "count": ("how many shapes an image holds, as a digit", _count),
    "shape": ("which shape an image shows, one word (an image distractor)", _shape),
    "count_text": ("how many items a written list holds, as a digit (the text task related to 'count')", _count_text),
}


def caption_questions(seed: int = 0, n: int = 40, n_options: int = 4) -> list[tuple[ChatExample, list[str], int]]:
    """The alignment-stage probe: pick the scene's caption among ``n_options`` (the others differ in one attribute).

    Args:
        seed: seeds the scenes and the options.
        n: number of questions.
        n_options: choices per question.
    """
    rng = random.Random(f"captions-{seed}")
    questions = []
    for _ in range(n):
        scene = random_scene(rng)
        wrong = {Scene(color, scene.shape, scene.cells).caption for color in COLORS if color != scene.color}
        wrong |= {Scene(scene.color, shape, scene.cells).caption for shape in SHAPES if shape != scene.shape}
        wrong |= {Scene(scene.color, scene.shape, tuple(range(n))).caption for n in range(1, 5) if n != scene.count}
        options = rng.sample(sorted(wrong), n_options - 1) + [scene.caption]
        rng.shuffle(options)
        prompt = image_chat(scene, "Describe the image.", "")
        prompt = ChatExample(prompt.messages[:1], images=prompt.images)
        questions.append((prompt, options, options.index(scene.caption)))
    return questions
