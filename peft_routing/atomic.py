"""All-or-nothing writes: write beside the target under a temporary name, then rename into place.

``tempfile`` creates files 0600 and folders 0700; ``with_default_mode`` gives them the permissions a plain
``open``/``mkdir`` would have had under the user's umask, so results and experts stay readable by the team.
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


def with_default_mode(path: Path) -> Path:
    """chmod ``path`` to 0666 (files) or 0777 (folders) minus the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)
    return path


@contextmanager
def atomic_file(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``, on failure deleted."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=suffix)
    os.close(descriptor)
    try:
        yield Path(temporary)
        os.replace(with_default_mode(Path(temporary)), target)
    finally:
        Path(temporary).unlink(missing_ok=True)


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Write JSON so that readers never see half a file."""
    with atomic_file(path) as temporary:
        temporary.write_text(json.dumps(data, indent=2) + "\n")
