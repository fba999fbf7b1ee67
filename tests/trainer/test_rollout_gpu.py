"""The GPU branches of the rollout engine against a transformers forward pass of the same weights, on one
CUDA GPU (float32). Run by scripts/gpu_check.sh; skipped on machines without CUDA.

- the default 'shared_file' push from CUDA tensors (the CPU tests' path; here its device-to-host copy),
- the opt-in 'cuda_ipc' push from CUDA tensors, and an offloaded teacher's host tensors under 'cuda_ipc'
  (they must take the file, since IPC handles exist only for device memory),
- the opt-in sleep mode: `sleep` frees GPU memory, the engine refuses work, the next push wakes it,
- a ZeRO-3 student (one NCCL rank in a child process) gathered a bucket at a time and pushed through CUDA
  IPC (its 'shared_file' push is tests/trainer/test_weight_push.py's, on CPU).
"""

from __future__ import annotations

import pytest
import torch

from tests.trainer.test_rollout import reference_logps
from trainer.rollout import RolloutEngine, RolloutError

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# vLLM's GPU kernels and transformers' differ more than on CPU, but far less than a weight change moves
# log-probs (the pushes below change them by more than 0.1).
TOL = 5e-3
# Two engines may be alive at once (the module's and one test's); each takes this share of the GPU.
GPU_SHARE = 0.25


def engine_for(model_dir, **options) -> RolloutEngine:
    return RolloutEngine(model_dir, dtype="float32", seed=0, max_model_len=512, device="cuda",
                         gpu_memory_utilization=GPU_SHARE, **options)


@pytest.fixture(scope="module")
def opt_in_engine(tiny_qwen3_dir):
    """The GPU-only settings together: CUDA IPC pushes and sleep mode."""
    with engine_for(tiny_qwen3_dir, weight_sync="cuda_ipc", sleep_mode=True) as engine:
        yield engine


@pytest.fixture
def trainer_model(tiny_qwen3_dir):
    from trainer.models import load_causal_lm

    return load_causal_lm(tiny_qwen3_dir, dtype="float32", device="cuda")


def perturb(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_((torch.randn(param.shape, generator=gen) * 0.05).to(param.device))


def logps(engine: RolloutEngine, prompt: list[int], completion: list[int]) -> torch.Tensor:
    return torch.tensor(engine.logprobs_of(prompt, completion), dtype=torch.float64)


def reference(model: torch.nn.Module, prompt: list[int], completion: list[int]) -> torch.Tensor:
    return reference_logps(model.to("cpu"), prompt, completion).to(torch.float64)


PROMPT, COMPLETION = list(range(100, 140)), list(range(2000, 2024))


def check_push(engine: RolloutEngine, model: torch.nn.Module, named, *, seed: int) -> dict[str, float]:
    """Perturb `model`, push `named()` of it, and check that the engine now computes what `model` does."""
    before = logps(engine, PROMPT, COMPLETION)
    perturb(model, seed)
    metrics = engine.push_weights(named())
    after = logps(engine, PROMPT, COMPLETION)
    expected = reference(model, PROMPT, COMPLETION)
    model.to("cuda")
    assert torch.allclose(after, expected, atol=TOL, rtol=0), (after - expected).abs().max()
    assert (after - before).abs().max() > 20 * TOL  # the push changed what the engine computes
    return metrics


def test_default_shared_file_push_from_gpu_tensors(tiny_qwen3_dir, trainer_model):
    with engine_for(tiny_qwen3_dir) as engine:
        metrics = check_push(engine, trainer_model, trainer_model.named_parameters, seed=1)
        assert metrics["push/file_buckets"] >= 1 and metrics["push/ipc_buckets"] == 0
        engine.sleep()  # without sleep mode: nothing happens, the engine keeps working
        assert not engine.asleep and engine.logprobs_of(PROMPT, COMPLETION)


def test_cuda_ipc_push_from_gpu_tensors(opt_in_engine, trainer_model):
    metrics = check_push(opt_in_engine, trainer_model, trainer_model.named_parameters, seed=2)
    assert metrics["push/ipc_buckets"] >= 1 and metrics["push/file_buckets"] == 0
    # a state dict lists the tied head beside the embedding, on the same GPU memory
    metrics = check_push(opt_in_engine, trainer_model, lambda: trainer_model.state_dict().items(), seed=3)
    assert metrics["push/ipc_buckets"] >= 1


def test_cuda_ipc_setting_sends_an_offloaded_teachers_host_weights_by_file(opt_in_engine, trainer_model):
    from trainer.teacher import EmaTeacher

    teacher = EmaTeacher.from_model(trainer_model, ema_rate=0.5, offload=True, device="cuda")
    assert all(not t.is_cuda for _, t in teacher.named_weights())
    metrics = check_push(opt_in_engine, teacher.model, teacher.named_weights, seed=4)
    assert metrics["push/file_buckets"] >= 1 and metrics["push/ipc_buckets"] == 0


def test_sleep_frees_gpu_memory_and_the_next_push_wakes_the_engine(opt_in_engine, trainer_model):
    opt_in_engine.push_weights(trainer_model.named_parameters())
    awake = logps(opt_in_engine, PROMPT, COMPLETION)
    torch.cuda.synchronize()
    free_before = torch.cuda.mem_get_info()[0]
    opt_in_engine.sleep()
    freed = torch.cuda.mem_get_info()[0] - free_before
    # the KV cache is most of the engine's share of the GPU
    assert freed > 0.3 * GPU_SHARE * torch.cuda.mem_get_info()[1], freed
    with pytest.raises(RolloutError, match="asleep"):
        opt_in_engine.logprobs_of(PROMPT, COMPLETION)
    opt_in_engine.push_weights(trainer_model.named_parameters())  # wakes weights, loads, wakes the KV cache
    assert not opt_in_engine.asleep
    assert torch.allclose(logps(opt_in_engine, PROMPT, COMPLETION), awake, atol=1e-5, rtol=0)
    assert torch.cuda.mem_get_info()[0] < free_before + 0.1 * freed  # the memory is the engine's again


def _zero3_push(rank: int, model_dir: str) -> dict[str, float]:
    """One NCCL rank: a ZeRO-3 student pushed into an engine on the same GPU, gathered in small buckets."""
    import copy

    from trainer.config import DeepSpeedConfig, OptimConfig
    from trainer.models import load_causal_lm
    from trainer.student import Student, iter_full_parameters

    model = load_causal_lm(model_dir, dtype="float32", device="cuda")
    perturb(model, 5)
    expected = reference(copy.deepcopy(model), PROMPT, COMPLETION)
    student = Student(model, optim=OptimConfig(), deepspeed_config=DeepSpeedConfig(zero_stage=3), device="cuda")
    with engine_for(model_dir, weight_sync="cuda_ipc", push_bucket_gib=2**-10) as engine:  # 1 MiB: several buckets
        metrics = engine.push_weights(iter_full_parameters(student.module, zero_stage=3, bucket_numel=200_000))
        got = logps(engine, PROMPT, COMPLETION)
    return {**metrics, "max_diff": float((got - expected).abs().max())}


def test_zero3_student_pushed_a_bucket_at_a_time_through_cuda_ipc(tiny_qwen3_dir):
    from trainer.distributed import run_local_ranks

    # A child process: the NCCL process group and the partitioned model stay out of this one.
    (result,) = run_local_ranks(_zero3_push, 1, str(tiny_qwen3_dir), device="cuda", timeout_s=600)
    assert result["max_diff"] < TOL
    assert result["push/ipc_buckets"] >= 2 and result["push/file_buckets"] == 0
