"""The training step with its model on a device that is not the CPU: no operation may mix devices.

A GPU trial's step 1 fails when one tensor stays on the host: token ids packed on the CPU against a CUDA
embedding, a mask or the rollout log-probs on the CPU against CUDA log-probs. On a CPU-only machine the model
goes to the second device of tests/trainer/second_device.py, which refuses every operation that mixes host and
device tensors as CUDA does. The real `opsd_step` then runs its whole tensor path there: packing, masks, the
old and the rollout log-probs, both forwards, the fused and the unfused loss with its backward, AdamW, the weight
push's buckets and the EMA update (also from an fp32 master held on the host, as a bf16 teacher has one), and
computes exactly what the same step computes on the CPU.

DeepSpeed's engine is replaced by `PassThroughEngine` (its CPU accelerator moves the model back to the CPU);
what the test relies on is what DeepSpeed's `engine.forward` does: it passes its inputs through unchanged
(deepspeed/runtime/engine.py). On a GPU machine `scripts/gpu_check.sh` runs this file with the model on CUDA
(`OPSD_PLACEMENT_DEVICE=cuda`), where DeepSpeed's real engine is used.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

from tests.trainer.fake_vllm import FakeWorker, rpc_to
from tests.trainer.test_trial_phases import FailingGrader
from trainer.config import TrialConfig
from trainer.data import PromptSampler, load_problems, make_split
from trainer.distributed import DistInfo
from trainer.models import load_causal_lm, load_tokenizer
from trainer.prompts import student_prompt_ids
from trainer.rollout import Rollout
from trainer.runtime import TrialRuntime
from trainer.student import Student, build_deepspeed_config
from trainer.teacher import EmaTeacher
from trainer.trial import opsd_step
from trainer.weight_push import push_buckets

ON_CUDA = os.environ.get("OPSD_PLACEMENT_DEVICE") == "cuda"


class PassThroughEngine:
    """The part of DeepSpeed's engine the step uses, over a plain module and torch's AdamW: inputs go to the
    module unchanged, as DeepSpeed passes them."""

    def __init__(self, module: torch.nn.Module, cfg: TrialConfig) -> None:
        self.module = module
        self.optimizer = torch.optim.AdamW(module.parameters(), lr=cfg.optim.lr, betas=cfg.optim.betas,
                                           weight_decay=cfg.optim.weight_decay, foreach=False)
        self.grad_clip = cfg.optim.grad_clip
        self.global_steps = 0
        self._norm = None

    def __call__(self, **inputs):
        return self.module(**inputs)

    def backward(self, loss: torch.Tensor, scale_wrt_gas: bool = False) -> None:
        loss.backward()

    def step(self) -> None:
        self._norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.grad_clip, foreach=False)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_steps += 1

    def get_global_grad_norm(self) -> torch.Tensor:
        return self._norm

    def get_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]


def student_on(model: torch.nn.Module, cfg: TrialConfig, device: torch.device) -> Student:
    if device.type == "cuda":  # the real DeepSpeed engine: a GPU has the accelerator it expects
        return Student(model, optim=cfg.optim, deepspeed_config=cfg.deepspeed, device="cuda")
    student = Student.__new__(Student)
    student.dist = DistInfo(rank=0, world_size=1, local_rank=0, backend="gloo")
    student.device, student.zero_stage = "cpu", 0
    student.ds_config = build_deepspeed_config(cfg.optim, cfg.deepspeed, device="cpu", world_size=1)
    student.engine = PassThroughEngine(model, cfg)
    student._micro_batches, student._clip_norm = 0, None
    return student


class ScriptedEngine:
    """Rollouts of fixed random tokens; each push goes through the real bucketing into a worker extension."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype) -> None:
        self.worker = FakeWorker(copy.deepcopy(model).to("cpu"))
        self.dtype = dtype
        self.pushes = 0

    def generate(self, prompts, *, n, temperature, top_p=1.0, max_tokens, seed=None) -> list[list[Rollout]]:
        gen = torch.Generator().manual_seed(seed)
        vocab = self.worker.model_runner.model.config.vocab_size
        return [[Rollout(token_ids=(ids := torch.randint(0, vocab, (max_tokens,), generator=gen).tolist()),
                         logps=[-2.5] * len(ids), text="```python\nx = 1\n```", finish_reason="length")
                 for _ in range(n)] for _ in prompts]

    def push_weights(self, named) -> dict[str, float]:
        metrics = push_buckets(rpc_to(self.worker), named, weight_sync="shared_file", dtype=self.dtype,
                               bucket_bytes=1 << 16)
        self.pushes += 1
        return {"push/seconds": 0.0, **metrics}

    def sleep(self) -> None:
        pass


def run_step(tiny_qwen3_dir, device: torch.device, *, dtype: str, chunk_size: int | None):
    cfg = TrialConfig.model_validate({
        "model": {"path": str(tiny_qwen3_dir), "dtype": dtype}, "data": {"max_problems": 2},
        "context": {"name": "feedback"},
        "rollout": {"prompts_per_step": 2, "n_samples": 2, "max_response_tokens": 6},
        # two mini-batches: the old log-probs and the importance ratio; the rollout correction too
        "optim": {"lr": 1e-3, "mini_batch_size": 2, "micro_batch_size": 1},
        "loss": {"chunk_size": chunk_size, "rollout_ratio_clip": 2.0},
        "teacher": {"ema_rate": 0.5}})
    tokenizer = load_tokenizer(tiny_qwen3_dir)
    problems = load_problems(cfg.data)
    split = make_split(problems, cfg.data)
    torch.manual_seed(0)
    # Eager attention: on the CPU, SDPA picks a fused kernel that the second device (math form) does not have,
    # and the comparison with the CPU's step is exact only when both compute alike.
    model = load_causal_lm(tiny_qwen3_dir, dtype=dtype, attn_implementation="eager").to(device)
    teacher = EmaTeacher.from_model(model, ema_rate=cfg.teacher.ema_rate, device=device)
    with torch.no_grad():
        for param in teacher.model.parameters():
            param.add_(0.05)  # a teacher away from the student: the KL and its gradient are not zero
    student = student_on(model, cfg, device)
    engine = ScriptedEngine(model, dtype=getattr(torch, dtype))
    trial = TrialRuntime(cfg=cfg, rank=0, tokenizer=tokenizer, engine=engine, grader=FailingGrader(),
                         student=student, teacher=teacher, split=split, sampler=PromptSampler(split.train, seed=0),
                         prompt_ids={p.id: student_prompt_ids(tokenizer, p) for p in problems}, hints={},
                         pad_id=tokenizer.pad_token_id, model_path=tiny_qwen3_dir, device=device)
    metrics, _ = opsd_step(trial, 1)
    return trial, metrics


def on_host(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to("cpu")


@pytest.mark.parametrize("dtype,chunk_size", [("float32", 256), ("float32", None), ("bfloat16", 256)])
def test_step_runs_on_a_device_that_is_not_the_cpu_and_computes_what_the_cpu_does(tiny_qwen3_dir, dtype, chunk_size):
    if ON_CUDA:
        device_context, reference_device = _cuda(), None
    else:
        from tests.trainer.second_device import second_device

        device_context, reference_device = second_device(), torch.device("cpu")
    with device_context as device:
        trial, metrics = run_step(tiny_qwen3_dir, device, dtype=dtype, chunk_size=chunk_size)
        weights = {name: on_host(p) for name, p in trial.student.named_full_parameters()}
        teacher = {name: on_host(p) for name, p in trial.teacher.named_weights()}
        # The step trained on the device, and the weights stayed there.
        assert metrics["optimizer_steps"] == 2 and metrics["loss_tokens"] > 0 and metrics["kl"] > 0
        assert metrics["importance_weight_mean"] > 0
        assert {p.device for p in trial.student.module.parameters()} == {device}
        assert {p.device for _, p in trial.teacher.named_weights()} == {device}
    # The engine's worker got the new weights through the buckets, as host tensors in the engine's dtype.
    pushed = dict(trial.engine.worker.model_runner.model.named_parameters())
    assert trial.engine.pushes == 1 and all(torch.equal(pushed[n], w) for n, w in weights.items())
    if reference_device is None:
        return
    reference, reference_metrics = run_step(tiny_qwen3_dir, reference_device, dtype=dtype, chunk_size=chunk_size)
    # The same arithmetic up to the kernels' summation order (strided views on the device side).
    rel = 1e-3 if dtype == "float32" else 2e-2
    for key in ("loss", "kl", "grad_norm", "importance_weight_mean", "teacher_student_l2", "reward"):
        assert metrics[key] == pytest.approx(reference_metrics[key], rel=rel), key
    if dtype == "float32":
        for name, tensor in reference.student.named_full_parameters():
            torch.testing.assert_close(weights[name], tensor.detach(), rtol=rel, atol=1e-5, msg=name)
        for name, tensor in reference.teacher.named_weights():
            torch.testing.assert_close(teacher[name], tensor.detach(), rtol=rel, atol=1e-5, msg=name)
    else:  # bf16 rounds Adam's ±lr steps of near-zero gradients either way: compare the update's direction
        initial = dict(load_causal_lm(tiny_qwen3_dir, dtype=dtype).named_parameters())
        for name, tensor in reference.student.named_full_parameters():
            ours, theirs = (weights[name] - initial[name].detach()).float(), (tensor.detach() - initial[name].detach()).float()
            if not theirs.any():  # steps below bf16's resolution (norm weights of 1.0): no move on either side
                assert not ours.any(), name
                continue
            cosine = float((ours * theirs).sum() / (ours.norm() * theirs.norm()))
            assert cosine > 0.98, (name, cosine)


def test_the_second_device_refuses_what_cuda_refuses():
    """The harness itself: a host index tensor against a device embedding, and a host mask against device
    values, raise; moves between the devices do not."""
    from tests.trainer.second_device import DeviceMixError, second_device

    with second_device() as device:
        embedding = torch.nn.Embedding(8, 4).to(device)
        ids = torch.tensor([[1, 2, 3]])
        with pytest.raises(DeviceMixError, match="embedding"):
            embedding(ids)
        values = embedding(ids.to(device))
        assert values.device == device
        with pytest.raises(DeviceMixError):
            values.sum(-1) * torch.ones(1, 3)
        assert float((values.sum(-1) * torch.ones(1, 3, device=device)).sum().detach()) == pytest.approx(
            float(embedding.weight.detach().to("cpu")[[1, 2, 3]].sum()))
        assert (values * torch.tensor(2.0)).device == device  # a 0-dim host scalar is allowed, as on CUDA


class _cuda:
    def __enter__(self) -> torch.device:
        if not torch.cuda.is_available():
            pytest.skip("OPSD_PLACEMENT_DEVICE=cuda without a CUDA GPU")
        return torch.device("cuda", 0)

    def __exit__(self, *exc) -> None:
        return None
