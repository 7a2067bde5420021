"""A corpus of hostile expert folders, generated from one valid folder: each case edits a copy as a stranger might.

Every case is (category, name, edit, expect): ``edit(folder)`` damages the folder; ``expect`` is "refuse" with a text
the error must contain (the field or the file), or "handle" when the folder must load and route correctly (a
neutralised field, a harmless cast).
"""

from __future__ import annotations

import json
import os
import pickle
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
A_KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
B_KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
ROUTE_KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_route"
PAYLOAD_MARKER = "pickle_payload_ran"


@dataclass(frozen=True)
class Case:
    category: str
    name: str
    edit: Callable[[Path], None]
    expect: str  # "refuse" or "handle"
    mentions: str = ""  # refused: the error names this (a field or a file)

    @property
    def id(self) -> str:
        return f"{self.category}-{self.name}"


def _config(**values) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        data = json.loads((folder / CONFIG).read_text())
        for key, value in values.items():
            if value is _DELETE:
                data.pop(key, None)
            else:
                data[key] = value
        (folder / CONFIG).write_text(json.dumps(data))
    return edit


_DELETE = object()


VALID_PROTOTYPE = {"layer": 0, "pooling": "causal_mean", "examples": 4, "floor": 0.5}


def _both(*edits: Callable[[Path], None]) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        for each in edits:
            each(folder)
    return edit


def _raw_config(text: bytes) -> Callable[[Path], None]:
    return lambda folder: (folder / CONFIG).write_bytes(text)


def _tensors(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        tensors = load_file(folder / WEIGHTS)
        change(tensors)
        save_file(tensors, folder / WEIGHTS)
    return edit


def _set(key: str, value_of: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[dict], None]:
    def change(tensors: dict) -> None:
        tensors[key] = value_of(tensors[key])
    return change


def _delete(key: str) -> Callable[[dict], None]:
    return lambda tensors: tensors.pop(key)


def _all_to(dtype: torch.dtype) -> Callable[[dict], None]:
    def change(tensors: dict) -> None:
        for key in tensors:
            tensors[key] = tensors[key].to(dtype)
    return change


def _symlink(name: str, target: Path) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        real = folder / name
        if real.exists():
            os.replace(real, target)
        else:
            target.write_text("secret")
        real.symlink_to(target)
    return edit


class _Payload:
    """A pickle that would create a marker file if it were ever unpickled."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _pickle_only(folder: Path) -> None:
    tensors = load_file(folder / WEIGHTS)
    (folder / WEIGHTS).unlink()
    with open(folder / "adapter_model.bin", "wb") as handle:
        pickle.dump({**tensors, "payload": _Payload(str(folder.parent / PAYLOAD_MARKER))}, handle)


def _truncate(folder: Path) -> None:
    data = (folder / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes(data[: len(data) // 2])


def _huge_header(folder: Path) -> None:
    (folder / WEIGHTS).write_bytes(struct.pack("<Q", 1 << 40) + b"{}")


def _nested(depth: int) -> bytes:
    return b'{"peft_type": "ROUTING_LORA", "x": ' + b"[" * depth + b"]" * depth + b"}"


def cases(scratch: Path) -> list[Case]:
    """The corpus; ``scratch`` is a folder outside the expert folders for symlink targets."""
    refuse = "refuse"
    config_cases = [
        ("pissa", _config(init_lora_weights="pissa"), "init_lora_weights"),
        ("pissa_niter", _config(init_lora_weights="pissa_niter_100000000"), "init_lora_weights"),
        ("olora", _config(init_lora_weights="olora"), "init_lora_weights"),
        ("loftq_init", _config(init_lora_weights="loftq"), "init_lora_weights"),
        ("eva_init", _config(init_lora_weights="eva"), "init_lora_weights"),
        ("corda_init", _config(init_lora_weights="corda"), "init_lora_weights"),
        ("orthogonal_init", _config(init_lora_weights="orthogonal"), "init_lora_weights"),
        ("init_number", _config(init_lora_weights=3), "init_lora_weights"),
        ("modules_to_save", _config(modules_to_save=["lm_head"]), "modules_to_save"),
        ("layer_replication", _config(layer_replication=[[0, 2]]), "layer_replication"),
        ("trainable_tokens", _config(trainable_token_indices=[1, 2]), "trainable_token_indices"),
        ("megatron", _config(megatron_config={"x": 1}), "megatron_config"),
        ("megatron_core", _config(megatron_core="os"), "megatron_core"),
        ("dora", _config(use_dora=True), "use_dora"),
        ("bias_all", _config(bias="all"), "bias"),
        ("lora_bias", _config(lora_bias=True), "lora_bias"),
        ("loftq_config", _config(loftq_config={"loftq_bits": 4}), "loftq_config"),
        ("eva_config", _config(eva_config={"rho": 2.0}), "eva_config"),
        ("corda_config", _config(corda_config={"cache_file": "/etc/passwd"}), "corda_config"),
        ("qalora", _config(use_qalora=True), "use_qalora"),
        ("alpha_nan", _config(lora_alpha=float("nan")), "lora_alpha"),
        ("alpha_inf", _config(lora_alpha=float("inf")), "lora_alpha"),
        ("alpha_1e300", _config(lora_alpha=1e300), "lora_alpha"),
        ("alpha_text", _config(lora_alpha="8"), "lora_alpha"),
        ("alpha_bool", _config(lora_alpha=True), "lora_alpha"),
        ("alpha_null", _config(lora_alpha=None), "lora_alpha"),
        ("r_zero", _config(r=0), "`r`"),
        ("r_negative", _config(r=-4), "`r`"),
        ("r_float", _config(r=4.5), "`r`"),
        ("r_text", _config(r="4"), "`r`"),
        ("r_huge", _config(r=10**9), "`r`"),
        ("rank_pattern_zero", _config(rank_pattern={"q_proj": 0}), "rank_pattern"),
        ("rank_pattern_list", _config(rank_pattern=[4]), "rank_pattern"),
        ("alpha_pattern_nan", _config(alpha_pattern={"q_proj": float("nan")}), "alpha_pattern"),
        ("dropout_big", _config(lora_dropout=1.5), "lora_dropout"),
        ("no_target_modules", _config(target_modules=_DELETE), "target_modules"),
        ("target_modules_number", _config(target_modules=5), "target_modules"),
        ("hidden_size_text", _config(base_hidden_size="32"), "base_hidden_size"),
        ("hidden_size_negative", _config(base_hidden_size=-1), "base_hidden_size"),
        ("module_shapes_text", _config(module_shapes="x"), "module_shapes"),
        ("module_shapes_short", _config(module_shapes={"model.layers.0.self_attn.q_proj": [32, 32]}),
         "module_shapes"),
        ("prototype_junk", _config(prototype={"layer": -1}), "prototype"),
        ("top_k_zero", _config(top_k=0), "top_k"),
        ("temperature_nan", _config(temperature=float("nan")), "temperature"),
        ("score_norm_unknown", _config(score_norm="evil"), "score_norm"),
        ("router_unknown", _config(router="evil"), "router"),
        ("fan_in_text", _config(fan_in_fan_out="yes"), "fan_in_fan_out"),
        ("language_model_only_text", _config(language_model_only="no"), "language_model_only"),
        ("layers_to_transform_text", _config(layers_to_transform="0"), "layers_to_transform"),
        ("peft_type_unknown", _config(peft_type="BOGUS"), "peft_type"),
        ("peft_type_missing", _config(peft_type=_DELETE), "peft_type"),
        ("only_peft_type", _raw_config(b'{"peft_type": "ROUTING_LORA"}'), "target_modules"),
        ("unknown_field_set", _config(run_this="rm -rf /"), "run_this"),
        ("not_json", _raw_config(b"{not json"), CONFIG),
        ("json_list", _raw_config(b"[1, 2]"), CONFIG),
        ("not_utf8", _raw_config(b'{"peft_type": "\xff\xfe"}'), CONFIG),
        ("deeply_nested", _raw_config(_nested(100_000)), CONFIG),
        ("huge_config", _raw_config(b'{"peft_type": "ROUTING_LORA", "x": "' + b"a" * (2 << 20) + b'"}'), CONFIG),
        ("config_symlink", _symlink(CONFIG, scratch / "elsewhere_config.json"), CONFIG),
    ]
    tensor_cases = [
        ("nan", _tensors(_set(ROUTE_KEY, lambda t: torch.full_like(t, float("nan")))), ROUTE_KEY),
        ("inf", _tensors(_set(A_KEY, lambda t: t.index_fill(0, torch.tensor([0]), float("inf")))), A_KEY),
        ("float64_1e300", _tensors(_set(B_KEY, lambda t: torch.full_like(t, 1e300, dtype=torch.float64))), B_KEY),
        ("int8", _tensors(_set(A_KEY, lambda t: t.to(torch.int8))), A_KEY),
        ("bool", _tensors(_set(ROUTE_KEY, lambda t: t > 0)), ROUTE_KEY),
        ("int64", _tensors(_set(B_KEY, lambda t: t.to(torch.int64))), B_KEY),
        ("wrong_shape_a", _tensors(_set(A_KEY, lambda t: torch.zeros(4, 31))), "q_proj"),
        ("wrong_shape_b", _tensors(_set(B_KEY, lambda t: torch.zeros(31, 4))), "q_proj"),
        ("wrong_rank_both", _tensors(lambda d: d.update({A_KEY: torch.zeros(3, 32), B_KEY: torch.zeros(32, 3)})),
         "q_proj"),
        ("route_2d", _tensors(_set(ROUTE_KEY, lambda t: t[None])), "q_proj"),
        ("route_short", _tensors(_set(ROUTE_KEY, lambda t: t[:-1])), "q_proj"),
        ("empty_a", _tensors(lambda d: d.update({A_KEY: torch.zeros(0, 32), B_KEY: torch.zeros(32, 0)})),
         "q_proj"),
        ("scalar", _tensors(_set(ROUTE_KEY, lambda t: t.sum())), "q_proj"),
        ("unknown_key", _tensors(lambda d: d.update({"base_model.model.lm_head.weight": torch.zeros(2, 2)})),
         "lm_head"),
        ("bias_key", _tensors(lambda d: d.update({
            "base_model.model.model.layers.0.self_attn.q_proj.base_layer.bias": torch.zeros(32)})), "bias"),
        ("no_prefix", _tensors(lambda d: d.update({"model.layers.0.self_attn.q_proj.lora_A.weight": d.pop(A_KEY)})),
         "model.layers.0.self_attn.q_proj"),
        ("missing_a", _tensors(_delete(A_KEY)), "q_proj"),
        ("missing_route", _tensors(_delete(ROUTE_KEY)), "q_proj"),
        ("missing_module", _tensors(lambda d: [d.pop(k) for k in (A_KEY, B_KEY, ROUTE_KEY)]), "q_proj"),
        ("unknown_module", _tensors(lambda d: d.update({
            A_KEY.replace("layers.0", "layers.9"): torch.zeros(4, 32), B_KEY.replace("layers.0", "layers.9"):
                torch.zeros(32, 4), ROUTE_KEY.replace("layers.0", "layers.9"): torch.zeros(32)})), "layers.9"),
    ]
    file_cases = [
        ("pickle_only", _pickle_only, "adapter_model.bin"),
        ("no_weights", lambda folder: (folder / WEIGHTS).unlink(), WEIGHTS),
        ("garbage_weights", lambda folder: (folder / WEIGHTS).write_bytes(b"\x00garbage" * 10), WEIGHTS),
        ("truncated_weights", _truncate, WEIGHTS),
        ("huge_header", _huge_header, WEIGHTS),
        ("weights_symlink", _symlink(WEIGHTS, scratch / "elsewhere_weights.safetensors"), WEIGHTS),
        ("weights_is_folder", lambda folder: ((folder / WEIGHTS).unlink(), (folder / WEIGHTS).mkdir()), WEIGHTS),
        ("prototype_symlink", _both(_config(prototype=VALID_PROTOTYPE),
                                    _symlink("prototype.safetensors", scratch / "id_rsa")), "prototype.safetensors"),
    ]
    handled = [
        ("auto_mapping", _config(auto_mapping={"base_model_class": "Evil", "parent_library": "os"})),
        ("runtime_config", _config(runtime_config={"ephemeral_gpu_offload": True})),
        ("unknown_field_unset", _config(some_future_field=None)),
        ("float64_weights", _tensors(_all_to(torch.float64))),
        ("bfloat16_weights", _tensors(_all_to(torch.bfloat16))),
        ("extra_file_ignored", lambda folder: (folder / "notes.txt").write_text("hello")),
    ]
    corpus = [Case("config", n, e, refuse, m) for n, e, m in config_cases]
    corpus += [Case("tensors", n, e, refuse, m) for n, e, m in tensor_cases]
    corpus += [Case("files", n, e, refuse, m) for n, e, m in file_cases]
    corpus += [Case("handled", n, e, "handle") for n, e in handled]
    return corpus


CASE_IDS = [case.id for case in cases(Path("/nonexistent"))]
