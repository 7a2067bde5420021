"""A library directory: the experts of one base model, each a standard adapter folder, plus a small index.

    my_library/
      library.json            {"format": "peft-routing-library", "base_model": ..., "experts": [{"name", "training"}]}
      experts/<name>/         adapter_config.json + adapter_model.safetensors (what save_expert writes)

Experts are written to a staging folder inside the library and renamed into place only when complete, and the
index is replaced atomically, so an interrupted ``learn`` never leaves a half-written expert behind.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..io.atomic import staged_path, write_json_atomic
from ..tuner.expert_folder import read_expert_folder
from ..tuner.names import check_expert_name

INDEX_FILE = "library.json"
FORMAT = "peft-routing-library"


class LibraryError(ValueError):
    """A library directory that is missing, malformed, or asked for something it cannot do."""


@dataclass
class ExpertLibrary:
    root: Path
    base_model: str
    entries: list[dict[str, Any]]

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
        try:
            data = json.loads(index.read_text())
        except json.JSONDecodeError as error:
            raise LibraryError(f"{index} is not valid JSON ({error.msg}); the library index is damaged.") from None
        if data.get("format") != FORMAT or not isinstance(data.get("experts"), list):
            raise LibraryError(f"{index} is not a peft-routing library index (format {data.get('format')!r}).")
        return cls(root, data["base_model"], data["experts"])

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
        if name not in self.names:
            raise LibraryError(f"No expert {name!r} in the library at {self.root}; it has {self.names}.")
        return self.root / "experts" / name

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
        """Copy an expert folder (e.g. downloaded from the Hub) into the library after checking it reads.

        Args:
            folder: the expert folder.
            name: its name in the library (default: the name it was saved under, else the folder's name).
        """
        files = read_expert_folder(Path(folder))
        name = name or files.config.expert_name or Path(folder).name
        self.check_new_name(name)
        self._install(name, lambda staging: shutil.copytree(folder, staging), None)
        return name

    def remove(self, name: str) -> None:
        """Remove an expert from the index, then delete its folder.

        Args:
            name: the expert.
        """
        folder = self.expert_dir(name)
        self.entries = [entry for entry in self.entries if entry["name"] != name]
        self._write_index()
        shutil.rmtree(folder)

    def _install(self, name: str, write, training: dict[str, Any] | None) -> Path:
        target = self.root / "experts" / name
        if target.exists():
            raise LibraryError(f"{target} exists but is not in the library index; move it away first.")
        with staged_path(target, folder=True) as staging:
            write(staging)
        self.entries.append({"name": name, "training": training or {}})
        self._write_index()
        return target

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
        model = PeftModel.from_pretrained(base, self.expert_dir(first), adapter_name=first)
        for name in rest:
            model.add_expert(self.expert_dir(name), adapter_name=name)
        model.set_phase("route")
        return model.eval()

