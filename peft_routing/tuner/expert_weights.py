"""Reading an expert's weights file, checked: safetensors only unless pickle is allowed, errors that name the file.

``RoutingLoraConfig.from_pretrained`` reads the weights beside the config through ``fetch_checked_tensors``, so
``PeftModel.from_pretrained`` and ``load_adapter`` refuse a bad folder before PEFT injects anything.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..io.hub import fetch_file, resolve_expert_folder
from ..io.safe_files import confined_file
from .expert_tensors import check_against_saved_shapes, group_expert_tensors

WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"
ALLOW_PICKLE_ENV = "PEFT_ROUTING_ALLOW_PICKLE"
_ALLOW_PICKLE: ContextVar[bool] = ContextVar("allow_pickle", default=False)


def check_weights(tensors: dict[str, torch.Tensor], module_shapes: dict | None, where: str) -> None:
    """Every model-free check of an expert's tensors (``expert_tensors``)."""
    check_against_saved_shapes(group_expert_tensors(tensors, where), module_shapes, where)


@contextmanager
def pickle_allowed(allowed: bool) -> Iterator[None]:
    """Inside the block (this thread only), expert loaders read ``adapter_model.bin`` when ``allowed``."""
    token = _ALLOW_PICKLE.set(allowed or _ALLOW_PICKLE.get())
    try:
        yield
    finally:
        _ALLOW_PICKLE.reset(token)


def fetch_checked_tensors(path_or_repo_id: str | os.PathLike, subfolder: str | None, module_shapes: dict | None,
                          **hub_kwargs) -> tuple[str, dict[str, torch.Tensor]]:
    """(the folder, its checked weights) of the expert whose config was just read from ``path_or_repo_id``.

    ``RoutingLoraConfig.from_pretrained`` calls this, so ``PeftModel.from_pretrained`` and ``load_adapter`` check
    the weights (names, dtypes, finiteness, shapes) before PEFT injects anything; the tuner then checks them
    against the model. ``PEFT_ROUTING_ALLOW_PICKLE=1`` lets a folder without safetensors load its pickle.

    Args:
        path_or_repo_id: the local folder or Hub repo id the config came from.
        subfolder: the expert's folder inside it.
        module_shapes: the config's recorded shapes (``expert_tensors.check_against_saved_shapes``).
        **hub_kwargs: ``revision``, ``token`` ... for ``huggingface_hub.hf_hub_download``.
    """
    allow_pickle = _ALLOW_PICKLE.get() or os.environ.get(ALLOW_PICKLE_ENV) == "1"
    if Path(path_or_repo_id).is_dir():
        folder = resolve_expert_folder(path_or_repo_id, subfolder=subfolder)
    else:
        try:
            folder = fetch_file(path_or_repo_id, WEIGHTS_FILE, subfolder=subfolder, **hub_kwargs).parent
        except FileNotFoundError:
            if not allow_pickle:
                raise
            folder = fetch_file(path_or_repo_id, PICKLE_FILE, subfolder=subfolder, **hub_kwargs).parent
    tensors = read_weights(folder, allow_pickle)
    check_weights(tensors, module_shapes, str(folder))
    return str(folder), tensors


def read_weights(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    """The expert weights of a folder: its safetensors file, or its pickle only when ``allow_pickle``."""
    if os.path.lexists(path / WEIGHTS_FILE) or not (path / PICKLE_FILE).exists():
        return read_safetensors(confined_file(path, WEIGHTS_FILE))
    if not allow_pickle:
        raise ValueError(
            f"{path} holds {PICKLE_FILE} (a pickle file, which can run code when loaded); peft-routing only "
            "reads adapter_model.safetensors. Convert it with safetensors, or re-save it with PEFT; if you trust "
            "its author, pass allow_pickle=True (PEFT_ROUTING_ALLOW_PICKLE=1 for PeftModel.from_pretrained)."
        )
    try:  # weights_only: torch's restricted unpickler, which refuses anything but tensors and containers
        pickled = torch.load(confined_file(path, PICKLE_FILE), map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - the unpickler raises many types; all mean "not plain weights"
        raise ValueError(f"{path}/{PICKLE_FILE} is not a plain pickle of tensors ({type(error).__name__}: "
                         f"{str(error)[:200]}); it was not loaded.") from None
    if not isinstance(pickled, dict) or not all(isinstance(v, torch.Tensor) for v in pickled.values()):
        raise ValueError(f"{path}/{PICKLE_FILE} does not hold a dict of tensors.")
    return pickled


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors, with an error that names the file when it is not one.

    Args:
        path: a checked file (``io.safe_files.confined_file``).
    """
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise ValueError(f"{path} is not a readable safetensors file ({type(error).__name__}: {error}). Re-save "
                         "the expert, or download it again.") from None
