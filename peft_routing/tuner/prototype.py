"""An expert's task prototype: what it is, how it travels in an expert folder, and its checks.

The vector lives in ``prototype.safetensors`` (key ``"prototype"``) beside the adapter files; what it was computed
from lives in the config's ``prototype`` field: ``{"layer": block whose input is pooled, "pooling": the prompt feature
(``"causal_mean"`` or ``"last"``, ``ops.prototypes``), "examples": prompts averaged, "floor": the lowest cosine of
the task's own examples}``. No training data is kept.
Everything read here comes from a file someone else may have written, so every field is checked before use.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..io.hub import fetch_file
from ..ops.prototypes import FEATURES

PROTOTYPE_FILE = "prototype.safetensors"
PROTOTYPE_KEY = "prototype"
POOLINGS = tuple(FEATURES)  # the prompt features ops.prototypes can pool
REQUIRED_FIELDS = frozenset({"layer", "pooling", "examples", "floor"})


class PrototypeError(ValueError):
    """A prototype (its vector or its config fields) is malformed or does not fit the model."""


@dataclass
class Prototype:
    """A task prototype: a unit vector [d] in float32 and how it was computed (see the module docstring)."""

    vector: torch.Tensor
    layer: int
    floor: float
    examples: int
    pooling: str = "causal_mean"
    prompt_floor: float | None = None

    def fields(self) -> dict:
        """The config's ``prototype`` field for this prototype."""
        found = {"layer": self.layer, "pooling": self.pooling, "examples": self.examples, "floor": self.floor}
        return found if self.prompt_floor is None else found | {"prompt_floor": self.prompt_floor}

    def floor_for(self, pooling: str) -> float:
        """The base fallback's threshold for a router pooling ``"prefix"`` or ``"prompt"`` features."""
        return self.prompt_floor if pooling == "prompt" and self.prompt_floor is not None else self.floor


def prototype_from(fields: dict | None, vector: torch.Tensor | None, where: str) -> Prototype | None:
    """The checked prototype of a config's ``prototype`` field and its vector (None when the expert has none).

    Args:
        fields: the config's ``prototype`` field.
        vector: the tensor read from ``prototype.safetensors``.
        where: names the expert in errors.
    """
    if fields is None and vector is None:
        return None
    if fields is None or vector is None:
        missing = f"the {PROTOTYPE_FILE} file" if vector is None else "the config's `prototype` field"
        raise PrototypeError(f"{where}: the prototype is incomplete ({missing} is missing); remove the other half or "
                             "recompute it with peft_routing.compute_prototype.")
    if not isinstance(fields, dict) or not REQUIRED_FIELDS <= set(fields) <= REQUIRED_FIELDS | {"prompt_floor"}:
        raise PrototypeError(f"{where}: the config's `prototype` must hold layer, pooling, examples, floor and "
                             f"optionally prompt_floor, got {fields!r}.")
    layer, pooling, examples, floor = fields["layer"], fields["pooling"], fields["examples"], fields["floor"]
    prompt_floor = fields.get("prompt_floor")
    if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
        raise PrototypeError(f"{where}: prototype layer must be an integer >= 0, got {layer!r}.")
    if pooling not in POOLINGS:
        raise PrototypeError(f"{where}: prototype pooling must be one of {POOLINGS}, got {pooling!r}.")
    if isinstance(examples, bool) or not isinstance(examples, int) or examples < 1:
        raise PrototypeError(f"{where}: prototype examples must be an integer >= 1, got {examples!r}.")
    floors = {"floor": floor} | ({} if prompt_floor is None else {"prompt_floor": prompt_floor})
    for name, value in floors.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not -1.0 <= value <= 1.0:
            raise PrototypeError(f"{where}: prototype {name} must be a cosine in [-1, 1], got {value!r}.")
    return Prototype(_unit_vector(vector, where), layer, float(floor), examples, pooling,
                     None if prompt_floor is None else float(prompt_floor))


def _unit_vector(vector: torch.Tensor, where: str) -> torch.Tensor:
    if not isinstance(vector, torch.Tensor) or vector.dim() != 1 or not vector.dtype.is_floating_point:
        described = f"{tuple(vector.shape)} {vector.dtype}" if isinstance(vector, torch.Tensor) else type(vector)
        raise PrototypeError(f"{where}: the prototype must be a 1-D floating-point tensor, got {described}.")
    as_float = vector.detach().to("cpu", torch.float32)
    norm = float(as_float.norm())
    if not torch.isfinite(as_float).all() or not math.isfinite(norm) or norm == 0.0:
        raise PrototypeError(f"{where}: the prototype holds NaN/inf or is zero (after the cast to float32).")
    return as_float if abs(norm - 1.0) < 1e-6 else as_float / norm  # a unit vector round-trips bit for bit


def check_prototype_fits(prototype: Prototype, hidden_size: int | None, num_blocks: int | None, where: str) -> None:
    """Refuse a prototype of another width or of a block the model does not have.

    Args:
        prototype: the checked prototype.
        hidden_size: the language model's hidden size (None: unknown, not checked).
        num_blocks: the number of decoder blocks (None: unknown, not checked).
        where: names the expert in errors.
    """
    if hidden_size is not None and prototype.vector.shape[0] != hidden_size:
        raise PrototypeError(f"{where}: the prototype has {prototype.vector.shape[0]} features; this model's hidden "
                             f"size is {hidden_size}.")
    if num_blocks is not None and prototype.layer >= num_blocks:
        raise PrototypeError(f"{where}: the prototype was taken at block {prototype.layer}; this model has "
                             f"{num_blocks} blocks.")


def read_prototype_vector(path_or_repo_id: str | os.PathLike, subfolder: str | None = None,
                          **hub_kwargs) -> torch.Tensor:
    """The vector of ``prototype.safetensors`` in a local expert folder or a Hub repo.

    Args:
        path_or_repo_id: the expert folder or Hub repo id.
        subfolder: the expert's folder inside it.
        **hub_kwargs: ``revision``, ``token`` ... for ``huggingface_hub.hf_hub_download``.
    """
    path = fetch_file(path_or_repo_id, PROTOTYPE_FILE, subfolder=subfolder, **hub_kwargs)
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError) as error:
        raise PrototypeError(f"{path} is not a readable safetensors file ({error}).") from error
    if set(tensors) != {PROTOTYPE_KEY}:
        raise PrototypeError(f"{path} must hold exactly one tensor named {PROTOTYPE_KEY!r}, got {sorted(tensors)}.")
    return tensors[PROTOTYPE_KEY]


def write_prototype(folder: Path, vector: torch.Tensor) -> None:
    """Write ``prototype.safetensors`` into an expert folder being staged.

    Args:
        folder: the (staging) expert folder.
        vector: the prototype vector.
    """
    save_file({PROTOTYPE_KEY: vector.detach().to("cpu", torch.float32).contiguous()}, folder / PROTOTYPE_FILE,
              {"format": "pt"})
