"""One layer's experts stacked into a few contiguous tensors, with PEFT's parameters re-pointed as views into them.

The route phase needs every expert's routing vector, A and B side by side (one scoring matmul, grouped LoRA
matmuls). Copying them would double the memory of a large library, so the stack *is* the storage: after
``ExpertStack.build`` each ``lora_A[name].weight``, ``lora_B[name].weight`` and ``lora_route[name]`` of the layer is
an ``nn.Parameter`` viewing a slice of the stack. PEFT's per-expert parameters stay the source of truth for every
PEFT operation (save, merge, delete, training); the stack is rebuilt whenever the library changes.

Layout (N experts, ranks padded with zero rows to r_max):
  ``head``  [N + N * r_max, d_in]: the N routing vectors, then every expert's A rows (so one matmul scores the
            tokens and computes every expert's shrink, the dense path's trick);
  ``b_t``   [N, r_max, d_out]: every expert's B transposed (rows of the expand matmul).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from dataclasses import dataclass

import torch
from torch import nn

from .routing import standardize


@dataclass
class ExpertStack:
    names: list[str]
    head: torch.Tensor
    b_t: torch.Tensor
    scales: torch.Tensor  # [N], LoRA scaling of each expert
    r_max: int
    _standardized_vectors: torch.Tensor | None = None
    _standardized_version: int = -1
    _expert_views: tuple | None = None

    def __post_init__(self) -> None:
        self.num_experts = len(self.names)
        self.vectors = self.head[: self.num_experts]  # [N, d_in]
        self.a = self.head[self.num_experts :].view(self.num_experts, self.r_max, -1)  # [N, r_max, d_in]
        self.a_rows = self.head[self.num_experts :]  # [N * r_max, d_in]
        self.b_rows = self.b_t.view(-1, self.b_t.shape[-1])  # [N * r_max, d_out]

    def standardized_vectors(self) -> torch.Tensor:
        """PHATGOOSE-normalised routing vectors, recomputed only after the vectors changed.

        PEFT's parameters are views of ``head`` and share its version counter, so an in-place update (a router
        training step, a load) bumps ``head._version`` and invalidates this cache.
        """
        if self._standardized_vectors is None or self._standardized_version != self.head._version:
            self._standardized_vectors = standardize(self.vectors)
            self._standardized_version = self.head._version
        return self._standardized_vectors

    def expert_views(self) -> tuple[list[torch.Tensor], list[torch.Tensor], list[float]]:
        """Per expert: A [r_max, d_in], B [d_out, r_max] (views of the stack) and the scale as a float.

        Made once per stack for the decode path, where slicing the stack anew costs more than the arithmetic.
        """
        if self._expert_views is None:
            self._expert_views = (list(self.a.unbind(0)), [b.t() for b in self.b_t.unbind(0)], self.scales.tolist())
        return self._expert_views

    def is_current(self, layer) -> bool:
        """False when PEFT replaced a parameter since the build (e.g. ``model.to(...)``, dtype casting)."""
        if list(layer.lora_A.keys()) != self.names or not self.names:
            return False
        # the first expert's A still is the view made at build: a replaced (moved, cast) tensor lives elsewhere,
        # and the stack keeps its own memory alive, so the address cannot have been reused
        return layer.lora_A[self.names[0]].weight.data_ptr() == self.a_rows.data_ptr()

    @classmethod
    def build(cls, layer) -> "ExpertStack":
        """Stack the layer's experts and re-point their parameters as views into the stack."""
        names = list(layer.lora_A.keys())
        reference = layer.lora_A[names[0]].weight
        device, dtype = reference.device, reference.dtype
        r_max = max(layer.r[n] for n in names)
        n, d_in, d_out = len(names), layer.in_features, layer.out_features
        # empty, not zeros: pages become resident as the experts are copied in, while the copied experts' old
        # tensors are released, so building never holds two copies of the layer's library (only pad rows are zeroed)
        head = torch.empty(n + n * r_max, d_in, device=device, dtype=dtype)
        b_t = torch.empty(n, r_max, d_out, device=device, dtype=dtype)
        stack = cls(names, head, b_t, torch.tensor([float(layer.scaling[x]) for x in names], dtype=dtype,
                                                    device=device), r_max)
        with torch.no_grad():
            for j, name in enumerate(names):
                r = layer.r[name]
                stack.vectors[j].copy_(layer.lora_route[name])
                stack.a[j, :r].copy_(layer.lora_A[name].weight)
                b_t[j, :r].copy_(layer.lora_B[name].weight.t())
                stack.a[j, r:].zero_()
                b_t[j, r:].zero_()
                _repoint(layer.lora_route, name, stack.vectors[j])
                _repoint_weight(layer.lora_A[name], stack.a[j, :r])
                _repoint_weight(layer.lora_B[name], b_t[j, :r].t())
                if device.type == "cpu" and (j + 1) % RELEASE_EVERY == 0:
                    _release_freed_host_memory()
        if device.type == "cpu":
            _release_freed_host_memory()
        return stack


RELEASE_EVERY = 16  # experts copied between two releases of the freed ones' host memory


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc
        return None


def _release_freed_host_memory() -> None:
    """Give the replaced per-expert tensors' memory back to the OS (glibc keeps small freed blocks otherwise).

    Without it the process keeps both the old parameters and the stack resident: twice the library's memory.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _repoint(container: nn.ParameterDict, name: str, view: torch.Tensor) -> None:
    requires_grad = container[name].requires_grad
    container[name] = nn.Parameter(view, requires_grad=requires_grad)


def _repoint_weight(linear: nn.Linear, view: torch.Tensor) -> None:
    linear.weight = nn.Parameter(view, requires_grad=linear.weight.requires_grad)
