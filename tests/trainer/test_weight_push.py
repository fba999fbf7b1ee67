"""The weight push without a vLLM engine: buckets, the choice of transport, and the worker's side of the
'shared_file' path, which is the default on CPU and GPU.

The worker is the project's real worker extension over a transformers model (tests/trainer/fake_vllm.py); the
real engine's side is tests/trainer/test_rollout.py (CPU) and test_rollout_gpu.py (GPU).
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from tests.trainer.fake_vllm import LAYER_PARTS, FakeWorker, rpc_to, tiny_model
from trainer.errors import RolloutError
from trainer.student import iter_full_parameters
from trainer.weight_push import bucket_transport, group_for_reload, host_copies, push_buckets


def layer_of(name: str) -> str | None:
    parts = name.split(".")
    return parts[2] if ".layers." in name else None


def test_group_for_reload_never_splits_a_layer():
    names = ["model.embed_tokens.weight"] + [f"model.layers.{i}.{part}" for i in range(3) for part in LAYER_PARTS[:5]] \
        + ["model.norm.weight"]
    tensors = [(n, torch.zeros(4)) for n in names]  # 16 bytes each
    buckets = list(group_for_reload(tensors, bucket_bytes=20))
    assert [n for b in buckets for n, _ in b] == names  # order kept, nothing lost
    for bucket in buckets:
        assert len({layer_of(n) for n, _ in bucket if layer_of(n)}) <= 1  # small buckets: one layer each, whole
    for i in range(3):
        assert len([k for k, b in enumerate(buckets) if any(f".layers.{i}." in n for n, _ in b)]) == 1
    assert len(list(group_for_reload(tensors, bucket_bytes=1 << 30))) == 1


def on(device: str) -> SimpleNamespace:
    """Stands for a tensor on `device` (only `.device` is read): CUDA devices exist here as names only."""
    return SimpleNamespace(device=torch.device(device))


def test_transport_is_ipc_only_for_a_bucket_wholly_on_one_gpu():
    assert bucket_transport([("a", on("cuda:0")), ("b", on("cuda:0"))], "cuda_ipc") == "ipc"
    # an offloaded teacher's host tensors have no IPC handle: the bucket goes by file
    assert bucket_transport([("a", on("cuda:0")), ("b", on("cpu"))], "cuda_ipc") == "file"
    assert bucket_transport([("a", on("cpu"))], "cuda_ipc") == "file"
    assert bucket_transport([("a", on("cuda:0")), ("b", on("cuda:1"))], "cuda_ipc") == "file"
    assert bucket_transport([("a", on("cuda:0"))], "shared_file") == "file"
    with pytest.raises(RolloutError, match="weight_sync"):
        bucket_transport([("a", on("cpu"))], "nccl")


def test_host_copies_cast_and_give_tied_names_their_own_memory():
    shared = torch.randn(4, 3)
    own = torch.randn(2)
    copies = host_copies([("embed", shared), ("head", shared), ("norm", own)], torch.bfloat16)
    assert list(copies) == ["embed", "head", "norm"] and all(t.dtype == torch.bfloat16 for t in copies.values())
    assert copies["embed"].data_ptr() != copies["head"].data_ptr()
    assert torch.equal(copies["head"], shared.to(torch.bfloat16))
    same_dtype = host_copies([("embed", shared), ("head", shared)], torch.float32)
    assert same_dtype["embed"].data_ptr() == shared.data_ptr()  # a host tensor in the engine's dtype: no copy
    assert same_dtype["head"].data_ptr() != shared.data_ptr()


@pytest.mark.parametrize("weight_sync", ["shared_file", "cuda_ipc"])
def test_push_of_host_tensors_loads_every_weight_layer_by_layer(weight_sync):
    trainer, engine_model = tiny_model(1), tiny_model(2)
    worker, methods = FakeWorker(engine_model), []
    layer_bytes = sum(p.numel() * 4 for n, p in trainer.named_parameters() if ".layers.0." in n)
    metrics = push_buckets(rpc_to(worker, methods), trainer.named_parameters(), weight_sync=weight_sync,
                           dtype=torch.float32, bucket_bytes=layer_bytes)
    # host tensors go by file under either setting (with cuda_ipc: the offloaded teacher's case)
    assert set(methods) == {"opsd_reload_weights_from_file"}
    assert metrics["push/file_buckets"] == len(methods) and metrics["push/ipc_buckets"] == 0
    calls = worker.model_runner.calls
    assert len(calls) == len(methods) >= 3
    for call in calls:
        layers = {layer_of(n) for n, _ in call if layer_of(n)}
        assert len(layers) <= 1
        for layer in layers:  # a fused group arrives whole
            assert {n for n, _ in call if layer_of(n) == layer} == {f"model.layers.{layer}.{p}" for p in LAYER_PARTS}
    expected = dict(trainer.named_parameters())
    pushed = [n for call in calls for n, _ in call]
    assert sorted(pushed) == sorted(expected)  # each once (a file lists its tensors by name, not in push order)
    assert [layer for call in calls for layer in sorted({layer_of(n) for n, _ in call} - {None})] == ["0", "1", "2"]
    assert metrics["push/tensors"] == len(expected)
    assert metrics["push/gib"] == pytest.approx(sum(p.numel() * 4 for p in expected.values()) / 2**30)
    for name, param in engine_model.named_parameters():
        assert torch.equal(param, expected[name]), name
    assert engine_model.lm_head.weight is engine_model.model.embed_tokens.weight


def test_push_casts_to_the_engine_dtype_and_takes_a_state_dict_with_its_tied_head():
    trainer, engine_model = tiny_model(3), tiny_model(4, dtype=torch.bfloat16)
    worker = FakeWorker(engine_model)
    state = trainer.state_dict()
    assert "lm_head.weight" in state  # listed beside embed_tokens, on the same memory
    push_buckets(rpc_to(worker), state.items(), weight_sync="shared_file", dtype=torch.bfloat16, bucket_bytes=1 << 30)
    assert all(t.dtype == torch.bfloat16 for call in worker.model_runner.calls for _, t in call)
    for name, param in engine_model.named_parameters():
        assert torch.equal(param, state[name].to(torch.bfloat16)), name


def test_a_worker_that_loads_fewer_tensors_fails_the_push():
    trainer = tiny_model(5)

    def short_rpc(method, args=()):
        return [1]

    with pytest.raises(RolloutError, match="workers loaded"):
        push_buckets(short_rpc, trainer.named_parameters(), weight_sync="shared_file", dtype=torch.float32,
                     bucket_bytes=1 << 30)


def test_zero3_student_is_gathered_a_bucket_at_a_time_and_pushed_under_its_hf_names(monkeypatch):
    import deepspeed

    from trainer.config import DeepSpeedConfig, OptimConfig
    from trainer.student import Student

    start = tiny_model(6)
    student = Student(copy.deepcopy(start), optim=OptimConfig(), deepspeed_config=DeepSpeedConfig(zero_stage=3))
    real_gather = deepspeed.zero.GatheredParameters
    gathered_numels = []

    def recording_gather(params, **kwargs):
        gathered_numels.append(sum(p.ds_numel for p in params))
        return real_gather(params, **kwargs)

    monkeypatch.setattr(deepspeed.zero, "GatheredParameters", recording_gather)
    bucket_numel = 10_000
    largest = max(p.numel() for p in start.parameters())
    engine_model = tiny_model(7)
    worker = FakeWorker(engine_model)
    push_buckets(rpc_to(worker), iter_full_parameters(student.module, zero_stage=3, bucket_numel=bucket_numel),
                 weight_sync="shared_file", dtype=torch.float32, bucket_bytes=1 << 30)
    total = sum(p.numel() for p in start.parameters())
    assert sum(gathered_numels) == total and len(gathered_numels) > 3
    assert max(gathered_numels) < bucket_numel + largest  # never the whole model at once
    for name, param in engine_model.named_parameters():
        assert torch.equal(param, dict(start.named_parameters())[name]), name
