"""The concurrency contract (``tuner.library_lock``): forwards and generate calls running while other threads add and
remove experts see the library before or after each change, never a mix; concurrent changes do not corrupt it; and
a bounded soak of add/remove cycles keeps outputs bit-identical and memory flat."""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch
from testing_utils import make_library, token_batch

SECONDS = float(os.environ.get("PEFT_ROUTING_THREAD_TEST_SECONDS", 6))


@pytest.fixture
def stranger(tmp_path):
    return make_library("llama", n_experts=1, seed=11).save_expert("expert_0", tmp_path / "stranger")


def _routed(model, tokens):
    with torch.no_grad():
        return model(input_ids=tokens).logits


def _matches(result: torch.Tensor, expected: torch.Tensor) -> bool:
    return torch.allclose(result, expected, rtol=1e-5, atol=1e-6)


def test_forwards_and_generate_see_the_library_before_or_after_a_change_never_a_mix(stranger):
    model = make_library("llama", n_experts=2, seed=1, task_type="CAUSAL_LM")
    model.base_model.set_phase("route", top_k=2)
    tokens = token_batch(batch=2, length=8)
    generate_kwargs = dict(input_ids=tokens[:1], max_new_tokens=6, do_sample=False, pad_token_id=0)
    without = (_routed(model, tokens), model.generate(**generate_kwargs))
    model.add_expert(stranger, adapter_name="stranger")
    with_stranger = (_routed(model, tokens), model.generate(**generate_kwargs))
    model.remove_expert("stranger")
    assert not _matches(without[0], with_stranger[0])  # the change is visible, so a mix would be caught

    counts = {"before": 0, "after": 0, "mixed": 0, "errors": 0, "changes": 0, "generate": 0}
    lock, stop = threading.Lock(), threading.Event()

    def count(key: str) -> None:
        with lock:
            counts[key] += 1

    def forwards() -> None:
        while not stop.is_set():
            try:
                result = _routed(model, tokens)
            except Exception:  # noqa: BLE001 - any exception is a failure of the contract, counted
                count("errors")
                continue
            count("before" if _matches(result, without[0]) else "after" if _matches(result, with_stranger[0])
                  else "mixed")

    def generates() -> None:
        while not stop.is_set():
            try:
                result = model.generate(**generate_kwargs)
            except Exception:  # noqa: BLE001
                count("errors")
                continue
            same = torch.equal(result, without[1]) or torch.equal(result, with_stranger[1])
            count("generate" if same else "mixed")

    def changes() -> None:
        while not stop.is_set():
            model.add_expert(stranger, adapter_name="stranger")
            model.remove_expert("stranger")
            count("changes")

    threads = [threading.Thread(target=t) for t in (forwards, forwards, generates, changes)]
    for thread in threads:
        thread.start()
    time.sleep(SECONDS)
    stop.set()
    for thread in threads:
        thread.join(timeout=60)
    print(f"\nthread test over {SECONDS:.0f} s: {counts}")
    assert counts["mixed"] == 0 and counts["errors"] == 0, counts
    assert counts["changes"] > 0 and counts["before"] > 0 and counts["after"] > 0 and counts["generate"] > 0, counts
    assert torch.equal(_routed(model, tokens), without[0])


def test_two_threads_adding_at_once_give_the_library_both_would_give_one_after_the_other(tmp_path):
    folders = [make_library("llama", n_experts=1, seed=20 + i).save_expert("expert_0", tmp_path / f"e{i}")
               for i in range(4)]
    tokens = token_batch()
    sequential = make_library("llama", n_experts=2, seed=1)
    for i, folder in enumerate(folders):
        sequential.add_expert(folder, adapter_name=f"new_{i}")
    sequential.base_model.set_phase("route", top_k=2)
    expected = _routed(sequential, tokens)

    model = make_library("llama", n_experts=2, seed=1)
    threads = [threading.Thread(target=model.add_expert, args=(folder,), kwargs={"adapter_name": f"new_{i}"})
               for i, folder in enumerate(folders)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(model.base_model.experts) == sorted(sequential.base_model.experts)
    model.base_model.set_phase("route", top_k=2)
    torch.testing.assert_close(_routed(model, tokens), expected, rtol=1e-4, atol=1e-5)  # another order of sums


def test_a_change_inside_a_forward_of_the_same_model_is_refused(stranger):
    model = make_library("llama", n_experts=2, seed=1)
    errors = []

    def hook(module, inputs):
        try:
            model.add_expert(stranger, adapter_name="stranger")
        except RuntimeError as error:
            errors.append(str(error))

    handle = model.base_model.model.model.layers[0].register_forward_pre_hook(hook)
    _routed(model, token_batch())
    handle.remove()
    assert errors and "inside a forward" in errors[0] and model.base_model.experts == ["expert_0", "expert_1"]


def _rss_mib() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads RSS from /proc")
def test_soak_add_remove_cycles_keep_outputs_identical_and_memory_flat(stranger):
    cycles = int(os.environ.get("PEFT_ROUTING_SOAK_CYCLES", 200))
    model = make_library("llama", n_experts=3, seed=1)
    model.base_model.set_phase("route", top_k=2)
    tokens = token_batch()
    reference = _routed(model, tokens)
    curve = []
    for cycle in range(cycles):
        model.add_expert(stranger, adapter_name="stranger")
        _routed(model, tokens)
        model.remove_expert("stranger")
        assert torch.equal(_routed(model, tokens), reference), cycle
        if cycle % max(1, cycles // 10) == 0 or cycle == cycles - 1:
            curve.append((cycle, round(_rss_mib(), 1)))
    print(f"\nsoak RSS (cycle, MiB): {curve}")
    warm = curve[1][1] if len(curve) > 1 else curve[0][1]
    assert curve[-1][1] - warm < 32, curve
