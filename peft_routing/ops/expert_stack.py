"""One layer's experts stacked into a few contiguous tensors, with PEFT's parameters re-pointed as views into them.

The route phase needs every expert's routing vector, A and B side by side (one scoring matmul, grouped LoRA
matmuls). Copying them would double the memory of a large library, so the stack *is* the storage: each
``lora_A[name].weight``, ``lora_B[name].weight`` and ``lora_route[name]`` of the layer is an ``nn.Parameter``
viewing a slot of the stack. PEFT's per-expert parameters stay the source of truth for every PEFT operation (save,
merge, delete, training); the stack follows every library change (``ExpertStack.synced``).

Slots are allocated ahead (``capacity``), so that adding an expert copies only that expert in: its freshly made
tensors are freed at once and their memory is reused by the next expert, where stacking a whole library after the
fact would leave the host allocator with thousands of freed blocks it cannot return (benchmarks/RESULTS.md,
memory). On a CPU unused slots cost no memory (their pages are never touched); elsewhere capacity is exact.

Layout (N experts in C >= N slots, ranks padded with zero rows to r_max); the attributes are views of the first N:
  ``vectors`` [N, d_in]          the routing vectors;
  ``a``       [N, r_max, d_in]   every expert's A (``a_rows``: the same as [N * r_max, d_in]);
  ``b_t``     [N, r_max, d_out]  every expert's B transposed (``b_rows``: [N * r_max, d_out], rows of the expand);
  ``scales``  [N]                every expert's LoRA scaling.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

import torch
from torch import nn

from .routing import standardize

MIN_HOST_CAPACITY = 8  # slots of a new CPU stack; it doubles when full


class ExpertStack:
    def __init__(self, names: list[str], vectors: torch.Tensor, a: torch.Tensor, b_t: torch.Tensor,
                 scales: torch.Tensor) -> None:
        """Slots: vectors [C, d_in], a [C, r_max, d_in], b_t [C, r_max, d_out], scales [C]; ``names`` fill the first."""
        if not len(names) <= a.shape[0] == vectors.shape[0] == b_t.shape[0] == scales.shape[0]:
            raise ValueError(f"{len(names)} experts do not fit stacks of {a.shape[0]} slots")
        self._slots = (vectors, a, b_t, scales)
        self.r_max = a.shape[1]
        self._use(list(names))

    def _use(self, names: list[str]) -> None:
        """Point the public views at the first len(names) slots (and forget what was derived from them)."""
        vectors, a, b_t, scales = self._slots
        n = len(names)
        self.names, self.num_experts = names, n
        self.vectors, self.a, self.b_t, self.scales = vectors[:n], a[:n], b_t[:n], scales[:n]
        self.a_rows = self.a.view(n * self.r_max, a.shape[-1])
        self.b_rows = self.b_t.view(n * self.r_max, b_t.shape[-1])
        self._standardized_vectors, self._standardized_version, self._expert_views = None, -1, None
        # where the first and the last expert's A, B and vector start (holds_parameters_of compares them)
        self._checked = [(names[j], tuple(t[j].data_ptr() for t in (self.a, self.b_t, self.vectors)))
                         for j in sorted({0, n - 1})] if n else []

    @property
    def capacity(self) -> int:
        return self._slots[1].shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.a.dtype

    @property
    def requires_grad(self) -> bool:
        return self.vectors.requires_grad or self.a.requires_grad or self.b_t.requires_grad

    def standardized_vectors(self) -> torch.Tensor:
        """PHATGOOSE-normalised routing vectors, recomputed only after the vectors changed.

        PEFT's parameters are views of the vectors' slots and share their version counter, so an in-place update (a
        router training step, a load) bumps it and invalidates this cache.
        """
        version = self._slots[0]._version
        if self._standardized_vectors is None or self._standardized_version != version:
            self._standardized_vectors = standardize(self.vectors)
            self._standardized_version = version
        return self._standardized_vectors

    def expert_views(self) -> tuple[list[torch.Tensor], list[torch.Tensor], list[float]]:
        """Per expert: A [r_max, d_in], B [d_out, r_max] (views of the stack) and the scale as a float.

        Made once per stack for the decode path, where slicing the stack anew costs more than the arithmetic.
        """
        if self._expert_views is None:
            self._expert_views = (list(self.a.unbind(0)), [b.t() for b in self.b_t.unbind(0)], self.scales.tolist())
        return self._expert_views

    # ------------------------------------------------------------------------------------------- following PEFT
    @classmethod
    def synced(cls, stack: ExpertStack | None, layer) -> ExpertStack | None:
        """The stack of the layer's experts now: ``stack`` itself, with any new experts appended, where it still holds
        the layer's parameters and they fit; otherwise a new stack (None for a layer without experts).

        Args:
            stack: the layer's current stack, or None.
            layer: a ``RoutingLinear`` (anything with its lora_A/lora_B/lora_route/r/scaling).
        """
        if stack is not None and stack.follows(layer):
            return stack
        names = list(layer.lora_A.keys())
        if not names or any(_holds_no_data(layer, name) for name in names):
            return None  # PEFT's low_cpu_mem_usage loading: stacked by the first forward after the weights arrive
        if stack is None:
            return cls.build(layer)
        if stack._can_take(layer, names):
            stack._append(layer, names[stack.num_experts :])
            return stack
        return cls.build(layer, capacity=stack.capacity)

    @classmethod
    def build(cls, layer, capacity: int = 0) -> ExpertStack:
        """Stack the layer's experts into new slots (at least ``capacity``) and re-point their parameters there.

        Args:
            layer: a ``RoutingLinear``.
            capacity: at least this many slots.
        """
        names = list(layer.lora_A.keys())
        reference = layer.lora_A[names[0]].weight
        place = dict(device=reference.device, dtype=reference.dtype)
        slots = _slot_count(max(capacity, len(names)), reference.device)
        r_max = max(layer.r[name] for name in names)
        stack = cls([], torch.empty(slots, layer.in_features, **place),
                    torch.empty(slots, r_max, layer.in_features, **place),
                    torch.empty(slots, r_max, layer.out_features, **place), torch.empty(slots, **place))
        stack._append(layer, names)
        return stack

    def follows(self, layer) -> bool:
        """The stack holds exactly the layer's experts, in order, and their parameters still view it (checked on
        every route call, so it costs a name comparison and six addresses)."""
        return list(layer.lora_A.keys()) == self.names and self.holds_parameters_of(layer)

    def holds_parameters_of(self, layer) -> bool:
        """False when PEFT replaced a stacked parameter since (``model.to(...)``, a dtype cast): checked on the first
        and the last expert, the ones such operations touch first and last. Runs on every route call, so the
        addresses to compare are computed once per library change (``_use``)."""
        lora_a, lora_b, vectors = layer.lora_A, layer.lora_B, layer.lora_route
        try:
            return bool(self._checked) and all(
                (lora_a[name].weight.data_ptr(), lora_b[name].weight.data_ptr(), vectors[name].data_ptr()) == where
                for name, where in self._checked)
        except (KeyError, AttributeError):  # an expert left the layer
            return False

    def _can_take(self, layer, names: list[str]) -> bool:
        """The layer's experts are this stack's, in order, followed by new ones that fit the free slots."""
        if names[: self.num_experts] != self.names or not self.holds_parameters_of(layer):
            return False
        new = names[self.num_experts :]
        return len(names) <= self.capacity and all(
            layer.r[name] <= self.r_max and layer.lora_A[name].weight.device == self.a.device for name in new)

    def _append(self, layer, new: list[str]) -> None:
        """Copy the new experts into the next slots and re-point their parameters there."""
        vectors, a, b_t, scales = self._slots
        start = self.num_experts
        host = a.device.type == "cpu"
        with torch.no_grad():
            for j, name in enumerate(new, start):
                r = layer.r[name]
                vectors[j].copy_(layer.lora_route[name])
                a[j, :r].copy_(layer.lora_A[name].weight)
                b_t[j, :r].copy_(layer.lora_B[name].weight.t())
                a[j, r:].zero_()
                b_t[j, r:].zero_()
                scales[j] = float(layer.scaling[name])
                _repoint(layer.lora_route, name, vectors[j])
                _repoint_weight(layer.lora_A[name], a[j, :r])
                _repoint_weight(layer.lora_B[name], b_t[j, :r].t())
                if host and (j - start + 1) % RELEASE_EVERY == 0:
                    release_freed_host_memory()
        if host and len(new) > 1:
            release_freed_host_memory()
        self._use(self.names + new)


def _holds_no_data(layer, name: str) -> bool:
    return any(t.is_meta for t in (layer.lora_A[name].weight, layer.lora_B[name].weight, layer.lora_route[name]))


def _slot_count(n: int, device: torch.device) -> int:
    """Slots for n experts: the next power of two on a CPU (untouched slots cost nothing there), exactly n elsewhere."""
    if device.type != "cpu":
        return n
    return max(MIN_HOST_CAPACITY, 1 << (n - 1).bit_length())


RELEASE_EVERY = 16  # experts copied between two releases of the freed ones' host memory


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc
        return None


def release_freed_host_memory() -> None:
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
