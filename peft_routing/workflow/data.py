"""Task data: chat-style examples read from JSONL files, Python lists or Hugging Face ``datasets``.

A record is either ``{"messages": [{"role": ..., "content": ...}, ...]}`` whose last message is the assistant's
answer, or ``{"prompt": ..., "response": ...}`` (optionally ``"system"``). ``"image"`` (one) or ``"images"`` (a
list) add pictures for multimodal models: a path (relative paths are read from the JSONL file's folder and must
stay inside it; absolute paths only with ``allow_absolute_paths=True``) or a PIL image. Everything is checked when
the data is loaded (text fields are non-empty strings, every image opens and verifies), so a bad line fails with
its file and line before any training starts.
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


def load_examples(source: str | os.PathLike | Iterable[dict], *, require_answer: bool = True,
                  allow_absolute_paths: bool = False) -> list[ChatExample]:
    """Examples from a JSONL path, or from any iterable of dicts (a list, a ``datasets.Dataset``).

    Args:
        source: a JSONL file, or an iterable of records.
        require_answer: ``False`` accepts prompts without an answer (for generation): the messages then end with the
            user's turn.
        allow_absolute_paths: let a JSONL file name images by absolute path (outside its folder). Records given in
            Python may always do so.
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        records = _read_jsonl(path)
        images = _ImagePolicy(path.parent, allow_absolute_paths)
        label = str(path)
    else:
        records = ((f"record {i}", record) for i, record in enumerate(source))
        images, label = _ImagePolicy(None, True), "the data"
    examples = [_example(record, where, images, require_answer) for where, record in records]
    if not examples:
        raise DataError(f"No examples in {label}: it is empty. A task needs at least one record.")
    return examples


def _read_jsonl(path: Path):
    if not path.is_file():
        raise FileNotFoundError(f"Data file {path} does not exist.")
    with path.open("rb") as lines:
        for number, raw in enumerate(lines, start=1):
            where = f"{path}, line {number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise DataError(f"{where}: not UTF-8 text (byte {error.start} of the line); save the file as UTF-8."
                                ) from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{where}: not valid JSON ({error.msg} at column {error.colno}).") from None
            except RecursionError:
                raise DataError(f"{where}: nests too deeply to be a record.") from None
            yield where, record


@dataclass
class _ImagePolicy:
    """Where image paths of a data source may point: inside ``base_dir`` (None: records from Python, anywhere)."""

    base_dir: Path | None
    allow_absolute: bool


def _example(record: Any, where: str, images: _ImagePolicy, require_answer: bool) -> ChatExample:
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
    if ends_with_answer and not messages[-1]["content"].strip():
        raise DataError(f"{where}: the answer is empty or only whitespace; a task example needs an answer to learn.")
    return ChatExample(messages, _checked_images(record, where, images))


def _checked_messages(messages: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects.")
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES or "content" not in message:
            raise DataError(f"{where}: message {i} must have a 'role' in {ROLES} and a 'content'; got {message!r}.")
        if not isinstance(message["content"], str):
            raise DataError(f"{where}: the content of message {i} must be text, got {message['content']!r} "
                            "(pictures go in the record's 'image'/'images').")
        checked.append({"role": message["role"], "content": message["content"]})
    return checked


def _text(record: dict, key: str, where: str) -> str:
    value = record.get(key)
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: '{key}' must be a non-empty string, got {value!r}.")
    return value


def _checked_images(record: dict, where: str, policy: _ImagePolicy) -> list[Any]:
    images = record.get("images", [record["image"]] if record.get("image") is not None else [])
    if not isinstance(images, list):
        images = [images]
    checked = []
    for image in images:
        if isinstance(image, (str, os.PathLike)):
            path = _image_path(Path(image), where, policy)
            _verify_image(path, where)
            checked.append(path)
        elif hasattr(image, "convert"):  # a PIL image
            checked.append(image)
        else:
            raise DataError(f"{where}: an image must be a file path or a PIL image, got {type(image).__name__}.")
    return checked


def _image_path(path: Path, where: str, policy: _ImagePolicy) -> Path:
    if policy.base_dir is None:
        return path
    if path.is_absolute():
        if not policy.allow_absolute:
            raise DataError(f"{where}: image {path} is an absolute path; data files name images relative to their "
                            "folder. Pass allow_absolute_paths=True (--allow-absolute-paths) if you mean it.")
        return path
    resolved = (policy.base_dir / path).resolve()
    if not resolved.is_relative_to(policy.base_dir.resolve()) and not policy.allow_absolute:
        raise DataError(f"{where}: image {path} leads outside the data file's folder {policy.base_dir}; keep images "
                        "beside the data (or pass allow_absolute_paths=True).")
    return policy.base_dir / path


def _verify_image(path: Path, where: str) -> None:
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise FileNotFoundError(f"{where}: image {path} does not exist.")
    try:
        with Image.open(path) as opened:
            opened.verify()  # the file's structure (checksums) ...
        with Image.open(path) as opened:
            opened.load()  # ... and its pixels decode, so that training never meets a broken picture
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise DataError(f"{where}: image {path} is not a readable picture ({type(error).__name__}: {error}).") from None


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
