"""Hypothesis fuzz of everything that reads an expert or a library from disk: a loader either returns something that
meets every invariant the rest of the code relies on, or refuses with ValueError/OSError (never another exception
type, never a hang). The default run is bounded (a few hundred examples); ``-m slow`` runs ten times as many."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from testing_utils import make_library

from peft_routing.tuner.config_policy import INIT_CHOICES, MAX_RANK
from peft_routing.tuner.expert_folder import read_expert_folder
from peft_routing.tuner.expert_tensors import ExpertMismatchError, group_expert_tensors
from peft_routing.tuner.expert_weights import read_safetensors
from peft_routing.workflow.library import LibraryError, _read_index

EXAMPLES = int(os.environ.get("PEFT_ROUTING_FUZZ_EXAMPLES", 150))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                            HealthCheck.too_slow])
JSON = st.recursive(st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats() | st.text(max_size=12),
                    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children,
                                                                                       max_size=4), max_leaves=12)
FIELDS = ["r", "lora_alpha", "target_modules", "init_lora_weights", "modules_to_save", "bias", "rank_pattern",
          "alpha_pattern", "lora_dropout", "layers_to_transform", "layers_pattern", "top_k", "temperature",
          "score_norm", "mixing", "router", "fallback", "base_hidden_size", "module_shapes", "prototype",
          "peft_type", "task_type", "use_dora", "layer_replication", "megatron_core", "loftq_config", "expert_name",
          "fan_in_fan_out", "use_rslora", "language_model_only", "unknown_field"]


@pytest.fixture(scope="module")
def valid_folder(tmp_path_factory) -> Path:
    return make_library("llama", n_experts=1, seed=4).save_expert("expert_0", tmp_path_factory.mktemp("v") / "e")


def _refused_or_valid(read):
    try:
        return read()
    except (ValueError, OSError):
        return None


@FUZZ
@given(changes=st.dictionaries(st.sampled_from(FIELDS), JSON, min_size=1, max_size=4))
def test_config_fuzz(valid_folder, tmp_path_factory, changes):
    folder = tmp_path_factory.mktemp("fuzz") / "e"
    shutil.copytree(valid_folder, folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    config.update(changes)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    files = _refused_or_valid(lambda: read_expert_folder(folder))
    if files is None:
        return
    loaded = files.config
    assert isinstance(loaded.r, int) and 1 <= loaded.r <= MAX_RANK
    assert math.isfinite(loaded.lora_alpha) and loaded.init_lora_weights in INIT_CHOICES
    assert not loaded.modules_to_save and loaded.bias == "none" and not loaded.use_dora
    assert loaded.top_k >= 1 and math.isfinite(loaded.temperature) and loaded.temperature > 0


KEYS = [f"base_model.model.model.layers.{i}.self_attn.q_proj.{kind}" for i in (0, 1)
        for kind in ("lora_A.weight", "lora_B.weight", "lora_route")] + ["base_model.model.x.weight", "junk"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.int64, torch.bool]


@st.composite
def tensor_dicts(draw):
    tensors = {}
    for key in draw(st.lists(st.sampled_from(KEYS), unique=True, max_size=6)):
        shape = draw(st.lists(st.integers(0, 5), max_size=3))
        value = draw(st.sampled_from([0.0, 1.0, -2.5, 1e30, 1e300, float("nan"), float("inf")]))
        tensors[key] = torch.full(shape, value, dtype=torch.float64).to(draw(st.sampled_from(DTYPES)))
    return tensors


@FUZZ
@given(tensors=tensor_dicts())
def test_tensor_fuzz(tensors):
    try:
        grouped = group_expert_tensors(tensors, "fuzz")
    except ExpertMismatchError:
        return
    for found in grouped.values():
        a, b = found["lora_A"], found["lora_B"]
        assert a.dim() == 2 and b.dim() == 2 and a.shape[0] == b.shape[1] and a.numel() and b.numel()
        assert all(t.dtype.is_floating_point and torch.isfinite(t.float()).all() for t in found.values())
        if "lora_route" in found:
            assert tuple(found["lora_route"].shape) == (a.shape[1],)


@FUZZ
@given(data=st.binary(max_size=256), prefix=st.booleans())
def test_safetensors_bytes_fuzz(tmp_path_factory, data, prefix):
    path = tmp_path_factory.mktemp("st") / "adapter_model.safetensors"
    if prefix:  # a valid file with damage after it, or cut short
        save_file({"a": torch.ones(3)}, path)
        data = path.read_bytes()[: len(data)] + data
    path.write_bytes(data)
    tensors = _refused_or_valid(lambda: read_safetensors(path))
    assert tensors is None or all(isinstance(t, torch.Tensor) for t in tensors.values())


@FUZZ
@given(index=st.fixed_dictionaries({"format": st.just("peft-routing-library") | JSON, "base_model": JSON,
                                    "experts": st.lists(st.fixed_dictionaries({"name": JSON | st.text(max_size=12),
                                                                               "training": JSON}), max_size=3) | JSON}))
def test_library_index_fuzz(tmp_path_factory, index):
    path = tmp_path_factory.mktemp("lib") / "library.json"
    path.write_text(json.dumps(index))
    try:
        base_model, entries = _read_index(path)
    except LibraryError:
        return
    assert isinstance(base_model, str)
    names = [entry["name"] for entry in entries]
    assert len(set(names)) == len(names)
    for name in names:
        assert Path(name).name == name and name not in (".", "..") and "/" not in name


@pytest.mark.slow
def test_long_fuzz_run(tmp_path):
    """Every fuzz test again with ten times the examples (CI's slow run)."""
    import subprocess
    import sys

    env = dict(os.environ, PEFT_ROUTING_FUZZ_EXAMPLES=str(10 * EXAMPLES))
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-m",
                             "not slow"], env=env, cwd=Path(__file__).parent, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:]
