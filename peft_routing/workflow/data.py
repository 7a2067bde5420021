"""Task data: chat-style examples read from JSONL files, Python lists or Hugging Face ``datasets``.

A record is either ``{"messages": [{"role": ..., "content": ...}, ...]}`` whose last message is the assistant's
answer, or ``{"prompt": ..., "response": ...}`` (optionally ``"system"``). ``"image"`` (one) or ``"images"`` (a
list) add pictures for multimodal models: a path (relative paths are read from the JSONL file's folder) or a PIL
image. Everything is checked when the data is loaded, so a bad line fails before any training starts.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROLES = ("system", "user", "assistant")


@dataclass
class ChatExample:
    """One conversation; the last message is the answer the loss (and the evaluation) is about."""

    messages: list[dict[str, Any]]
    images: list[Any] = field(default_factory=list)  # paths (checked to exist) or PIL images

    @property
    def has_answer(self) -> bool:
        return self.messages[-1]["role"] == "assistant"

    @property
    def prompt_messages(self) -> list[dict[str, Any]]:
        """The conversation up to (without) the answer."""
        return self.messages[:-1] if self.has_answer else self.messages

    @property
    def answer(self) -> str:
        if not self.has_answer:
            raise DataError("This example has no answer (its last message is not the assistant's).")
        return self.messages[-1]["content"]


class DataError(ValueError):
    """A record that cannot be used, with where it came from (file and line, or list index)."""


def as_examples(data) -> list[ChatExample]:
    """``data`` as examples: a list of ``ChatExample`` as it is, anything else through ``load_examples``.

    Args:
        data: a list of ``ChatExample``, a JSONL path, or an iterable of dicts.
    """
    if isinstance(data, list) and data and all(isinstance(e, ChatExample) for e in data):
        return data
    return load_examples(data)


def load_examples(source: str | os.PathLike | Iterable[dict], *, require_answer: bool = True) -> list[ChatExample]:
    """Examples from a JSONL path, or from any iterable of dicts (a list, a ``datasets.Dataset``).

    Args:
        source: a JSONL file, or an iterable of records.
        require_answer: ``False`` accepts prompts without an answer (for generation): the messages then end with the
            user's turn.
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        records = _read_jsonl(path)
        base_dir, label = path.parent, str(path)
    else:
        records = ((f"record {i}", record) for i, record in enumerate(source))
        base_dir, label = None, "the data"
    examples = [_example(record, where, base_dir, require_answer) for where, record in records]
    if not examples:
        raise DataError(f"No examples in {label}: it is empty. A task needs at least one record.")
    return examples


def _read_jsonl(path: Path):
    if not path.is_file():
        raise FileNotFoundError(f"Data file {path} does not exist.")
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{path}, line {number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{where}: not valid JSON ({error.msg} at column {error.colno}).") from None
            yield where, record


def _example(record: Any, where: str, base_dir: Path | None, require_answer: bool) -> ChatExample:
    if not isinstance(record, dict):
        raise DataError(f"{where}: a record must be a JSON object, got {type(record).__name__}.")
    if "messages" in record:
        messages = _checked_messages(record["messages"], where)
    elif "prompt" in record:
        messages = [{"role": "system", "content": record["system"]}] if record.get("system") else []
        messages.append({"role": "user", "content": _text(record, "prompt", where)})
        if "response" in record or require_answer:
            messages.append({"role": "assistant", "content": _text(record, "response", where)})
    else:
        raise DataError(f"{where}: needs 'messages' (a chat) or 'prompt' and 'response'; got keys {sorted(record)}.")
    ends_with_answer = messages[-1]["role"] == "assistant"
    if require_answer and not ends_with_answer:
        raise DataError(f"{where}: the last message must be the assistant's answer (role 'assistant').")
    if not require_answer and ends_with_answer:
        messages = messages[:-1]  # generation: the reference answer is not part of the prompt
    if not any(m["role"] == "user" for m in messages):
        raise DataError(f"{where}: there is no user message to answer.")
    return ChatExample(messages, _checked_images(record, where, base_dir))


def _checked_messages(messages: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects.")
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES or "content" not in message:
            raise DataError(f"{where}: message {i} must have a 'role' in {ROLES} and a 'content'; got {message!r}.")
        checked.append({"role": message["role"], "content": message["content"]})
    return checked


def _text(record: dict, key: str, where: str) -> str:
    value = record.get(key)
    if not isinstance(value, str) or not value:
        raise DataError(f"{where}: '{key}' must be a non-empty string, got {value!r}.")
    return value


def _checked_images(record: dict, where: str, base_dir: Path | None) -> list[Any]:
    images = record.get("images", [record["image"]] if record.get("image") is not None else [])
    if not isinstance(images, list):
        images = [images]
    checked = []
    for image in images:
        if isinstance(image, (str, os.PathLike)):
            path = Path(image)
            if not path.is_absolute() and base_dir is not None:
                path = base_dir / path
            if not path.is_file():
                raise FileNotFoundError(f"{where}: image {path} does not exist.")
            checked.append(path)
        elif hasattr(image, "convert"):  # a PIL image
            checked.append(image)
        else:
            raise DataError(f"{where}: an image must be a file path or a PIL image, got {type(image).__name__}.")
    return checked


def open_image(image: Any):
    """A PIL RGB image from a path or a PIL image.

    Args:
        image: a path or a PIL image.
    """
    from PIL import Image

    if isinstance(image, Path):
        with Image.open(image) as opened:
            return opened.convert("RGB")
    return image.convert("RGB")
