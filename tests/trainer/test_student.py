"""The DeepSpeed student against hand-written references on a tiny Llama (CPU, float32)."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trainer.config import DeepSpeedConfig, OptimConfig
from trainer.distributed import broadcast_from_main, run_local_ranks, wait_for_main
from trainer.minibatches import split_minibatches
from trainer.student import Student, build_deepspeed_config


def full_state_dict(student: Student) -> dict[str, torch.Tensor]:
    """A CPU copy of every full parameter by HF name (collective on ZeRO-3)."""
    return {name: tensor.detach().to("cpu", copy=True) for name, tensor in student.named_full_parameters()}

VOCAB = 64
LR = 1e-3
BETAS = (0.9, 0.95)
WEIGHT_DECAY = 0.1
# Below the tiny model's gradient norm (about 2), so clipping acts in every step of these tests.
CLIP = 0.5
# Largest parameter difference allowed after two steps against the micro-batch-for-micro-batch reference.
# ZeRO-3 reduces gradients in its own order (about 1e-6 here, amplified as the accumulation test explains).
ZERO_TOLERANCE = {0: 1e-6, 1: 1e-6, 2: 1e-6, 3: 5e-6}


def tiny_model(seed: int = 0, *, tied: bool = False) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=64,
                         tie_word_embeddings=tied)
    return LlamaForCausalLM(config).float()


def batch(seed: int, rows: int = 4, length: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (rows, length), generator=gen), torch.ones(rows, length, dtype=torch.long)


def next_token_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of one micro batch (all rows have the same length)."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), input_ids[:, 1:].reshape(-1))


def optim_config(micro: int, mini: int = 4, **extra) -> OptimConfig:
    return OptimConfig(lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY, grad_clip=CLIP, micro_batch_size=micro,
                       mini_batch_size=mini, **extra)


def train_student(student: Student, n_steps: int, micro: int, rows: int = 4) -> list[dict]:
    """Each step: one batch of `rows` rows in micro batches of `micro`; each micro batch's loss is its share
    of the batch mean (rows/micro micro batches of equal size)."""
    metrics = []
    for step in range(n_steps):
        input_ids, attention_mask = batch(step, rows)
        for start in range(0, rows, micro):
            ids, mask = input_ids[start:start + micro], attention_mask[start:start + micro]
            loss = next_token_loss(student.forward_logits(ids, mask), ids) * (len(ids) / rows)
            student.backward(loss)
        metrics.append(student.step())
    return metrics


def reference_train(model: torch.nn.Module, n_steps: int, *, clip: float | None = CLIP, rows: int = 4,
                    micro: int | None = None, weight_decay: float = WEIGHT_DECAY) -> tuple[dict[str, torch.Tensor], list[float]]:
    """torch AdamW with clipping by a global norm computed here; the batch-mean loss, its gradient summed
    over micro batches of `micro` rows (default: one backward over the whole batch)."""
    micro = micro or rows
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, eps=1e-8, weight_decay=weight_decay)
    norms = []
    for step in range(n_steps):
        input_ids, attention_mask = batch(step, rows)
        optimizer.zero_grad()
        for start in range(0, rows, micro):
            ids, mask = input_ids[start:start + micro], attention_mask[start:start + micro]
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            (next_token_loss(logits, ids) * (len(ids) / rows)).backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        norm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads))
        norms.append(norm)
        if clip is not None:
            coef = min(1.0, clip / (norm + 1e-6))
            for g in grads:
                g.mul_(coef)
        optimizer.step()
    return {name: p.detach().clone() for name, p in model.named_parameters()}, norms


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b)
    return max(float((a[name] - b[name]).abs().max()) for name in a)


def test_deepspeed_config_follows_the_settings():
    cfg = build_deepspeed_config(OptimConfig(mini_batch_size=32, micro_batch_size=4), DeepSpeedConfig(zero_stage=2),
                                 device="cpu", world_size=2)
    opt = cfg["optimizer"]
    assert opt["type"] == "AdamW" and opt["params"]["torch_adam"] is True
    assert opt["params"]["lr"] == 1e-6 and opt["params"]["weight_decay"] == 0.01 and opt["params"]["betas"] == [0.9, 0.999]
    assert cfg["gradient_clipping"] == 1.0 and cfg["zero_optimization"] == {"stage": 2}
    assert cfg["gradient_accumulation_steps"] == 4  # 32 rollouts over 2 ranks in micro batches of 4
    assert "scheduler" not in cfg  # constant learning rate
    gpu = build_deepspeed_config(OptimConfig(), DeepSpeedConfig(bf16=True), device="cuda", world_size=1)
    assert gpu["optimizer"]["params"]["torch_adam"] is True and gpu["bf16"] == {"enabled": True}
    assert gpu["optimizer"]["params"]["fused"] is True and opt["params"]["fused"] is False


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_gpu_optimizer_is_torchs_fused_adamw_not_deepspeeds_compiled_one(zero_stage, monkeypatch):
    """DeepSpeed's FusedAdam compiles with nvcc at first use and refuses when nvcc's CUDA differs from torch's;
    the GPU config makes DeepSpeed build torch's AdamW with its fused kernel instead (no compilation). The GPU
    config's optimizer, built here by DeepSpeed on the CPU (torch has a fused CPU AdamW too)."""
    import deepspeed.ops.adam

    def no_compiling(*args, **kwargs):
        raise AssertionError("DeepSpeed's FusedAdam was built")

    monkeypatch.setattr(deepspeed.ops.adam, "FusedAdam", no_compiling)
    gpu_optimizer = build_deepspeed_config(optim_config(micro=4), DeepSpeedConfig(), device="cuda",
                                           world_size=1)["optimizer"]
    monkeypatch.setattr("trainer.student.build_deepspeed_config", lambda *a, **k: {
        **build_deepspeed_config(*a, **k), "optimizer": gpu_optimizer})
    student = Student(tiny_model(), optim=optim_config(micro=4), deepspeed_config=DeepSpeedConfig(zero_stage=zero_stage))
    adamw = student.engine.optimizer
    adamw = getattr(adamw, "optimizer", adamw)  # under ZeRO, DeepSpeed's wrapper holds torch's optimizer
    assert type(adamw) is torch.optim.AdamW and adamw.defaults["fused"] is True


@pytest.mark.parametrize("zero_stage", [0, 1, 2, 3])
def test_adamw_steps_match_a_hand_written_reference(zero_stage):
    start = tiny_model()
    expected, norms = reference_train(copy.deepcopy(start), 2)
    unclipped, _ = reference_train(copy.deepcopy(start), 2, clip=None)
    no_decay, _ = reference_train(copy.deepcopy(start), 2, weight_decay=0.0)
    # Clipping and weight decay both move parameters by far more than the tolerance: the comparison checks them.
    assert max_abs_diff(expected, unclipped) > 1e-4 and max_abs_diff(expected, no_decay) > 1e-5

    student = Student(copy.deepcopy(start), optim=optim_config(micro=4), deepspeed_config=DeepSpeedConfig(zero_stage=zero_stage))
    metrics = train_student(student, 2, micro=4)
    assert max_abs_diff(full_state_dict(student), expected) < ZERO_TOLERANCE[zero_stage]
    assert [m["grad_norm"] for m in metrics] == pytest.approx(norms, rel=1e-5)
    assert all(m["lr"] == LR and m["micro_batches"] == 1 for m in metrics)
    assert student.global_steps == 2


@pytest.mark.parametrize("zero_stage", [0, 2, 3])
def test_gradient_accumulation_equals_one_big_batch(zero_stage):
    start = tiny_model(1)
    accumulated = Student(copy.deepcopy(start), optim=optim_config(micro=1),
                          deepspeed_config=DeepSpeedConfig(zero_stage=zero_stage))
    metrics = train_student(accumulated, 2, micro=1)
    assert [m["micro_batches"] for m in metrics] == [4, 4] and accumulated.global_steps == 2
    # The gradient summed over four micro batches is the one-batch gradient: same global norm.
    _, big_batch_norms = reference_train(copy.deepcopy(start), 2)
    assert [m["grad_norm"] for m in metrics] == pytest.approx(big_batch_norms, rel=1e-6)
    # Parameters are compared with a reference that sums the same micro batches: Adam's first steps
    # (update ~ lr * g / |g|) turn last-bit differences of near-zero gradients from a different summation
    # order into ~4e-6 of a 1e-3 update, so bit-level agreement is only meaningful for the same order.
    expected, _ = reference_train(copy.deepcopy(start), 2, micro=1)
    assert max_abs_diff(full_state_dict(accumulated), expected) < ZERO_TOLERANCE[zero_stage]


def test_gradient_checkpointing_gives_the_same_update():
    start = tiny_model(2)
    plain = Student(copy.deepcopy(start), optim=optim_config(micro=2), deepspeed_config=DeepSpeedConfig())
    train_student(plain, 1, micro=2)
    checkpointed = Student(copy.deepcopy(start), optim=optim_config(micro=2, gradient_checkpointing=True),
                           deepspeed_config=DeepSpeedConfig())
    assert checkpointed.module.is_gradient_checkpointing
    train_student(checkpointed, 1, micro=2)
    assert max_abs_diff(full_state_dict(checkpointed), full_state_dict(plain)) < 1e-6


def test_step_without_backward_and_a_missing_rank_are_refused():
    from trainer.student import StudentError

    student = Student(tiny_model(), optim=optim_config(micro=4), deepspeed_config=DeepSpeedConfig())
    with pytest.raises(StudentError):
        student.step()
    with pytest.raises(StudentError, match="world_size is 2"):  # configured for two ranks, started as one
        Student(tiny_model(), optim=optim_config(micro=4), deepspeed_config=DeepSpeedConfig(world_size=2))


@pytest.mark.parametrize("zero_stage,tied", [(0, False), (3, False), (3, True)])
def test_named_full_parameters_are_full_hf_tensors(zero_stage, tied):
    start = tiny_model(3, tied=tied)
    hf_state = {name: p.detach().clone() for name, p in start.named_parameters()}
    student = Student(copy.deepcopy(start), optim=optim_config(micro=4), deepspeed_config=DeepSpeedConfig(zero_stage=zero_stage))
    pushed = dict(student.named_full_parameters())
    assert list(pushed) == list(hf_state)  # HF names, HF order, every parameter once
    assert ("lm_head.weight" in pushed) == (not tied)  # a tied head is the embedding, sent once
    for name, tensor in pushed.items():
        assert tensor.shape == hf_state[name].shape and torch.equal(tensor, hf_state[name])
    ids, mask = batch(9)
    with torch.no_grad():
        logits = start(input_ids=ids, attention_mask=mask, use_cache=False).logits
        assert torch.allclose(student.forward_logits(ids, mask), logits, atol=1e-6)
        assert torch.allclose(student.forward_logits(ids, mask, logits_to_keep=4), logits[:, -4:], atol=1e-6)
    train_student(student, 1, micro=4)
    expected, _ = reference_train(copy.deepcopy(start), 1)
    pushed = dict(student.named_full_parameters())
    assert max_abs_diff(pushed, expected) < 1e-6
    assert max_abs_diff(pushed, hf_state) > 1e-5  # the push sees the step
    if tied:
        assert student.module.lm_head.weight is student.module.model.embed_tokens.weight


def test_minibatch_split_covers_every_item_once():
    rng = np.random.default_rng(0)
    split = split_minibatches(10, 4, 3, rng=rng)
    assert [[len(micro) for micro in mini] for mini in split] == [[2, 2], [2, 2], [2]]
    assert sorted(i for mini in split for micro in mini for i in micro) == list(range(10))
    assert [i for mini in split for micro in mini for i in micro] == np.random.default_rng(0).permutation(10).tolist()
    assert split_minibatches(5, 8, 2, rng=None) == [[[0, 1], [2, 3], [4]]]
    assert split_minibatches(0, 4, 2, rng=None) == []


def test_minibatch_split_over_ranks_gives_equal_micro_batch_counts():
    for n_items, mini, micro in [(10, 4, 2), (9, 4, 3), (7, 7, 2), (33, 8, 4)]:
        per_rank = [split_minibatches(n_items, mini, micro, rng=np.random.default_rng(5), rank=r, world_size=2)
                    for r in range(2)]
        assert len(per_rank[0]) == len(per_rank[1])
        for mini0, mini1 in zip(*per_rank):
            assert len(mini0) == len(mini1) and all(0 < len(m) <= micro for m in mini0 + mini1)
        items = sorted(i for split in per_rank for mini_ in split for m in mini_ for i in m)
        assert items == list(range(n_items))
    # 9 items in mini batches of 4 over 2 ranks: the last single item joins the mini batch before it
    assert [sum(len(m) for m in mini_) for mini_ in split_minibatches(9, 4, 4, rng=None, rank=0, world_size=2)] == [2, 3]
    with pytest.raises(ValueError):
        split_minibatches(3, 3, 1, rng=None, rank=0, world_size=2)  # one rank would need an empty micro batch


def _two_rank_training(rank: int, start_state: dict, zero_stages: list[int]) -> dict:
    """One rank: half of every batch, loss = mean over its half (DeepSpeed averages over the two ranks)."""
    torch.set_num_threads(1)
    results = {}
    for zero_stage in zero_stages:
        model = tiny_model()
        model.load_state_dict(start_state)
        student = Student(model, optim=optim_config(micro=2), deepspeed_config=DeepSpeedConfig(zero_stage=zero_stage,
                                                                                                world_size=2))
        for step in range(2):
            input_ids, attention_mask = batch(step, 4)
            ids, mask = input_ids[2 * rank:2 * rank + 2], attention_mask[2 * rank:2 * rank + 2]
            student.backward(next_token_loss(student.forward_logits(ids, mask), ids))
            student.step()
        results[zero_stage] = full_state_dict(student)
    results["rank"] = torch.distributed.get_rank()
    # Rank 0's objects reach every rank through the group that waits for rank 0 (not the training group).
    wait_for_main()
    results["from_main"] = broadcast_from_main({"sent_by": rank})
    return results


def test_two_ranks_with_half_batches_match_one_rank_on_the_full_batch():
    start = tiny_model(4)
    # The reference sums the gradients of the same two halves (see the accumulation test on why), with one
    # thread like each rank, so that its matrix products add in the same order.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        expected, _ = reference_train(copy.deepcopy(start), 2, micro=2)
    finally:
        torch.set_num_threads(threads)
    start_state = {k: v.clone() for k, v in start.state_dict().items()}
    ranks = run_local_ranks(_two_rank_training, 2, start_state, [0, 2, 3])
    assert [r["rank"] for r in ranks] == [0, 1] and [r["from_main"] for r in ranks] == [{"sent_by": 0}] * 2
    for zero_stage in (0, 2, 3):
        assert max_abs_diff(ranks[0][zero_stage], expected) < ZERO_TOLERANCE[zero_stage]
        assert max_abs_diff(ranks[1][zero_stage], ranks[0][zero_stage]) == 0.0


def _rank_report(rank: int, fail_on: int | None) -> int:
    import torch.distributed as dist

    if rank == fail_on:
        raise ValueError(f"rank {rank} gives up")
    dist.all_reduce(torch.ones(1))
    return rank


def test_local_ranks_report_a_failing_rank_with_its_traceback():
    """(Results in rank order are checked by the two-rank tests.) The peer of a failing rank errors too or
    hangs in its collective; either way the call returns with the first cause in the message."""
    from trainer.distributed import DistributedError

    with pytest.raises(DistributedError, match="rank 1 gives up"):
        run_local_ranks(_rank_report, 2, 1, timeout_s=300)  # start-up of two ranks on a loaded 2-core machine


def reference_train_bf16(model: torch.nn.Module, n_steps: int) -> dict[str, torch.Tensor]:
    """Mixed precision by hand: bf16 forward and gradients, fp32 master weights under torch AdamW (clipped
    by the global norm of the bf16 gradients), masters rounded to bf16 after each step."""
    masters = [torch.nn.Parameter(p.detach().float().clone()) for p in model.parameters()]
    optimizer = torch.optim.AdamW(masters, lr=LR, betas=BETAS, eps=1e-8, weight_decay=WEIGHT_DECAY)
    for step in range(n_steps):
        input_ids, attention_mask = batch(step, 4)
        model.zero_grad()
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        next_token_loss(logits, input_ids).backward()
        grads = [p.grad.float() for p in model.parameters()]
        norm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads))
        for master, grad in zip(masters, grads):
            master.grad = grad * min(1.0, CLIP / (norm + 1e-6))
        optimizer.step()
        with torch.no_grad():
            for param, master in zip(model.parameters(), masters):
                param.copy_(master)
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("zero_stage", [0, 1])
def test_bf16_steps_match_fp32_master_weights_by_hand(zero_stage):
    start = tiny_model(5).to(torch.bfloat16)
    expected = reference_train_bf16(copy.deepcopy(start), 2)
    student = Student(copy.deepcopy(start), optim=optim_config(micro=4),
                      deepspeed_config=DeepSpeedConfig(zero_stage=zero_stage, bf16=True))
    train_student(student, 2, micro=4)
    pushed = full_state_dict(student)
    assert all(t.dtype == torch.bfloat16 for t in pushed.values())
    # equal in bf16: at most a last-bit rounding difference of the fp32 masters, on a handful of weights
    differing = sum(int((pushed[n] != expected[n]).sum()) for n in expected)
    assert differing <= 1e-3 * sum(t.numel() for t in expected.values())
