"""Reading files that came from someone else: names confined to their folder, symlinks never followed, sizes capped.

An expert folder from the Hub or a colleague is hostile until checked. Every file an expert needs is opened through
``confined_file``; the one exception to "no symlinks" is a Hugging Face cache, whose snapshot files are links into
the same repo's ``blobs/`` (huggingface_hub's own layout), and only links that stay inside that repo's folder.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path, PurePosixPath
from typing import Any

MAX_CONFIG_BYTES = 1 << 20  # an adapter_config.json is a few KiB
MAX_JSON_DEPTH = 32


class UnsafeFileError(ValueError):
    """A file or folder name that escapes its folder, a symlink, a file too large or not a plain file."""


def max_weights_bytes() -> int:
    """Largest weights file read (``PEFT_ROUTING_MAX_EXPERT_BYTES``, default 4 GiB: a rank-64 expert of a 70B
    model is about 1.6 GiB)."""
    return int(os.environ.get("PEFT_ROUTING_MAX_EXPERT_BYTES", 4 << 30))


def checked_relative(name: str | os.PathLike | None, what: str) -> str | None:
    """``name`` if it is a relative path that stays inside its folder (no ``..``, not absolute); else raise.

    Args:
        name: a subfolder or file name from a user or a config (None passes).
        what: what it is, for the message (``"subfolder"``).
    """
    if name is None or str(name) in ("", "."):
        return None
    text = str(name)
    parts = PurePosixPath(text.replace("\\", "/")).parts
    if text.startswith(("/", "\\")) or Path(text).is_absolute() or ".." in parts or ":" in parts[0]:
        raise UnsafeFileError(f"{what} {text!r} must be a relative path inside the folder (no '..', not absolute).")
    return "/".join(p for p in parts if p != ".")


def hub_cache_repo(folder: Path) -> Path | None:
    """The ``models--org--name`` folder of a Hugging Face cache whose ``snapshots/`` hold ``folder``, or None."""
    folder = Path(os.path.abspath(folder))
    for parent in folder.parents:
        if parent.name.startswith("models--") and folder.is_relative_to(parent / "snapshots"):
            return parent.resolve()
    return None


def confined_file(folder: str | os.PathLike, name: str, max_bytes: int | None = None) -> Path:
    """``folder/name`` if it is a plain file inside ``folder``, not a symlink (but see the module docstring), and
    at most ``max_bytes`` long; raise ``UnsafeFileError`` (or FileNotFoundError) naming it otherwise.

    Args:
        folder: the folder the file must be in.
        name: a plain file name (no folders).
        max_bytes: size limit (default: ``max_weights_bytes()``).
    """
    if Path(name).name != name or name in ("", ".", ".."):
        raise UnsafeFileError(f"{name!r} is not a plain file name.")
    path = Path(folder) / name
    try:
        info = path.lstat()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist.") from None
    if stat.S_ISLNK(info.st_mode):
        repo = hub_cache_repo(Path(folder))
        target = path.resolve()
        if repo is None or not target.is_relative_to(repo):
            raise UnsafeFileError(f"{path} is a symlink; expert files must be plain files (symlinks are never "
                                  "followed). Copy the real file into the folder.")
        info = target.stat()
    if not stat.S_ISREG(info.st_mode):
        raise UnsafeFileError(f"{path} is not a plain file.")
    limit = max_weights_bytes() if max_bytes is None else max_bytes
    if info.st_size > limit:
        raise UnsafeFileError(f"{path} is {info.st_size} bytes, more than the limit of {limit}; an expert's files "
                              "are small. Raise PEFT_ROUTING_MAX_EXPERT_BYTES if it is genuine.")
    return path


def read_json_object(path: str | os.PathLike, max_bytes: int = MAX_CONFIG_BYTES) -> dict[str, Any]:
    """A JSON object from a (confined) file, with an error naming the file for anything malformed.

    Args:
        path: the JSON file.
        max_bytes: size limit.
    """
    path = Path(path)
    checked = confined_file(path.parent, path.name, max_bytes)
    try:
        text = checked.read_bytes().decode("utf-8")
        data = json.loads(text)
        depth = _depth(data)
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text (byte {error.start}); it is not a valid JSON file.") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error.msg}, line {error.lineno}).") from None
    except RecursionError:
        raise ValueError(f"{path} nests too deeply to be a config file.") from None
    if depth > MAX_JSON_DEPTH:
        raise ValueError(f"{path} nests {depth} levels deep; a config file needs a few.")
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, not {type(data).__name__}.")
    return data


def _depth(value: Any, level: int = 0) -> int:
    if level > MAX_JSON_DEPTH:
        return level
    if isinstance(value, dict):
        return max((_depth(v, level + 1) for v in value.values()), default=level + 1)
    if isinstance(value, list):
        return max((_depth(v, level + 1) for v in value), default=level + 1)
    return level


def copy_plain_file(source: Path, target: Path) -> None:
    """Copy the bytes of a checked file (``confined_file``) to ``target``, never a link itself."""
    with open(source, "rb") as reader, open(target, "xb") as writer:
        shutil.copyfileobj(reader, writer)
