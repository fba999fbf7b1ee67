"""Which weights the rollout engine holds in each phase of a training step and of an evaluation, and when it
sleeps: the real `opsd_step` and evaluation over a fake engine that records its calls, with the real tiny
student (DeepSpeed, CPU) and EMA teacher.

The fake engine tells the weights it was given apart by value (the teacher starts away from the student), so
the tests see what a GPU trial with `rollout.sleep_between_phases` would do, without vLLM.
"""

from __future__ import annotations

import pytest
import torch

from sandbox.grader import Verdict
from trainer.config import TrialConfig
from trainer.data import PromptSampler, load_problems, make_split
from trainer.models import load_causal_lm, load_tokenizer
from trainer.prompts import student_prompt_ids
from trainer.rollout import Rollout
from trainer.runtime import TrialRuntime
from trainer.student import Student
from trainer.teacher import EmaTeacher
from trainer.trial import _evaluate, opsd_step


class RecordingEngine:
    """Samples random tokens; records (call, whose weights it holds) and refuses work while asleep."""

    def __init__(self, vocab_size: int, student: Student, teacher: EmaTeacher) -> None:
        self.vocab_size, self.student, self.teacher = vocab_size, student, teacher
        self.events: list[tuple[str, ...]] = []
        self.holding = "student"
        self.asleep = False
        self._gen = torch.Generator().manual_seed(0)

    def _whose(self, pushed: dict[str, torch.Tensor]) -> str:
        for who, weights in (("teacher", self.teacher.named_weights),
                             ("student", self.student.named_full_parameters)):
            weights = dict(weights())
            if list(weights) == list(pushed) and all(torch.equal(weights[n], pushed[n]) for n in pushed):
                return who
        return "neither"

    def push_weights(self, named) -> dict[str, float]:
        self.holding = self._whose({name: tensor.detach().clone() for name, tensor in named})
        self.asleep = False
        self.events.append(("push", self.holding))
        return {"push/seconds": 0.0}

    def sleep(self) -> None:
        self.asleep = True
        self.events.append(("sleep",))

    def generate(self, prompts, *, n, temperature, top_p=1.0, max_tokens, seed=None) -> list[list[Rollout]]:
        assert not self.asleep
        self.events.append(("generate", self.holding))
        return [[self._rollout(max_tokens) for _ in range(n)] for _ in prompts]

    def score(self, sequences) -> list[list[float]]:
        assert not self.asleep
        self.events.append(("score", self.holding))
        return [[-1.0] * len(completion) for _, completion in sequences]

    def _rollout(self, max_tokens: int) -> Rollout:
        ids = torch.randint(0, self.vocab_size, (max_tokens,), generator=self._gen).tolist()
        return Rollout(token_ids=ids, logps=[-1.0] * max_tokens, text="```python\nx = 1\n```", finish_reason="length")


class FailingGrader:
    def grade_many(self, requests) -> list[Verdict]:
        return [Verdict(verdict="wrong_answer", passed=False, tests_passed=0, tests_total=1,
                        feedback="Wrong answer on test 1.") for _ in requests]


def runtime(tiny_model_dir, *, sleep_between_phases: bool) -> TrialRuntime:
    cfg = TrialConfig.model_validate({
        "model": {"path": str(tiny_model_dir)}, "data": {"max_problems": 2},
        "rollout": {"prompts_per_step": 2, "n_samples": 2, "max_response_tokens": 4},
        "optim": {"lr": 1e-3, "mini_batch_size": 4, "micro_batch_size": 2},
        "teacher": {"ema_rate": 0.5}, "eval": {"n_samples": 1, "teacher_n_samples": 1}})
    # The setting as a GPU trial has it (the config refuses it on CPU); the student still trains on the CPU.
    rollout = cfg.rollout.model_copy(update={"sleep_between_phases": sleep_between_phases})
    cfg = cfg.model_copy(update={"rollout": rollout})
    tokenizer = load_tokenizer(tiny_model_dir)
    problems = load_problems(cfg.data)
    split = make_split(problems, cfg.data)
    model = load_causal_lm(tiny_model_dir)
    teacher = EmaTeacher.from_model(model, ema_rate=cfg.teacher.ema_rate)
    with torch.no_grad():
        for param in teacher.model.parameters():
            param.add_(0.01)
    student = Student(model, optim=cfg.optim, deepspeed_config=cfg.deepspeed)
    engine = RecordingEngine(model.config.vocab_size, student, teacher)
    trial = TrialRuntime(cfg=cfg, rank=0, tokenizer=tokenizer, engine=engine, grader=FailingGrader(),
                         student=student, teacher=teacher, split=split, sampler=PromptSampler(split.train, seed=0),
                         prompt_ids={p.id: student_prompt_ids(tokenizer, p) for p in problems}, hints={},
                         pad_id=tokenizer.pad_token_id, model_path=tiny_model_dir)
    # The phases the engine must not see: every optimizer step and the EMA update.
    for obj, method in ((student, "step"), (teacher, "update")):
        real = getattr(obj, method)

        def recorded(*args, _real=real, _name=method, **kwargs):
            engine.events.append((_name,))
            return _real(*args, **kwargs)

        setattr(obj, method, recorded)
    return trial


@pytest.mark.parametrize("sleep_between_phases", [True, False])
def test_engine_sleeps_from_after_the_rollouts_until_the_push_of_the_new_weights(tiny_model_dir, sleep_between_phases):
    trial = runtime(tiny_model_dir, sleep_between_phases=sleep_between_phases)
    metrics, _ = opsd_step(trial, 1)
    slept = [("sleep",)] if sleep_between_phases else []
    # 4 rollouts in one mini-batch: one optimizer step; the push wakes the engine with the new student
    assert trial.engine.events == [("generate", "student"), *slept, ("step",), ("push", "student"), ("update",)]
    assert metrics["optimizer_steps"] == 1 and not trial.engine.asleep


def test_evaluation_gives_the_teacher_its_turn_last_and_restores_the_student(tiny_model_dir):
    trial = runtime(tiny_model_dir, sleep_between_phases=True)
    metrics = _evaluate(trial)
    # validation decoding, train-time decoding, the reference solutions' log-probs: all the student's;
    # then the teacher's answers; then every rank pushes the student back (no copy was kept meanwhile)
    assert trial.engine.events == [("generate", "student"), ("generate", "student"), ("score", "student"),
                                   ("push", "teacher"), ("generate", "teacher"), ("push", "student")]
    assert metrics["val_problems"] == 2 and metrics["teacher_acc"] == 0.0
    assert not hasattr(trial, "student_weights")
