"""Trial checkpoints: a resumed run continues bit for bit; half-written checkpoints are never picked up."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trainer.checkpoint import (CheckpointError, latest_checkpoint, list_checkpoints, load_checkpoint,
                                save_checkpoint)
from trainer.config import DeepSpeedConfig, OptimConfig
from trainer.distributed import run_local_ranks
from trainer.minibatches import split_minibatches
from trainer.student import Student
from trainer.teacher import EmaTeacher
from tests.trainer.test_student import full_state_dict

VOCAB = 64


def tiny_model(seed: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=64,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config).float()


def build(seed: int, zero_stage: int, world_size: int = 1) -> tuple[Student, EmaTeacher]:
    model = tiny_model(seed)
    teacher = EmaTeacher.from_model(model, ema_rate=0.2)
    optim = OptimConfig(lr=1e-3, mini_batch_size=4, micro_batch_size=2, grad_clip=0.5)
    ds = DeepSpeedConfig(zero_stage=zero_stage, world_size=world_size)
    return Student(model, optim=optim, deepspeed_config=ds), teacher


def train_steps(student: Student, teacher: EmaTeacher, sampler: np.random.Generator, steps: range, *,
                rank: int = 0, world_size: int = 1) -> list[float]:
    """A miniature trial step: data from the sampler, shuffles and weights from the global python, numpy and
    torch generators (a resume that forgot one of them would diverge), two optimizer steps, one EMA update.
    With two ranks each takes half of every mini batch."""
    losses = []
    for _ in steps:
        input_ids = torch.as_tensor(sampler.integers(0, VOCAB, size=(8, 9)))
        input_ids = input_ids[torch.randperm(8)]
        weight = 1.0 + random.random() + float(np.random.rand())
        for mini in split_minibatches(8, 4, 2, rng=sampler, rank=rank, world_size=world_size):
            for micro in mini:
                ids = input_ids[micro]
                mask = torch.ones_like(ids)
                student_logps = student.forward_logits(ids, mask).log_softmax(-1)
                teacher_logps = teacher.forward_logits(ids, mask).log_softmax(-1)
                kl = (student_logps.exp() * (student_logps - teacher_logps)).sum(-1).mean()
                ce = F.nll_loss(student_logps[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
                loss = (ce + weight * kl) * len(micro) / (4 // world_size)
                student.backward(loss)
                losses.append(float(loss.detach()))
            student.step()
        teacher.update(student.named_full_parameters())
    return losses


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@pytest.mark.parametrize("zero_stage", [0, 3])
def test_resume_reproduces_the_uninterrupted_run_bit_for_bit(tmp_path, zero_stage):
    seed_everything(7)
    student, teacher = build(0, zero_stage)
    sampler = np.random.default_rng(11)
    straight_losses = train_steps(student, teacher, sampler, range(4))
    straight_student, straight_teacher = full_state_dict(student), teacher.state_dict()

    seed_everything(7)
    student, teacher = build(0, zero_stage)
    sampler = np.random.default_rng(11)
    first_losses = train_steps(student, teacher, sampler, range(2))
    save_checkpoint(tmp_path, step=2, student=student, teacher=teacher, sampler_state=sampler.bit_generator.state,
                    metadata={"note": "after step 2"})
    train_steps(student, teacher, sampler, range(1))  # the process goes on a little, then dies

    # A fresh process: other seeds, other initial weights, everything restored from the checkpoint.
    seed_everything(123)
    student, teacher = build(5, zero_stage)
    state = load_checkpoint(latest_checkpoint(tmp_path), student=student, teacher=teacher)
    assert state.step == 2 and state.metadata == {"note": "after step 2"}
    assert student.global_steps == 4  # two optimizer steps per trial step
    sampler = np.random.default_rng()
    sampler.bit_generator.state = state.sampler_state
    resumed_losses = train_steps(student, teacher, sampler, range(2))

    assert first_losses + resumed_losses == straight_losses
    resumed_student, resumed_teacher = full_state_dict(student), teacher.state_dict()
    assert all(torch.equal(resumed_student[n], straight_student[n]) for n in straight_student)
    assert all(torch.equal(resumed_teacher[n], straight_teacher[n]) for n in straight_teacher)
    assert not torch.equal(resumed_teacher["lm_head.weight"], resumed_student["lm_head.weight"])


def test_resume_without_the_rng_states_diverges(tmp_path):
    """The bit-exact test above can fail: dropping the RNG restore changes the continuation."""
    seed_everything(7)
    student, teacher = build(0, 0)
    sampler = np.random.default_rng(11)
    train_steps(student, teacher, sampler, range(1))
    save_checkpoint(tmp_path, step=1, student=student, teacher=teacher, sampler_state=sampler.bit_generator.state)
    expected = train_steps(student, teacher, sampler, range(1))
    seed_everything(123)
    student, teacher = build(0, 0)
    state = load_checkpoint(tmp_path / "step-00000001", student=student, teacher=teacher, restore_rng=False)
    sampler = np.random.default_rng()
    sampler.bit_generator.state = state.sampler_state
    assert train_steps(student, teacher, sampler, range(1)) != expected


def test_half_written_checkpoints_are_ignored_and_old_ones_pruned(tmp_path):
    student, teacher = build(0, 0)
    assert latest_checkpoint(tmp_path) is None and latest_checkpoint(tmp_path / "absent") is None
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step=step, student=student, teacher=teacher, sampler_state={"i": step}, keep_last=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 3]
    assert not (tmp_path / "step-00000001").exists()

    # A process killed while writing step 4 leaves its temporary folder, complete-looking or not.
    stale = tmp_path / ".tmp-step-00000004"
    (stale / "student").mkdir(parents=True)
    (stale / "trainer_state.json").write_text(json.dumps({"format": 1, "step": 4}))
    assert latest_checkpoint(tmp_path) == tmp_path / "step-00000003"
    state = load_checkpoint(latest_checkpoint(tmp_path), student=student, teacher=teacher)
    assert state.step == 3 and state.sampler_state == {"i": 3}
    with pytest.raises(CheckpointError):
        load_checkpoint(stale, student=student, teacher=teacher)

    # The next save clears the leftover; saving an existing step replaces it.
    save_checkpoint(tmp_path, step=3, student=student, teacher=teacher, sampler_state={"i": "again"}, keep_last=2)
    assert not stale.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000002", "step-00000003"]
    assert json.loads((tmp_path / "step-00000003" / "trainer_state.json").read_text())["sampler_state"] == {"i": "again"}
    with pytest.raises(CheckpointError):
        save_checkpoint(tmp_path, step=5, student=student, teacher=teacher, metadata={"bad": object()})
    assert latest_checkpoint(tmp_path) == tmp_path / "step-00000003"


def _two_rank_resume(rank: int, root: str) -> dict:
    """On each of two ranks (ZeRO-2: each holds half the optimizer state): straight run vs resumed run."""
    torch.set_num_threads(1)
    seed_everything(7)
    student, teacher = build(0, 2, world_size=2)
    sampler = np.random.default_rng(11)
    straight = train_steps(student, teacher, sampler, range(2), rank=rank, world_size=2)
    straight_student = full_state_dict(student)

    seed_everything(7)
    student, teacher = build(0, 2, world_size=2)
    sampler = np.random.default_rng(11)
    first = train_steps(student, teacher, sampler, range(1), rank=rank, world_size=2)
    save_checkpoint(root, step=1, student=student, teacher=teacher, sampler_state=sampler.bit_generator.state)

    seed_everything(123 + rank)
    student, teacher = build(5, 2, world_size=2)
    state = load_checkpoint(latest_checkpoint(root), student=student, teacher=teacher)
    sampler = np.random.default_rng()
    sampler.bit_generator.state = state.sampler_state
    resumed = train_steps(student, teacher, sampler, range(1), rank=rank, world_size=2)
    resumed_student = full_state_dict(student)
    return {"straight": straight, "resumed": first + resumed,
            "same_params": all(torch.equal(resumed_student[n], straight_student[n]) for n in straight_student),
            "files": sorted(p.name for p in (latest_checkpoint(root) / "student" / "engine").iterdir())}


def test_two_rank_zero2_resume_is_bit_exact(tmp_path):
    ranks = run_local_ranks(_two_rank_resume, 2, str(tmp_path))
    for result in ranks:
        assert result["resumed"] == result["straight"] and result["same_params"]
    assert ranks[0]["straight"] != ranks[1]["straight"]  # the ranks trained on different halves
    # one optimizer-state partition per rank, and one RNG file per rank
    assert sum("optim_states" in name for name in ranks[0]["files"]) == 2
    assert sorted(p.name for p in (tmp_path / "step-00000001").glob("rng-rank*.pt")) == ["rng-rank000.pt",
                                                                                         "rng-rank001.pt"]
