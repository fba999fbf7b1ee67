"""trainer/evaluate.py's evaluation on a scripted engine and grader: which samples are drawn and how they are scored."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest

from sandbox.grader import Verdict
from tests.trainer.copy_task import copy_problems
from trainer.config import TrialConfig
from trainer.evaluate import evaluate, validation_is_train_time_decoding
from trainer.models import load_tokenizer
from trainer.rollout import Rollout


def _hit(seed: int, problem: int, sample: int, temperature: float) -> bool:
    return random.Random(f"{seed}/{problem}/{sample}/{temperature}").random() < 0.5


class ScriptedEngine:
    """Answers `print(<the problem's number>)` or `print(0)` depending on the seed, temperature and sample, and
    records every generate call."""

    def __init__(self, problems):
        self.answers = [p.solution for p in problems]
        self.calls = []

    def generate(self, prompts, *, n, temperature, top_p, max_tokens, seed):
        self.calls.append({"prompts": len(prompts), "n": n, "temperature": temperature, "seed": seed})
        groups = []
        for i in range(len(prompts)):
            right = self.answers[i % len(self.answers)]
            groups.append([Rollout([1], [-0.5], right if _hit(seed, i, j, temperature) else "print(0)",
                                   "stop") for j in range(n)])
        return groups

    def score(self, pairs):
        return [[-1.0] * len(completion) for _, completion in pairs]


class ExactGrader:
    """Passes a response when it is the problem's reference solution (every test, or the subset asked for)."""

    def grade_many(self, requests):
        verdicts = []
        for request in requests:
            total = len(request.tests if request.tests is not None else request.problem.tests)
            ok = request.response == request.problem.solution
            verdicts.append(Verdict(verdict="accepted" if ok else "wrong_answer", passed=ok,
                                    tests_passed=total if ok else 0, tests_total=total,
                                    feedback="" if ok else "wrong answer"))
        return verdicts


def _trial(tiny_model_dir, **eval_settings):
    problems = copy_problems(6)
    cfg = TrialConfig(eval=eval_settings)
    trial = SimpleNamespace(cfg=cfg, split=SimpleNamespace(val=problems), prompt_ids={p.id: [1, 2] for p in problems},
                            sampling_seed=lambda step, purpose: 7, engine=ScriptedEngine(problems),
                            grader=ExactGrader(), tokenizer=load_tokenizer(tiny_model_dir), hints={},
                            push_teacher_weights=dict)
    return trial


def _expected_acc(trial, *, n, temperature, seed):
    """The scripted engine's all-pass rate for these settings, counted independently."""
    hits = [_hit(seed, i, j, temperature) for i in range(len(trial.split.val)) for j in range(n)]
    return sum(hits) / len(hits)


def test_validation_at_its_own_decoding_is_a_separate_sample(tiny_model_dir):
    trial = _trial(tiny_model_dir, n_samples=3, teacher_n_samples=2)
    assert not validation_is_train_time_decoding(trial.cfg)
    metrics = evaluate(trial)
    # attempts (T=1, seed+1), the validation sample (T=0.6, seed), the teacher (seed+2)
    assert [(c["n"], c["temperature"], c["seed"]) for c in trial.engine.calls] == [(2, 1.0, 8), (3, 0.6, 7), (1, 1.0, 9)]
    assert metrics["student_acc"] == pytest.approx(_expected_acc(trial, n=3, temperature=0.6, seed=7))
    assert metrics["student_acc_t1"] == pytest.approx(_expected_acc(trial, n=2, temperature=1.0, seed=8))
    assert metrics["student_acc"] != metrics["student_acc_t1"]


def test_validation_at_train_time_decoding_reuses_the_attempts(tiny_model_dir):
    trial = _trial(tiny_model_dir, n_samples=2, teacher_n_samples=2, temperature=1.0, top_p=1.0)
    assert validation_is_train_time_decoding(trial.cfg)
    metrics = evaluate(trial)
    assert [(c["n"], c["temperature"], c["seed"]) for c in trial.engine.calls] == [(2, 1.0, 8), (1, 1.0, 9)]
    assert metrics["student_acc"] == metrics["student_acc_t1"] == pytest.approx(
        _expected_acc(trial, n=2, temperature=1.0, seed=8))
    assert metrics["student_test_frac"] == metrics["student_test_frac_t1"]
