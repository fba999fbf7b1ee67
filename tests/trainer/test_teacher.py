"""The EMA self-teacher against hand-computed averages on a tiny Llama (CPU)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from trainer.config import DeepSpeedConfig, OptimConfig
from trainer.student import Student
from trainer.teacher import EmaTeacher, TeacherError

VOCAB = 64


def tiny_model(seed: int, dtype: torch.dtype = torch.float32, *, tied: bool = False) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=64,
                         tie_word_embeddings=tied)
    return LlamaForCausalLM(config).to(dtype)


def params_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_one_update_is_the_hand_ema():
    initial, student = tiny_model(0), tiny_model(1)
    old, new = params_of(initial), params_of(student)
    teacher = EmaTeacher.from_model(initial, ema_rate=0.3)
    metrics = teacher.update(student.named_parameters())
    after = params_of(teacher.model)
    for name in old:
        assert torch.equal(after[name], (1 - 0.3) * old[name] + 0.3 * new[name])
    assert not torch.equal(after["lm_head.weight"], old["lm_head.weight"])
    distance = math.sqrt(sum(float(((after[n] - new[n]).double() ** 2).sum()) for n in new))
    assert metrics == {"teacher_ema_rate": 0.3, "teacher_student_l2": pytest.approx(distance, rel=1e-9)}
    # a second update averages again, from the first one's result
    teacher.update(student.named_parameters())
    for name, param in teacher.model.named_parameters():
        assert torch.equal(param, (1 - 0.3) * after[name] + 0.3 * new[name])
    # the model handed to from_model was copied, not taken
    assert all(torch.equal(p, old[n]) for n, p in initial.named_parameters())


def test_rate_zero_keeps_the_initial_model_and_rate_one_copies_the_student():
    initial = tiny_model(0)
    old = params_of(initial)
    frozen = EmaTeacher.from_model(initial, ema_rate=0.0)
    copying = EmaTeacher.from_model(initial, ema_rate=1.0)
    for seed in (1, 2, 3):
        student = tiny_model(seed)
        frozen.update(student.named_parameters())
        copying.update(student.named_parameters())
    assert all(torch.equal(p, old[n]) for n, p in frozen.model.named_parameters())
    assert all(torch.equal(p, params_of(student)[n]) for n, p in copying.model.named_parameters())


def test_teacher_is_frozen_and_forwards_without_gradient():
    initial = tiny_model(0)
    reference = copy.deepcopy(initial).eval()
    teacher = EmaTeacher.from_model(initial, ema_rate=0.5, offload=True)  # offload on a CPU trial: a no-op
    assert not teacher.offload and not teacher.model.training
    assert all(not p.requires_grad for p in teacher.model.parameters())
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    with torch.enable_grad():
        logits = teacher.forward_logits(ids, mask)
    assert not logits.requires_grad and logits.grad_fn is None
    assert logits.shape == (2, 7, VOCAB)
    with torch.no_grad():
        assert torch.equal(logits, reference(input_ids=ids, attention_mask=mask, use_cache=False).logits)
    assert torch.allclose(teacher.forward_logits(ids, mask, logits_to_keep=3), logits[:, -3:], atol=1e-6)
    # a loss mixing both sides sends gradient to the student only
    student = tiny_model(1)
    student_logits = student(input_ids=ids, attention_mask=mask, use_cache=False).logits
    (student_logits.log_softmax(-1) * logits.softmax(-1)).sum().backward()
    assert all(p.grad is None for p in teacher.model.parameters())
    assert all(p.grad is not None for p in student.parameters())


def test_bf16_teacher_keeps_an_fp32_average():
    initial, student = tiny_model(0, torch.bfloat16), tiny_model(1, torch.bfloat16)
    teacher = EmaTeacher.from_model(initial, ema_rate=0.01)
    expected = {n: p.float() for n, p in params_of(initial).items()}
    for _ in range(5):
        teacher.update(student.named_parameters())
        for name, value in params_of(student).items():
            expected[name] = (1 - 0.01) * expected[name] + 0.01 * value.float()
    state = teacher.state_dict()
    for name, param in teacher.model.named_parameters():
        assert state[name].dtype == torch.float32 and torch.equal(state[name], expected[name])
        assert param.dtype == torch.bfloat16 and torch.equal(param, expected[name].to(torch.bfloat16))
    # what the rollout engine is given: the live bf16 weights, which are the fp32 average rounded, no copy
    weights = dict(teacher.named_weights())
    for name, param in teacher.model.named_parameters():
        assert weights[name].data_ptr() == param.data_ptr() and torch.equal(weights[name], state[name].to(torch.bfloat16))
    # in bf16 alone 1% steps mostly round away; the fp32 average moved every weight that differs
    moved = sum(int((state[n] != p.float()).sum()) for n, p in params_of(initial).items())
    assert moved > 0.9 * sum(p.numel() for p in initial.parameters())


def test_update_from_a_zero3_student_uses_full_parameters():
    # tied embeddings, as in SmolLM2: the head follows the averaged embedding
    initial, trained = tiny_model(0, tied=True), tiny_model(1, tied=True)
    old, new = params_of(initial), params_of(trained)
    teacher = EmaTeacher.from_model(initial, ema_rate=0.25)
    student = Student(trained, optim=OptimConfig(), deepspeed_config=DeepSpeedConfig(zero_stage=3))
    teacher.update(student.named_full_parameters())
    for name, param in teacher.model.named_parameters():
        assert torch.equal(param, (1 - 0.25) * old[name] + 0.25 * new[name])
    assert teacher.model.lm_head.weight is teacher.model.model.embed_tokens.weight
    with pytest.raises(TeacherError):  # a partitioned module cannot become a teacher
        EmaTeacher(student.module, ema_rate=0.1)


def test_state_dict_round_trip_and_bad_input():
    teacher = EmaTeacher.from_model(tiny_model(0), ema_rate=0.5)
    teacher.update(tiny_model(1).named_parameters())
    other = EmaTeacher.from_model(tiny_model(2), ema_rate=0.5)
    other.load_state_dict(teacher.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(other.model.parameters(), teacher.model.parameters()))
    with pytest.raises(TeacherError):
        teacher.update(list(tiny_model(1).named_parameters())[:-1])  # a parameter missing
    with pytest.raises(TeacherError):
        teacher.load_state_dict({"not.a.weight": torch.zeros(1)})
    with pytest.raises(TeacherError):
        EmaTeacher.from_model(tiny_model(0), ema_rate=1.5)
