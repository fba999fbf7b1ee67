"""The torch-only part of the GPU check: what a machine with CUDA, PyTorch and transformers can prove without vLLM,
Ray or a network, in a minute or two.

    python scripts/gpu_check_torch.py            on a CUDA machine (exit 0: every check passed)

Checks, each printed as it passes (the first failure stops the script with a non-zero exit):
1. device placement: a random Qwen3-architecture model (head_dim 128) on `cuda:0`; the step's tensor path (packing,
   masks, both forwards to the last hidden states, the fused loss and the unfused one with their backward, the
   old log-probs) on CUDA, against the same computation on the CPU in float32;
2. a student step in bf16: the fused loss's backward and torch's fused AdamW on CUDA;
3. the EMA update of a bf16 teacher whose fp32 master lives on the host, against (1 - r) t + r s by hand;
4. the weight push's buckets from CUDA tensors: decoder layers kept whole, host copies in the engine's dtype, and
   CUDA IPC handles opened by another process (the vLLM worker's code, `trainer/vllm_worker.py`);
5. distributed init at world size 1 with the training timeout and the gloo group that waits for rank 0, through
   DeepSpeed when it is installed (then also one ZeRO-2 bf16 step of the student), else through torch alone.
Each check prints the GPU memory it peaked at. Without a CUDA GPU it says so in one line and exits 2.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

LOSS_OPTIONS = dict(divergence="reverse_kl", support="topk_tail", top_k=20, jsd_alpha=0.5, aggregation="token_mean",
                    importance_ratio_clip=2.0, rollout_ratio_clip=2.0, temperature=1.0)


def check(title: str):
    def run(fn):
        torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        detail = fn()
        print(f"ok: {title}: {detail} ({time.perf_counter() - started:.1f} s, "
              f"peak {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB)", flush=True)
        return fn
    return run


def tiny_qwen3(dtype: torch.dtype = torch.float32, seed: int = 0):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=128, tie_word_embeddings=True,
                         initializer_range=0.1, max_position_embeddings=1024)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Qwen3ForCausalLM(config).to(dtype)


def batch_and_loss_inputs(device):
    from trainer.batch import pack

    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 1024, (n,), generator=gen).tolist() for n in (7, 12, 5)]
    responses = [torch.randint(3, 1024, (n,), generator=gen).tolist() for n in (9, 4, 11)]
    student = pack(prompts, responses, pad_id=0, device=device)
    teacher = pack([[1, 2, *p] for p in prompts], responses, pad_id=0, device=device)
    rollout_logps = torch.full(student.response_ids.shape, -2.0, device=device)
    return student, teacher, torch.tensor([True, False, True], device=device), rollout_logps


def step_terms(device, *, fused: bool):
    """Loss, gradient norm and the old log-probs of one micro-batch on `device` (float32)."""
    from trainer.batch import forward_response_hidden, forward_response_logits
    from trainer.head_loss import opsd_loss_from_hidden, token_logps_from_hidden
    from trainer.lm_head import final_hidden_states, lm_head
    from trainer.losses import opsd_loss

    student_model, teacher_model = tiny_qwen3().to(device), tiny_qwen3(seed=1).to(device)
    teacher_model.requires_grad_(False)
    student, teacher, sample_mask, rollout_logps = batch_and_loss_inputs(device)

    def hidden_of(model):
        def forward(ids, mask, hidden_to_keep=0):
            return final_hidden_states(model, lambda **kw: model(input_ids=ids, attention_mask=mask, **kw),
                                       keep=hidden_to_keep)
        return forward

    with torch.no_grad():
        old = token_logps_from_hidden(forward_response_hidden(hidden_of(student_model), student),
                                      lm_head(student_model), student.response_ids, temperature=1.0, chunk_size=4)
    targets = (student.response_ids, student.response_mask, sample_mask)
    if fused:
        with torch.no_grad():
            teacher_hidden = forward_response_hidden(hidden_of(teacher_model), teacher)
        loss, _ = opsd_loss_from_hidden(forward_response_hidden(hidden_of(student_model), student), teacher_hidden,
                                        *targets, student_head=lm_head(student_model), teacher_head=lm_head(teacher_model),
                                        chunk_size=4, old_logps=old, rollout_logps=rollout_logps, **LOSS_OPTIONS)
    else:
        def logits_of(model):
            return lambda ids, mask, logits_to_keep=0: model(input_ids=ids, attention_mask=mask,
                                                             logits_to_keep=logits_to_keep).logits
        with torch.no_grad():
            teacher_logits = forward_response_logits(logits_of(teacher_model), teacher)
        loss, _ = opsd_loss(forward_response_logits(logits_of(student_model), student), teacher_logits, *targets,
                            old_logps=old, rollout_logps=rollout_logps, **LOSS_OPTIONS)
    loss.backward()
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in student_model.parameters()]))
    return float(loss.detach()), float(norm), old.to("cpu")


def check_placement(device):
    for fused in (True, False):
        loss, norm, old = step_terms(device, fused=fused)
        loss_cpu, norm_cpu, old_cpu = step_terms(torch.device("cpu"), fused=fused)
        if not (abs(loss - loss_cpu) <= 1e-4 * abs(loss_cpu) + 1e-6 and abs(norm - norm_cpu) <= 1e-3 * norm_cpu
                and torch.allclose(old, old_cpu, atol=1e-4)):
            sys.exit(f"{'fused' if fused else 'unfused'} loss on {device}: loss {loss} vs CPU {loss_cpu}, "
                     f"gradient norm {norm} vs {norm_cpu}")
    return f"fused and unfused loss, gradients and old log-probs on {device} equal the CPU's (loss {loss:.5f})"


def check_bf16_step(device):
    from trainer.batch import forward_response_hidden
    from trainer.head_loss import opsd_loss_from_hidden
    from trainer.lm_head import final_hidden_states, lm_head

    model, teacher_model = tiny_qwen3(torch.bfloat16).to(device), tiny_qwen3(torch.bfloat16, seed=1).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    student, teacher, sample_mask, rollout_logps = batch_and_loss_inputs(device)
    before = [p.detach().clone() for p in model.parameters()]
    fwd = lambda m, b: forward_response_hidden(  # noqa: E731
        lambda ids, mask, hidden_to_keep=0: final_hidden_states(
            m, lambda **kw: m(input_ids=ids, attention_mask=mask, **kw), keep=hidden_to_keep), b)
    with torch.no_grad():
        teacher_hidden = fwd(teacher_model, teacher)
    loss, _ = opsd_loss_from_hidden(fwd(model, student), teacher_hidden, student.response_ids, student.response_mask,
                                    sample_mask, student_head=lm_head(model), teacher_head=lm_head(teacher_model),
                                    chunk_size=4, rollout_logps=rollout_logps, **LOSS_OPTIONS)
    loss.backward()
    optimizer.step()
    moved = sum(int(not torch.equal(a, b)) for a, b in zip(before, model.parameters()))
    if not (torch.isfinite(loss) and moved):
        sys.exit(f"bf16 step: loss {float(loss)}, {moved} parameters moved")
    return f"loss {float(loss):.4f}, {moved} of {len(before)} parameters moved by torch's fused AdamW"


def check_ema(device):
    from trainer.teacher import EmaTeacher

    teacher = EmaTeacher(tiny_qwen3(torch.bfloat16), ema_rate=0.25, device=device)
    student = {n: p.to(device) for n, p in tiny_qwen3(torch.bfloat16, seed=1).named_parameters()}
    master = {n: t.clone() for n, t in teacher._master.items()}
    if {t.device.type for t in master.values()} != {"cpu"}:
        sys.exit("the bf16 teacher's fp32 master is not on the host")
    metrics = teacher.update(student.items())
    for name, param in teacher.named_weights():
        expected = master[name] * 0.75 + student[name].to("cpu", torch.float32) * 0.25
        if param.device != device or not torch.equal(param.to("cpu"), expected.to(torch.bfloat16)):
            sys.exit(f"EMA update of {name}: not (1 - r) t + r s in bf16 on {device}")
    return f"bf16 weights on {device}, fp32 master on the host, distance {metrics['teacher_student_l2']:.3f}"


def _ipc_worker(connection) -> None:
    """A stand-in vLLM worker in another process: the project's worker extension over a plain model."""
    from trainer.vllm_worker import WeightSyncExtension

    class Runner:
        def __init__(self) -> None:
            self.model = tiny_qwen3(torch.bfloat16, seed=5).cuda()

        def reload_weights(self, weights_iterator) -> None:
            params = dict(self.model.named_parameters(remove_duplicate=False))
            with torch.no_grad():
                for name, tensor in weights_iterator:
                    params[name].copy_(tensor)

    class Worker(WeightSyncExtension):
        def __init__(self) -> None:
            self.model_runner = Runner()

    worker = Worker()
    while (payload := connection.recv()) is not None:
        loaded = worker.opsd_reload_weights_from_ipc(payload)
        connection.send((loaded, {n: float(p.float().sum()) for n, p in worker.model_runner.model.named_parameters()}))


def check_push(device):
    import torch.multiprocessing as mp

    from trainer.weight_push import bucket_transport, group_for_reload, host_copies, push_buckets

    model = tiny_qwen3(torch.bfloat16, seed=3).to(device)
    named = list(model.named_parameters())
    buckets = list(group_for_reload(named, bucket_bytes=1 << 18))
    layers = [{n.split(".self_attn")[0].split(".mlp")[0] for n, _ in b if ".layers." in n} for b in buckets]
    if any(len(a & b) for i, a in enumerate(layers) for b in layers[i + 1:]):
        sys.exit("a decoder layer was split between buckets")
    copies = host_copies(buckets[0], torch.bfloat16)
    if {t.device.type for t in copies.values()} != {"cpu"} or bucket_transport(buckets[0], "cuda_ipc") != "ipc":
        sys.exit("host copies not on the host, or a CUDA bucket not sent by IPC")
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    process = ctx.Process(target=_ipc_worker, args=(child,))
    process.start()
    try:
        def rpc(method, args=()):
            parent.send(args[0])
            loaded, sums = parent.recv()
            rpc.sums = sums
            return [loaded]
        metrics = push_buckets(rpc, named, weight_sync="cuda_ipc", dtype=torch.bfloat16, bucket_bytes=1 << 18)
    finally:
        parent.send(None)
        process.join(60)
    expected = {n: float(p.detach().float().sum()) for n, p in model.named_parameters()}
    if any(abs(rpc.sums[n] - v) > 1e-3 * (1 + abs(v)) for n, v in expected.items()):
        sys.exit("the worker's weights after the IPC push differ from the trainer's")
    return f"{len(buckets)} buckets, layers whole; {metrics['push/tensors']:.0f} tensors opened by another process"


def check_distributed(device):
    from trainer.distributed import init_distributed, teardown_distributed, wait_for_main

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        import datetime

        import torch.distributed as dist
        from trainer.distributed import free_port

        os.environ["MASTER_PORT"] = str(free_port())
        dist.init_process_group("nccl", timeout=datetime.timedelta(seconds=120), device_id=device)
        dist.barrier()
        dist.new_group(backend="gloo", timeout=datetime.timedelta(hours=24))
        dist.destroy_process_group()
        return "NCCL at world size 1 with a 120 s timeout and a gloo group (DeepSpeed not installed: no ZeRO step)"
    info = init_distributed("cuda", collective_timeout_s=120, main_wait_timeout_s=3600)
    wait_for_main()
    from trainer.config import DeepSpeedConfig, OptimConfig
    from trainer.student import Student

    student = Student(tiny_qwen3(torch.bfloat16), optim=OptimConfig(lr=1e-3, micro_batch_size=1),
                      deepspeed_config=DeepSpeedConfig(zero_stage=2, bf16=True), device="cuda")
    ids = torch.randint(3, 1024, (1, 16), device=device)
    loss = student.forward_logits(ids, torch.ones_like(ids)).float().logsumexp(-1).mean()
    student.backward(loss)
    metrics = student.step()
    teardown_distributed()
    if info.backend != "nccl" or not metrics["grad_norm"]:
        sys.exit(f"distributed init: backend {info.backend}, ZeRO-2 step {metrics}")
    return f"NCCL at world size 1, a ZeRO-2 bf16 step through DeepSpeed (grad norm {metrics['grad_norm']:.3f})"


def main() -> None:
    if not torch.cuda.is_available():
        print(f"gpu_check_torch: no CUDA GPU visible to torch {torch.__version__}: nothing to check on this machine")
        sys.exit(2)
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    free, total = torch.cuda.mem_get_info()
    print(f"ok: {torch.cuda.get_device_name(0)}, {free / 2**30:.1f} of {total / 2**30:.1f} GiB free, "
          f"torch {torch.__version__} (CUDA {torch.version.cuda})", flush=True)
    started = time.perf_counter()
    for title, fn in (("device placement", check_placement), ("student step in bf16", check_bf16_step),
                      ("EMA update", check_ema), ("weight push", check_push), ("distributed", check_distributed)):
        check(title)(lambda fn=fn: fn(device))
    print(f"torch-only GPU check passed in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
