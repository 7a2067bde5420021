"""The tensors of an expert file, checked before any model sees them: names, dtypes, finiteness, shapes.

These checks need no model, so every way an expert comes in (``add_expert``, ``PeftModel.from_pretrained``, a
library's ``pull``) runs them; ``fit.plan_expert_load`` then checks the result against the model's modules.
"""

from __future__ import annotations

import torch

KEY_PREFIX = "base_model.model."
ROUTE_SUFFIX = ".lora_route"
LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight")
ALLOWED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_TENSORS = 100_000


class ExpertMismatchError(ValueError):
    """An expert's files are malformed, or do not fit the model they are being added to."""


def split_key(key: str) -> tuple[str, str]:
    """``base_model.model.<module>.<kind>`` -> (module path, kind in {lora_A, lora_B, lora_route}).

    Args:
        key: a tensor name of an expert's safetensors file.
    """
    if key.startswith(KEY_PREFIX):
        body = key.removeprefix(KEY_PREFIX)
        if body.endswith(ROUTE_SUFFIX):
            return body[: -len(ROUTE_SUFFIX)], "lora_route"
        for suffix in LORA_SUFFIXES:
            if body.endswith(suffix):
                return body[: -len(suffix)], suffix.split(".")[1]
    raise ValueError(f"unexpected tensor {key!r}")


def group_expert_tensors(tensors: dict[str, torch.Tensor], where: str) -> dict[str, dict[str, torch.Tensor]]:
    """Module path -> {lora_A, lora_B[, lora_route]}, each tensor checked on its own and against its module's others.

    Refused: a name that is not a LoRA weight or a routing vector; a dtype other than float16/bfloat16/float32/
    float64; a value that is not finite once cast to float32 (so float64 1e300 is refused: it would become inf);
    A/B missing for a module; shapes that disagree (A [r, in], B [out, r], route [in]).

    Args:
        tensors: the expert file's tensors.
        where: the expert's folder, for messages.
    """
    if len(tensors) > MAX_TENSORS:
        raise ExpertMismatchError(f"Expert {where} holds {len(tensors)} tensors; an expert has three per module.")
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        try:
            path, kind = split_key(key)
        except ValueError:
            raise ExpertMismatchError(
                f"Expert {where} holds tensor {key!r}, which is not a LoRA A/B weight or a routing vector "
                "(DoRA, biases and embeddings are not supported by routed experts)."
            ) from None
        if tensor.dtype not in ALLOWED_DTYPES:
            raise ExpertMismatchError(f"Expert {where}: tensor {key!r} is {tensor.dtype}; expert weights must be "
                                      "float16, bfloat16, float32 or float64.")
        if not torch.isfinite(tensor.to(torch.float32)).all():
            raise ExpertMismatchError(f"Expert {where}: tensor {key!r} is not a finite floating-point tensor (NaN, "
                                      "inf, or too large for float32).")
        grouped.setdefault(path, {})[kind] = tensor
    for path, found in grouped.items():
        _check_module_shapes(path, found, where)
    return grouped


def _check_module_shapes(path: str, found: dict[str, torch.Tensor], where: str) -> None:
    for kind in ("lora_A", "lora_B"):
        if kind not in found:
            raise ExpertMismatchError(f"Expert {where} has no {kind} weight for module {path!r}.")
    a, b, route = found["lora_A"], found["lora_B"], found.get("lora_route")
    consistent = a.dim() == 2 and b.dim() == 2 and a.shape[0] == b.shape[1] and a.numel() > 0 and b.numel() > 0
    if route is not None:
        consistent = consistent and route.dim() == 1 and route.shape[0] == a.shape[1]
    if not consistent:
        shapes = {kind: tuple(t.shape) for kind, t in found.items()}
        raise ExpertMismatchError(f"Expert {where}: the tensors of module {path!r} have shapes {shapes}, which do "
                                  "not fit together (lora_A [r, in], lora_B [out, r], lora_route [in]).")


def check_against_saved_shapes(grouped: dict[str, dict[str, torch.Tensor]], module_shapes: dict | None,
                               where: str) -> None:
    """The tensors agree with the config's ``module_shapes`` (what save_expert recorded), when it has them.

    Args:
        grouped: ``group_expert_tensors``' result.
        module_shapes: the config's module path -> [out, in, r].
        where: the expert's folder, for messages.
    """
    if module_shapes is None:
        return
    if set(module_shapes) != set(grouped):
        extra, missing = sorted(set(grouped) - set(module_shapes)), sorted(set(module_shapes) - set(grouped))
        raise ExpertMismatchError(f"Expert {where}: adapter_model.safetensors and the config's module_shapes name "
                                  f"different modules (only in the weights: {extra[:5]}; only in the config: "
                                  f"{missing[:5]}). The folder is incomplete or was edited.")
    for path, (out_features, in_features, rank) in module_shapes.items():
        a, b = grouped[path]["lora_A"], grouped[path]["lora_B"]
        if tuple(a.shape) != (rank, in_features) or tuple(b.shape) != (out_features, rank):
            raise ExpertMismatchError(f"Expert {where}: module {path!r} has lora_A {tuple(a.shape)} and lora_B "
                                      f"{tuple(b.shape)}, but its config records [out, in, r] = "
                                      f"{[out_features, in_features, rank]}.")
