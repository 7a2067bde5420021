"""The route phase's compiled CPU kernel (``csrc/routed_lora.cpp``): top-k routing plus the chosen experts' LoRA.

On a CPU no stock PyTorch op runs many rank-16 matmuls at a useful rate, so the PyTorch path is much slower than
this kernel (benchmarks/RESULTS.md). It is compiled on first use by PyTorch's own JIT extension builder (a C++
compiler and ninja, seconds, once) for this machine's vector units, and cached under ~/.cache/torch_extensions (or
TORCH_EXTENSIONS_DIR). Where it cannot be built (no compiler, another platform) a warning says so once and the
PyTorch path runs instead; PEFT_ROUTING_CPU_KERNEL=0 skips it altogether.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import shutil
import sys
import time
import warnings
from pathlib import Path

import torch

from .expert_stack import ExpertStack
from .routing import Routes
from .settings import RoutingSettings

SOURCE = Path(__file__).resolve().parent / "csrc" / "routed_lora.cpp"
FLAGS = ["-O3", "-march=native", "-fopenmp"]  # OpenMP: ATen's parallel_for; native: the build stays on this CPU
# PEFT_ROUTING_CPU_ISA=avx2 builds without AVX-512 on a machine that has it: to time what an AVX2-only CPU runs
ISA_FLAGS = {"native": [], "avx2": ["-mno-avx512f"]}


def isa() -> str:
    """The vector ISA the kernel is built for: ``native`` (this CPU's best) or ``avx2`` (PEFT_ROUTING_CPU_ISA)."""
    chosen = os.environ.get("PEFT_ROUTING_CPU_ISA", "native")
    if chosen not in ISA_FLAGS:
        raise ValueError(f"PEFT_ROUTING_CPU_ISA={chosen!r}; use one of {sorted(ISA_FLAGS)}.")
    return chosen


def enabled() -> bool:
    """False when PEFT_ROUTING_CPU_KERNEL=0 asks for the PyTorch path."""
    return os.environ.get("PEFT_ROUTING_CPU_KERNEL", "1") != "0"


def supports(tokens: torch.Tensor, stack: ExpertStack, out: torch.Tensor) -> bool:
    """float32 CPU tensors, a contiguous output to add into, no autograd (the kernel has no backward), and a
    kernel that builds here.

    Args:
        tokens: [T, d_in] layer inputs.
        stack: the layer's experts.
        out: [T, d_out] the output to add into.
    """
    if tokens.device.type != "cpu" or tokens.dtype != torch.float32 or stack.dtype != torch.float32:
        return False
    if not out.is_contiguous():
        return False
    if torch.is_grad_enabled() and (tokens.requires_grad or stack.requires_grad):
        return False
    if torch.compiler.is_compiling():
        return _ready  # torch.compile cannot trace a build: what the last eager call found
    return ready()


_ready = False  # the last answer of ready(), for torch.compile's traces


def ready() -> bool:
    """Enabled and built here (building it now, once per process, if need be)."""
    global _ready
    _ready = enabled() and is_built()
    return _ready


@functools.lru_cache(maxsize=1)
def is_built() -> bool:
    """Build (or load the cached build of) the kernel once per process; False, with one warning, if it fails."""
    from torch.utils.cpp_extension import load

    name = _build_name()
    folder = build_directory(name)
    fresh = not (folder / f"{name}.so").exists()
    if fresh:  # a minute of silence on first use looks like a hang: say what is happening
        print("peft-routing: compiling the CPU kernel for this machine (once; seconds to a minute; cached in "
              f"{folder}; `peft-routing build-kernel` does it ahead)", file=sys.stderr, flush=True)
    started = time.perf_counter()
    try:
        _put_ninja_on_path()
        load(name=name, sources=[str(SOURCE)], extra_cflags=FLAGS + ISA_FLAGS[isa()],
             extra_ldflags=["-fopenmp"], is_python_module=False)
        _register_fake()
    except Exception as error:  # no compiler or ninja, an unsupported platform or compiler: fall back
        warnings.warn(f"peft-routing could not build its CPU kernel, so the route phase runs the slower PyTorch path "
                      f"({type(error).__name__}: {str(error)[:300]}). Install a C++ compiler (g++) to get it, or set "
                      "PEFT_ROUTING_CPU_KERNEL=0 to skip the attempt.", RuntimeWarning, stacklevel=2)
        return False
    if fresh:
        print(f"peft-routing: CPU kernel ready ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
    return True


def build_directory(name: str | None = None) -> Path:
    """Where PyTorch's extension builder keeps this machine's build of the kernel (``name``: ``_build_name()``)."""
    from torch.utils.cpp_extension import _get_build_directory

    return Path(_get_build_directory(name or _build_name(), verbose=False))


@functools.lru_cache(maxsize=1)  # once per process: a second registration is an error
def _register_fake() -> None:
    """Output shapes for torch.compile and meta tensors, which trace the op without running it."""

    @torch.library.register_fake("peft_routing::routed_lora_")
    def _(out, x, scores, a, b_t, scales, k, sigmoid, temperature):
        return x.new_empty(x.shape[0], k, dtype=torch.long), x.new_empty(x.shape[0], k)


def _put_ninja_on_path() -> None:
    """PyTorch runs ``ninja`` from PATH; the pip package's copy is not there when the venv is not activated."""
    if shutil.which("ninja") is None:
        import ninja  # our dependency

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def _build_name() -> str:
    """One build per CPU model: -march=native code may not run on another machine sharing the cache."""
    cpu = platform.machine() + platform.processor()
    if Path("/proc/cpuinfo").exists():
        lines = Path("/proc/cpuinfo").read_text(errors="replace").splitlines()
        cpu += "".join(line for line in lines if line.startswith(("model name", "flags")))[:4096]
    suffix = "" if isa() == "native" else f"_{isa()}"
    return "peft_routing_cpu_" + hashlib.sha1(cpu.encode()).hexdigest()[:10] + suffix


def routed_lora_(tokens: torch.Tensor, scores: torch.Tensor, stack: ExpertStack, settings: RoutingSettings,
                 out: torch.Tensor) -> Routes:
    """out [T, d_out] += every token's top-k experts' LoRA; the routes are ``routing.select_experts``' own.

    Args:
        tokens: [T, d_in] float32 layer inputs.
        scores: [T, N] their routing scores (``strategies.stack_scores``).
        stack: the layer's experts.
        settings: top_k, temperature and mixing.
        out: [T, d_out] contiguous, added into in place.
    """
    k = min(settings.top_k, stack.num_experts)
    ids, weights = torch.ops.peft_routing.routed_lora_(
        out, tokens.contiguous(), scores.contiguous(), stack.a, stack.b_t, stack.scales, k,
        settings.mixing == "sigmoid", float(settings.temperature))
    return Routes(expert_ids=ids, weights=weights)
