"""A library directory: the experts of one base model, each a standard adapter folder, plus a small index.

    my_library/
      library.json            {"format": "peft-routing-library", "base_model": ..., "experts": [{"name", "training"}]}
      experts/<name>/         adapter_config.json + adapter_model.safetensors (what save_expert writes)

Experts are written to a staging folder inside the library and renamed into place only when complete, and the
index is replaced atomically, so an interrupted ``learn`` never leaves a half-written expert behind. Every change
holds a lock file (so two processes cannot lose each other's update) and re-reads the index under it. What an
interruption can leave (staging folders, an expert folder the index does not list yet, a removal half done) is
finished by ``repair``, which every change runs first and ``peft-routing repair`` runs on request.

The index is read like any file from elsewhere: names are checked (they become folder names) and every path is
resolved inside ``experts/``, never through a symlink.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..io.atomic import fsync_directory, recover_replaced, staged_path, write_json_atomic
from ..io.safe_files import confined_file, copy_plain_file, read_json_object
from ..tuner.expert_folder import EXPERT_FILES, read_expert_folder
from ..tuner.expert_tensors import group_expert_tensors
from ..tuner.names import check_expert_name

INDEX_FILE = "library.json"
LOCK_FILE = ".lock"
FORMAT = "peft-routing-library"
TRASH_PREFIX = ".removing-"
LOST_AND_FOUND = "lost+found"


class LibraryError(ValueError):
    """A library directory that is missing, malformed, or asked for something it cannot do."""


@dataclass
class ExpertLibrary:
    root: Path
    base_model: str
    entries: list[dict[str, Any]]
    repaired: list[str] = field(default_factory=list)  # what open() found interrupted and finished
    _lock_depth: int = field(default=0, init=False, repr=False)  # re-entrant holds of the lock file

    # ---------------------------------------------------------------------------------------------- open / create
    @classmethod
    def create(cls, root: str | os.PathLike, base_model: str) -> ExpertLibrary:
        """A new, empty library; ``root`` must not exist or be an empty directory.

        Args:
            root: the library directory.
            base_model: what ``demo.base_models.load_base_model`` loads: ``"smollm2"``, a folder or a Hub id.
        """
        root = Path(root)
        if root.exists() and (not root.is_dir() or any(root.iterdir())):
            raise LibraryError(f"Cannot create a library at {root}: it exists and is not an empty directory.")
        (root / "experts").mkdir(parents=True, exist_ok=True)
        library = cls(root, base_model, [])
        library._write_index()
        return library

    @classmethod
    def open(cls, root: str | os.PathLike) -> ExpertLibrary:
        """The library at ``root``, its index checked.

        Args:
            root: the library directory.
        """
        root = Path(root)
        index = root / INDEX_FILE
        if not index.is_file():
            raise LibraryError(f"{root} is not an expert library (no {INDEX_FILE}). Create one with "
                               "`peft-routing learn --library DIR --base MODEL ...` on a new or empty directory.")
        base_model, entries = _read_index(index)
        library = cls(root, base_model, entries)
        if library._repair_needed():
            library.repair()
        return library

    @classmethod
    def open_or_create(cls, root: str | os.PathLike, base_model: str | None) -> ExpertLibrary:
        """The library at ``root``, created for ``base_model`` if there is none; an existing one must match it.

        Args:
            root: the library directory.
            base_model: the base model, or None to accept the existing library's.
        """
        root = Path(root)
        if (root / INDEX_FILE).exists():
            library = cls.open(root)
            if base_model is not None and base_model != library.base_model:
                raise LibraryError(f"The library at {root} is for base model {library.base_model!r}, "
                                   f"not {base_model!r}.")
            return library
        if base_model is None:
            raise LibraryError(f"{root} is not a library yet: pass the base model (--base) to create it.")
        return cls.create(root, base_model)

    # ---------------------------------------------------------------------------------------------------- queries
    @property
    def names(self) -> list[str]:
        return [entry["name"] for entry in self.entries]

    def expert_dir(self, name: str) -> Path:
        """The folder of expert ``name``: inside ``experts/``, a real folder (never a symlink).

        Args:
            name: an expert of the library.
        """
        if name not in self.names:
            raise LibraryError(f"No expert {name!r} in the library at {self.root}; it has {self.names}.")
        folder = self.root / "experts" / name
        if folder.is_symlink() or not folder.is_dir():
            raise LibraryError(f"{folder} is missing or is a symlink; run `peft-routing repair --library "
                               f"{self.root}`, or remove the expert with `peft-routing remove`.")
        return folder

    def check_new_name(self, name: str) -> None:
        """Fail early (before any training) for a name that is taken or unusable.

        Args:
            name: the new expert's name.
        """
        if name in self.names:
            raise LibraryError(f"The library at {self.root} already has an expert named {name!r}. "
                               "Choose another name, or remove the old one first.")
        check_expert_name(name, None, self.names)

    # -------------------------------------------------------------------------------------------------- changes
    def add_from_model(self, model, name: str, training: dict[str, Any] | None = None) -> Path:
        """Save expert ``name`` of ``model`` into the library (staged, then renamed into place).

        Args:
            model: the routed-LoRA PeftModel holding the expert.
            name: the expert.
            training: what trained it (kept in the index).
        """
        self.check_new_name(name)
        return self._install(name, lambda staging: model.save_expert(name, staging), training)


    def add_from_folder(self, folder: str | os.PathLike, name: str | None = None) -> str:
        """Copy an expert folder (e.g. downloaded from the Hub) into the library, after every check that needs no
        model (``read_expert_folder``); only the files an expert has are copied, never through a symlink.

        Args:
            folder: the expert folder.
            name: its name in the library (default: the name it was saved under, else the folder's name).
        """
        files = read_expert_folder(Path(folder))
        name = name or files.config.expert_name or Path(folder).name
        modules = group_expert_tensors(files.tensors, files.source)
        unrouted = sorted(path for path, found in modules.items() if "lora_route" not in found)
        if unrouted:
            raise LibraryError(f"Expert {folder} has no routing vectors for {len(unrouted)} of its {len(modules)} "
                               f"modules ({unrouted[:3]}), so it cannot route in a library. Load it with "
                               "model.add_expert(path, allow_missing_routes=True), train its vectors with "
                               "set_phase('router', name), and save it.")
        self.check_new_name(name)
        self._install(name, lambda staging: copy_expert_files(Path(folder), staging), None)
        return name

    def remove(self, name: str) -> None:
        """Remove an expert: its folder is moved aside, the index rewritten, then the folder deleted (an
        interruption at any point is finished by ``repair``: the expert is either still there or gone).

        Args:
            name: the expert.
        """
        with self._changing():
            if name not in self.names:
                raise LibraryError(f"No expert {name!r} in the library at {self.root}; it has {self.names}.")
            folder = self.root / "experts" / name
            trash = folder.with_name(f"{TRASH_PREFIX}{name}")
            if folder.is_dir() and not folder.is_symlink():
                os.replace(folder, trash)
                fsync_directory(trash.parent)  # durable before the index says it is gone
            elif folder.is_symlink():
                folder.unlink()
            self.entries = [entry for entry in self.entries if entry["name"] != name]
            self._write_index()
            shutil.rmtree(trash, ignore_errors=True)

    def repair(self) -> list[str]:
        """Finish what an interrupted change left; returns one line per thing done (empty: nothing to do).

        * staging folders and files (``.<name>.tmp-*``) are deleted: they are never a finished write;
        * a half-done overwrite is finished (``io.atomic.recover_replaced``);
        * a removal interrupted before its index write is undone, one interrupted after it is finished;
        * an expert folder the index does not list (an install interrupted before its index write) is added to the
          index if it reads as a valid expert, else moved to ``lost+found/``.
        """
        already = len(self.repaired)
        with self._changing():
            self.repaired.extend(self._repair())
        return self.repaired[already:]

    def _repair(self) -> list[str]:
        done: list[str] = []
        experts = self.root / "experts"
        for path in sorted(experts.iterdir()) + sorted(self.root.iterdir()):
            if path.name.startswith(".") and ".tmp-" in path.name:
                _delete(path)
                done.append(f"deleted the staging leftover {path.name}")
        for name in self.names:
            if recover_replaced(experts / name):
                done.append(f"finished an interrupted overwrite of {name!r}")
            trash = experts / f"{TRASH_PREFIX}{name}"
            if trash.is_dir() and not (experts / name).exists():
                os.replace(trash, experts / name)
                fsync_directory(experts)
                done.append(f"undid an interrupted removal of {name!r} (the index still listed it)")
        for path in sorted(experts.iterdir()):
            if path.name.startswith(TRASH_PREFIX):
                _delete(path)
                done.append(f"finished the removal of {path.name.removeprefix(TRASH_PREFIX)!r}")
            elif not path.name.startswith(".") and path.name not in self.names:
                done.append(self._adopt_or_set_aside(path))
        if done:
            self._write_index()
        return done

    def _adopt_or_set_aside(self, path: Path) -> str:
        try:
            if path.is_symlink() or not path.is_dir():
                raise LibraryError("not a folder")
            check_expert_name(path.name, None, self.names)
            read_expert_folder(path)
        except (ValueError, OSError) as error:
            lost = self.root / LOST_AND_FOUND
            lost.mkdir(exist_ok=True)
            target = lost / f"{path.name}-{time.strftime('%Y%m%d-%H%M%S')}"
            os.replace(path, target)
            fsync_directory(path.parent)
            fsync_directory(lost)
            return f"moved {path.name!r} to {target}: the index does not list it and it is not a valid expert ({error})"
        self.entries.append({"name": path.name, "training": {"recovered": "its install was interrupted before the "
                                                                          "index was written"}})
        return f"added {path.name!r} to the index (a complete expert whose install was interrupted)"

    def _install(self, name: str, write, training: dict[str, Any] | None) -> Path:
        target = self.root / "experts" / name
        with self._changing():
            self.check_new_name(name)
            if os.path.lexists(target):
                raise LibraryError(f"{target} exists but is not in the library index; run `peft-routing repair "
                                   f"--library {self.root}` first.")
            with staged_path(target, folder=True) as staging:
                write(staging)
            self.entries.append({"name": name, "training": training or {}})
            self._write_index()
        return target

    @contextmanager
    def _changing(self) -> Iterator[None]:
        """Hold the library's lock file (other processes wait) and work on the index as it is on disk now."""
        if self._lock_depth:
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1
            return
        with open(self.root / LOCK_FILE, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._lock_depth = 1
            try:
                self.base_model, self.entries = _read_index(self.root / INDEX_FILE)
                if self._repair_needed():
                    self.repaired.extend(self._repair())
                yield
            finally:
                self._lock_depth = 0
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _repair_needed(self) -> bool:
        experts = self.root / "experts"
        listed = set(self.names)
        return any(p.name.startswith(".") or p.name not in listed for p in experts.iterdir()) or any(
            ".tmp-" in p.name for p in self.root.iterdir())

    def _write_index(self) -> None:
        data = {"format": FORMAT, "base_model": self.base_model, "experts": self.entries}
        write_json_atomic(self.root / INDEX_FILE, data)

    # ------------------------------------------------------------------------------------------------------ model
    def load_model(self, base):
        """``base`` with every expert of the library, in the route phase.

        Args:
            base: the base model the library is for.
        """
        from peft import PeftModel

        if not self.names:
            raise LibraryError(f"The library at {self.root} has no experts yet; learn a task first.")
        first, *rest = self.names
        read_expert_folder(self.expert_dir(first))  # our checks and messages, before PEFT reads the folder
        model = PeftModel.from_pretrained(base, self.expert_dir(first), adapter_name=first)
        for name in rest:
            model.add_expert(self.expert_dir(name), adapter_name=name)
        model.set_phase("route")
        return model.eval()



def _read_index(index: Path) -> tuple[str, list[dict[str, Any]]]:
    """(base model, entries) of a library index, every entry checked: its name becomes a folder name."""
    try:
        data = read_json_object(index)
    except ValueError as error:
        raise LibraryError(f"The library index is damaged: {error}") from None
    if data.get("format") != FORMAT or not isinstance(data.get("experts"), list):
        raise LibraryError(f"{index} is not a peft-routing library index (format {data.get('format')!r}).")
    if not isinstance(data.get("base_model"), str):
        raise LibraryError(f"{index}: `base_model` must be text, got {data.get('base_model')!r}.")
    names: list[str] = []
    for number, entry in enumerate(data["experts"]):
        if not isinstance(entry, dict) or not isinstance(entry.get("training", {}), dict):
            raise LibraryError(f"{index}: expert entry {number} must be an object with a name and a training dict.")
        try:
            check_expert_name(entry.get("name"), None, names)
        except ValueError as error:
            raise LibraryError(f"{index}: expert entry {number}: {error} Fix or remove the entry.") from None
        names.append(entry["name"])
    return data["base_model"], [{"name": e["name"], "training": e.get("training", {})} for e in data["experts"]]


def copy_expert_files(source: Path, staging: Path) -> None:
    """Copy the files an expert folder holds (``EXPERT_FILES``), checked one by one; nothing else."""
    staging.mkdir()
    for name in EXPERT_FILES:
        if os.path.lexists(source / name):
            copy_plain_file(confined_file(source, name), staging / name)


def _delete(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
