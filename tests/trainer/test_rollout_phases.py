"""The engine's GPU settings without a GPU: the real `RolloutEngine` over a fake `vllm.LLM` that records calls.

What is checked is the engine's own logic: which vLLM options a setting asks for, that a sleeping engine
refuses work and is woken by the next push (weights first, then the KV cache), and that the GPU-only settings
are refused on CPU. The push itself goes through the real worker extension over a transformers model
(tests/trainer/test_weight_push.py has the details).
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.trainer.fake_vllm import FakeLLM, tiny_model
from trainer.errors import RolloutError
from trainer.rollout import RolloutEngine


@pytest.fixture
def fake_vllm(monkeypatch):
    import vllm

    monkeypatch.setattr(vllm, "LLM", FakeLLM)


def test_sleeping_engine_refuses_work_and_the_push_wakes_weights_before_kv_cache(fake_vllm, tiny_model_dir):
    engine = RolloutEngine(tiny_model_dir, device="cuda", sleep_mode=True)
    llm = engine.llm
    assert llm.kwargs["enable_sleep_mode"] is True and "gpu_memory_utilization" in llm.kwargs
    engine.sleep()
    engine.sleep()  # already asleep: vLLM is not asked twice
    assert engine.asleep and llm.calls == [("sleep", 1)]
    with pytest.raises(RolloutError, match="asleep"):
        engine.generate([[1, 2]], n=1, temperature=1.0, max_tokens=4)
    with pytest.raises(RolloutError, match="asleep"):
        engine.score([([1, 2], [3])])

    trainer = tiny_model(1)
    metrics = engine.push_weights(trainer.named_parameters())
    assert not engine.asleep
    rpcs = [c for c in llm.calls if c[0] == "rpc"]
    assert llm.calls == [("sleep", 1), ("wake_up", ["weights"]), *rpcs, ("wake_up", ["kv_cache"]),
                         ("reset_prefix_cache",)]
    assert rpcs and all(c == ("rpc", "opsd_reload_weights_from_file") for c in rpcs)
    assert metrics["push/tensors"] == len(list(trainer.parameters()))
    for name, param in llm.worker.model_runner.model.named_parameters():
        assert torch.equal(param, dict(trainer.named_parameters())[name])
    assert engine.generate([], n=1, temperature=1.0, max_tokens=4) == []  # awake again

    llm.calls.clear()
    engine.push_weights(trainer.named_parameters())  # an awake engine is not woken
    assert not [c for c in llm.calls if c[0] in ("wake_up", "sleep")]
    engine.sleep()
    engine.wake_up()
    engine.wake_up()
    assert [c for c in llm.calls if c[0] in ("wake_up", "sleep")] == [("sleep", 1), ("wake_up", None)]
    engine.close()


def test_without_sleep_mode_sleep_is_a_no_op_and_vllm_allocates_as_usual(fake_vllm, tiny_model_dir):
    engine = RolloutEngine(tiny_model_dir, device="cuda")
    assert engine.llm.kwargs["enable_sleep_mode"] is False
    engine.sleep()
    engine.wake_up()
    assert not engine.asleep and engine.llm.calls == []
    engine.close()


def test_cpu_engine_takes_no_gpu_options(fake_vllm, tiny_model_dir):
    engine = RolloutEngine(tiny_model_dir, device="cpu")
    assert "enable_sleep_mode" not in engine.llm.kwargs and "gpu_memory_utilization" not in engine.llm.kwargs
    engine.close()
    with pytest.raises(RolloutError, match="need device 'cuda'"):
        RolloutEngine(tiny_model_dir, device="cpu", weight_sync="cuda_ipc")
    with pytest.raises(RolloutError, match="need device 'cuda'"):
        RolloutEngine(tiny_model_dir, device="cpu", sleep_mode=True)
    with pytest.raises(RolloutError, match="weight_sync must be"):
        RolloutEngine(tiny_model_dir, device="cuda", weight_sync="nccl")


def test_the_trainers_cached_gpu_memory_is_returned_before_vllm_wakes(fake_vllm, tiny_model_dir, monkeypatch):
    """vLLM's wake-up allocates through the driver; what PyTorch's caching allocator still holds from the
    training phase must be handed back first, or a GPU shared with the trainer runs out of memory."""
    engine = RolloutEngine(tiny_model_dir, device="cuda", sleep_mode=True)
    llm = engine.llm
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: llm.calls.append(("empty_cache",)))
    engine.sleep()
    engine.push_weights(tiny_model(1).named_parameters())
    wakes = [c for c in llm.calls if c[0] in ("wake_up", "empty_cache")]
    assert wakes == [("empty_cache",), ("wake_up", ["weights"]), ("empty_cache",), ("wake_up", ["kv_cache"])]
    llm.calls.clear()
    engine.sleep()
    engine.wake_up()
    assert llm.calls == [("sleep", 1), ("empty_cache",), ("wake_up", None)]
    engine.close()


def test_gpu_engine_spawns_its_processes_and_captures_cuda_graphs(fake_vllm, tiny_model_dir, monkeypatch):
    monkeypatch.delenv("VLLM_WORKER_MULTIPROC_METHOD", raising=False)
    engine = RolloutEngine(tiny_model_dir, device="cuda")
    # vLLM forks on CUDA by default, from a process that already runs the sandbox's and torch's threads.
    assert os.environ["VLLM_WORKER_MULTIPROC_METHOD"] == "spawn"
    assert engine.llm.kwargs["enforce_eager"] is False
    engine.close()
    engine = RolloutEngine(tiny_model_dir, device="cuda", enforce_eager=True)
    assert engine.llm.kwargs["enforce_eager"] is True
    engine.close()
    engine = RolloutEngine(tiny_model_dir, device="cpu")
    assert engine.llm.kwargs["enforce_eager"] is True
    engine.close()
