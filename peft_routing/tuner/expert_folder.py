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
from safetensors.torch import load_file, save_file

from ..io.atomic import staged_path
from .config import RoutingLoraConfig
from .prototype import read_prototype_vector, write_prototype

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
ROUTES_FILE = "routing_vectors.safetensors"
KEY_PREFIX = "base_model.model."
ROUTE_SUFFIX = ".lora_route"
LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight")

_LORA_FIELDS = {f.name for f in dataclasses.fields(LoraConfig) if f.init}
ROUTING_ONLY_FIELDS = [f.name for f in dataclasses.fields(RoutingLoraConfig) if f.init and f.name not in _LORA_FIELDS]


@dataclass
class ExpertFiles:
    """What an expert folder holds, read into memory and not yet checked against any model."""

    config: RoutingLoraConfig
    tensors: dict[str, torch.Tensor]
    source: str


def split_key(key: str) -> tuple[str, str]:
    """``base_model.model.<module>.<kind>`` -> (module path, kind in {lora_A, lora_B, lora_route}).

    Args:
        key: a tensor name of an expert's safetensors file.
    """
    body = key.removeprefix(KEY_PREFIX)
    if body.endswith(ROUTE_SUFFIX):
        return body[: -len(ROUTE_SUFFIX)], "lora_route"
    for suffix in LORA_SUFFIXES:
        if body.endswith(suffix):
            return body[: -len(suffix)], suffix.split(".")[1]
    raise ValueError(f"unexpected tensor {key!r}")


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


def read_expert_folder(folder: str | os.PathLike) -> ExpertFiles:
    """Read an expert folder (ours or a plain PEFT LoRA one), refusing pickled weights.

    Args:
        folder: a local expert folder.
    """
    path = Path(folder)
    if not (path / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{path} is not an expert folder: it has no {CONFIG_FILE}.")
    if not (path / WEIGHTS_FILE).is_file():
        if (path / "adapter_model.bin").is_file():
            raise ValueError(
                f"{path} holds adapter_model.bin (a pickle file, which can run code when loaded); peft-routing only "
                "reads adapter_model.safetensors. Convert it with safetensors, or re-save it with PEFT."
            )
        raise FileNotFoundError(f"{path} has no {WEIGHTS_FILE}.")
    peft_type = json.loads((path / CONFIG_FILE).read_text()).get("peft_type")
    tensors = load_file(path / WEIGHTS_FILE)
    if peft_type == "ROUTING_LORA":
        config = RoutingLoraConfig.from_pretrained(str(path))
    elif peft_type == "LORA":
        config, routes = _read_plain_lora(path)
        tensors.update(routes)
    else:
        raise ValueError(f"{path}/{CONFIG_FILE} has peft_type {peft_type!r}; expected 'ROUTING_LORA' or 'LORA'.")
    return ExpertFiles(config=config, tensors=tensors, source=str(path))


def _read_plain_lora(path: Path) -> tuple[RoutingLoraConfig, dict[str, torch.Tensor]]:
    """A stock LoRA folder as a routing expert; its side file, if any, restores vectors and routing fields."""
    lora = LoraConfig.from_pretrained(str(path))
    values = {name: getattr(lora, name) for name in _LORA_FIELDS if name not in ("peft_type",)}
    routes: dict[str, torch.Tensor] = {}
    side_file = path / ROUTES_FILE
    if side_file.is_file():
        with safe_open(str(side_file), framework="pt") as handle:
            metadata = handle.metadata() or {}
        routes = load_file(side_file)
        values.update(json.loads(metadata.get("routing_fields", "{}")))
    config = RoutingLoraConfig(**values)
    if config.prototype is not None:
        config.prototype_vector = read_prototype_vector(path)
    return config, routes
