"""All-or-nothing writes: everything is written under a temporary name beside the target, flushed to disk, then
renamed into place, so a reader (or a process killed half-way) only ever sees the old or the new version.

``staged_path`` is the one writer every module uses, for files and folders alike. A folder replaces an existing one
by an atomic exchange (Linux ``renameat2(RENAME_EXCHANGE)``), so the target is never missing; where the system
cannot exchange, the old folder is moved to ``.<name>.old`` first and ``recover_replaced`` puts it back after an
interruption (every later write of the target, and ``ExpertLibrary.repair``, call it).
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def staged_path(target: str | os.PathLike, *, folder: bool = False, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success what was written there replaces ``target``.

    For a file the path exists (empty); for a folder it does not yet, so that any folder writer (``save_pretrained``,
    ``shutil.copytree``) can create it. On success the staged files are fsynced, the staged path is renamed onto
    ``target`` and the parent folder is fsynced, so the rename survives a power cut. An existing folder ``target``
    is moved aside first and deleted only after the new one is in place. On failure the staged path is removed and
    ``target`` is untouched.

    Args:
        target: the file or folder to create or replace; its parent folders are created.
        folder: stage a folder instead of a file.
        suffix: suffix of the staged file's name (some writers pick the format from it, e.g. ``.png``).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_replaced(target)
    prefix = f".{target.name}.tmp-"
    if folder:  # a private holder folder keeps the not-yet-created staged folder's name free for the writer
        holder = Path(tempfile.mkdtemp(dir=target.parent, prefix=prefix))
        staged = holder / target.name
    else:
        descriptor, name = tempfile.mkstemp(dir=target.parent, prefix=prefix, suffix=suffix)
        os.close(descriptor)
        holder = staged = Path(name)
    try:
        yield staged
        if not staged.exists():
            raise FileNotFoundError(f"Nothing was written to {staged}, so {target} was left as it was.")
        _fsync_tree(staged)
        _replace(with_default_mode(staged), target)
        _fsync(target.parent)
    finally:
        if holder.is_dir():
            shutil.rmtree(holder, ignore_errors=True)
        else:
            holder.unlink(missing_ok=True)


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as indented JSON so that readers never see half a file.

    Args:
        path: the JSON file to create or replace.
        data: anything ``json.dumps`` accepts.
    """
    with staged_path(path) as staged:
        staged.write_text(json.dumps(data, indent=2) + "\n")


def with_default_mode(path: Path) -> Path:
    """chmod ``path`` to what a plain ``open``/``mkdir`` would give under the user's umask.

    ``tempfile`` creates files 0600 and folders 0700; results and experts should stay readable by the team.

    Args:
        path: a file or folder.
    """
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)
    return path


def backup_path(target: Path) -> Path:
    """Where a replaced folder waits while the new one is renamed in (only where folders cannot be exchanged)."""
    return target.with_name(f".{target.name}.old")


def recover_replaced(target: str | os.PathLike) -> bool:
    """Finish an interrupted replacement of folder ``target``: put the old copy back if the new one never arrived,
    delete it if it did. True if anything was done.

    Args:
        target: the folder that was being replaced.
    """
    target = Path(target)
    backup = backup_path(target)
    if not backup.is_dir() or backup.is_symlink():
        return False
    if target.exists():
        shutil.rmtree(backup, ignore_errors=True)
    else:
        os.replace(backup, target)
        _fsync(target.parent)
    return True


def _replace(staged: Path, target: Path) -> None:
    if not (staged.is_dir() and target.is_dir()):
        os.replace(staged, target)
        return
    if _exchange(staged, target):  # staged now holds the old folder, which the caller's cleanup deletes
        return
    backup = backup_path(target)
    shutil.rmtree(backup, ignore_errors=True)
    os.replace(target, backup)
    try:
        os.replace(staged, target)
    except BaseException:
        os.replace(backup, target)
        raise
    _fsync(target.parent)
    shutil.rmtree(backup, ignore_errors=True)


_RENAME_EXCHANGE, _AT_FDCWD = 2, -100


def _exchange(first: Path, second: Path) -> bool:
    """Swap two paths atomically (Linux renameat2); False where the system or file system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(code, os.strerror(code), str(second))


def _fsync_tree(path: Path) -> None:
    if path.is_dir():
        for child in path.rglob("*"):
            if child.is_file() and not child.is_symlink():
                _fsync(child)
    _fsync(path)


def fsync_directory(path: str | os.PathLike) -> None:
    """Make the renames inside folder ``path`` durable (a rename is only on disk once its folder is fsynced).

    Args:
        path: a folder.
    """
    _fsync(Path(path))


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
