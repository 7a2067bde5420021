"""Expert folders on disk: the standard PEFT adapter layout, written atomically and read with checks.

An expert folder is ``adapter_config.json`` + ``adapter_model.safetensors`` whose keys are PEFT's
(``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight``) plus ``base_model.model.<module>.lora_route``.
A plain-LoRA export has a stock ``LoraConfig`` and no route keys; its routing vectors and routing settings go into
the side file ``routing_vectors.safetensors`` that :func:`read_expert_folder` picks up again. An expert with a task
prototype also holds ``prototype.safetensors`` (``tuner.prototype``), in both layouts.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig
from safetensors import safe_open
from safetensors.torch import save_file

from ..io.atomic import staged_path
from ..io.safe_files import MAX_CONFIG_BYTES, confined_file, read_json_object
from .config import RoutingLoraConfig
from .config_policy import ExpertConfigError, neutralise_loaded_fields
from .expert_tensors import ROUTE_SUFFIX
from .expert_weights import WEIGHTS_FILE, check_weights, pickle_allowed, read_safetensors, read_weights
from .prototype import PROTOTYPE_FILE, read_prototype_vector, write_prototype

CONFIG_FILE = "adapter_config.json"
ROUTES_FILE = "routing_vectors.safetensors"
# every file an expert folder may hold; nothing else is read or copied
EXPERT_FILES = (CONFIG_FILE, WEIGHTS_FILE, ROUTES_FILE, PROTOTYPE_FILE)

_LORA_FIELDS = {f.name for f in dataclasses.fields(LoraConfig) if f.init}
ROUTING_ONLY_FIELDS = [f.name for f in dataclasses.fields(RoutingLoraConfig) if f.init and f.name not in _LORA_FIELDS]


@dataclass
class ExpertFiles:
    """What an expert folder holds, read into memory and not yet checked against any model."""

    config: RoutingLoraConfig
    tensors: dict[str, torch.Tensor]
    source: str


def to_plain_lora_config(config: RoutingLoraConfig) -> LoraConfig:
    """The same expert described as a stock ``LoraConfig`` (loads in PEFT without this package).

    Args:
        config: the routed expert's config.
    """
    values = {name: getattr(config, name) for name in _LORA_FIELDS if name not in ("peft_type", "task_type")}
    return LoraConfig(task_type=config.task_type, **values)


def _routing_metadata(config: RoutingLoraConfig) -> dict[str, str]:
    return {"routing_fields": json.dumps({name: getattr(config, name) for name in ROUTING_ONLY_FIELDS})}


def write_expert_folder(
    directory: str | os.PathLike,
    config: RoutingLoraConfig,
    tensors: dict[str, torch.Tensor],
    as_plain_lora: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write an expert folder atomically: it appears complete, or not at all.

    An existing non-empty ``directory`` is replaced only with ``overwrite=True``, and then only after the new folder
    is complete, so an interruption never leaves a half-written expert or loses the old one.

    Args:
        directory: the folder to write.
        config: the expert's config (``adapter_config.json``).
        tensors: the expert's tensors under PEFT's checkpoint keys.
        as_plain_lora: write a stock ``LoraConfig`` folder, the routing vectors in a side file.
        overwrite: replace an existing non-empty folder.
    """
    target = Path(directory)
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a folder; choose another path for the expert.")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise FileExistsError(f"{target} already exists and is not empty; pass overwrite=True to replace it.")
    with staged_path(target, folder=True) as staging:
        _write_files(staging, config, tensors, as_plain_lora)
    return target


def _write_files(folder: Path, config: RoutingLoraConfig, tensors: dict[str, torch.Tensor], plain: bool) -> None:
    # clone: in the route phase the parameters are views into one stacked tensor, which safetensors refuses
    contiguous = {k: v.detach().to("cpu").clone(memory_format=torch.contiguous_format) for k, v in tensors.items()}
    routes = {k: v for k, v in contiguous.items() if k.endswith(ROUTE_SUFFIX)}
    if plain:
        to_plain_lora_config(config).save_pretrained(str(folder))
        save_file({k: v for k, v in contiguous.items() if k not in routes}, folder / WEIGHTS_FILE, {"format": "pt"})
        save_file(routes, folder / ROUTES_FILE, _routing_metadata(config))
    else:
        config.save_pretrained(str(folder))
        save_file(contiguous, folder / WEIGHTS_FILE, {"format": "pt"})
    if config.prototype is not None:
        write_prototype(folder, config.prototype_vector)


def read_expert_folder(folder: str | os.PathLike, *, allow_pickle: bool = False) -> ExpertFiles:
    """Read and check an expert folder (ours or a plain PEFT LoRA one) without any model.

    Every check that needs no model runs here (``config_policy`` on the config, ``expert_tensors`` on the
    weights); files are read through ``io.safe_files`` (no symlinks, sizes capped).

    Args:
        folder: a local expert folder.
        allow_pickle: also read ``adapter_model.bin`` (torch's restricted ``weights_only`` unpickler) when the
            folder has no safetensors file. Off by default: a pickle from a stranger is code.
    """
    path = Path(folder)
    if not os.path.lexists(path / CONFIG_FILE):
        raise FileNotFoundError(f"{path} is not an expert folder: it has no {CONFIG_FILE}.")
    raw = read_json_object(confined_file(path, CONFIG_FILE, MAX_CONFIG_BYTES))
    peft_type = raw.get("peft_type")
    if peft_type == "ROUTING_LORA":
        with pickle_allowed(allow_pickle):
            config = RoutingLoraConfig.from_pretrained(str(path))  # reads and checks the weights too
        tensors, config.checked_tensors = config.checked_tensors, None
        return ExpertFiles(config=config, tensors=tensors, source=str(path))
    if peft_type != "LORA":
        raise ExpertConfigError(f"{path}/{CONFIG_FILE} has peft_type {peft_type!r}; expected 'ROUTING_LORA' or "
                                "'LORA'.")
    tensors = read_weights(path, allow_pickle)
    config, routes = _read_plain_lora(path, raw)
    tensors.update(routes)
    check_weights(tensors, config.module_shapes, str(path))
    return ExpertFiles(config=config, tensors=tensors, source=str(path))


def _read_plain_lora(path: Path, raw: dict) -> tuple[RoutingLoraConfig, dict[str, torch.Tensor]]:
    """A stock LoRA folder as a routing expert; its side file, if any, restores vectors and routing fields."""
    where = f"{path}/{CONFIG_FILE}"
    values = neutralise_loaded_fields(raw, where, _LORA_FIELDS)
    values.pop("peft_type", None)
    routes: dict[str, torch.Tensor] = {}
    if os.path.lexists(path / ROUTES_FILE):
        side_file = confined_file(path, ROUTES_FILE)
        routes = read_safetensors(side_file)
        with safe_open(str(side_file), framework="pt") as handle:
            metadata = handle.metadata() or {}
        try:
            routing = json.loads(metadata.get("routing_fields", "{}"))
        except (json.JSONDecodeError, RecursionError):
            raise ExpertConfigError(f"{side_file}: its routing_fields metadata is not valid JSON.") from None
        if not isinstance(routing, dict) or not set(routing) <= set(ROUTING_ONLY_FIELDS):
            raise ExpertConfigError(f"{side_file}: its routing_fields metadata may only hold routing fields "
                                    f"({ROUTING_ONLY_FIELDS}).")
        values.update(routing)
    try:
        config = RoutingLoraConfig(**values)
    except (ValueError, TypeError) as error:
        raise ExpertConfigError(f"{where}: {error}") from None
    if config.prototype is not None:
        config.prototype_vector = read_prototype_vector(path)
    return config, routes
