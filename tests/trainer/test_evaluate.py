"""trainer/evaluate.py's evaluation on a scripted engine and grader: which samples are drawn and how they are scored."""

from __future__ import annotations

import random
import threading
from types import SimpleNamespace

import pytest

from sandbox.grader import Verdict
from tests.trainer.copy_task import copy_problems
from trainer.config import TrialConfig
from trainer.evaluate import evaluate, validation_is_train_time_decoding
from trainer.models import load_tokenizer
from trainer.rank_shares import contiguous_share
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
                            push_teacher_weights=dict, share=range, gather_from_engines=lambda part: [part])
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


# ------------------------------------------------------------------ the evaluation split over engine ranks


class SeededEngine:
    """Draws as vLLM does with a seed per request: a sample depends on its prompt, temperature and seed
    only, never on the rest of the call. Its text names all three; every call's samples are recorded."""

    def __init__(self):
        self.calls = []

    def generate(self, prompts, *, n, temperature, top_p, max_tokens, seed):
        samples = [(tuple(prompt), temperature, seed + i * n + j) for i, prompt in enumerate(prompts) for j in range(n)]
        self.calls.append(samples)
        rollouts = [Rollout([1], [-0.5], f"{prompt}/{t}/{s}", "stop") for prompt, t, s in samples]
        return [rollouts[i * n:(i + 1) * n] for i in range(len(prompts))]

    def score(self, pairs):
        return [[-0.1 * prompt[0]] * len(completion) for prompt, completion in pairs]


class LuckyGrader:
    """Passes a response by a coin seeded with its problem and text (so by its problem, prompt, temperature and
    sampling seed), on a fraction of the tests likewise."""

    def grade_many(self, requests):
        verdicts = []
        for request in requests:
            total = len(request.tests if request.tests is not None else request.problem.tests)
            coin = random.Random(f"{request.problem.id}/{request.response}/{total}").random()
            passed = coin < 0.5
            verdicts.append(Verdict(verdict="accepted" if passed else "wrong_answer", passed=passed,
                                    tests_passed=total if passed else int(coin * 2 * total) % total,
                                    tests_total=total, feedback="" if passed else "wrong answer"))
        return verdicts


class ThreadGather:
    """all_gather among `world_size` threads, each a rank."""

    def __init__(self, world_size: int):
        self.barrier, self.parts = threading.Barrier(world_size), [None] * world_size

    def __call__(self, rank: int, part):
        self.parts[rank] = part
        self.barrier.wait()
        gathered = list(self.parts)
        self.barrier.wait()  # nobody overwrites a part before every rank has read them all
        return gathered


def _evaluate_split(tiny_model_dir, world_size: int, **eval_settings):
    """`evaluate` run by `world_size` engine ranks (threads), each on its share of 6 problems: each rank's
    metrics and its engine's calls."""
    problems = copy_problems(6)
    cfg = TrialConfig(eval=eval_settings)
    gather = ThreadGather(world_size)
    engines = [SeededEngine() for _ in range(world_size)]
    metrics, errors = [None] * world_size, []

    def rank_main(rank: int) -> None:
        trial = SimpleNamespace(
            cfg=cfg, split=SimpleNamespace(val=problems),
            prompt_ids={p.id: [10 + i, 2] for i, p in enumerate(problems)},
            sampling_seed=lambda step, purpose: 7, engine=engines[rank], grader=LuckyGrader(),
            tokenizer=load_tokenizer(tiny_model_dir), hints={}, push_teacher_weights=dict,
            share=lambda n: contiguous_share(n, rank, world_size), gather_from_engines=lambda part: gather(rank, part))
        try:
            metrics[rank] = evaluate(trial)
        except BaseException as err:  # noqa: BLE001 - re-raised in the test's thread
            errors.append(err)
            gather.barrier.abort()

    threads = [threading.Thread(target=rank_main, args=(rank,)) for rank in range(world_size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return metrics, [engine.calls for engine in engines]


@pytest.mark.parametrize("eval_settings", [{"n_samples": 3, "teacher_n_samples": 2},
                                           {"n_samples": 2, "teacher_n_samples": 2, "temperature": 1.0, "top_p": 1.0}])
def test_evaluation_draws_the_same_samples_in_the_same_order_on_any_number_of_ranks(tiny_model_dir, eval_settings):
    (alone,), (calls,) = _evaluate_split(tiny_model_dir, 1, **eval_settings)
    n, attempts_n = eval_settings["n_samples"], eval_settings["teacher_n_samples"]
    # One engine: sample j of problem i at seed + i * n + j (attempts seed 8, validation 7, teacher 9).
    assert [s for _, _, s in calls[0]] == [8 + k for k in range(6 * attempts_n)]
    if len(calls) == 3:
        assert [s for _, _, s in calls[1]] == [7 + k for k in range(6 * n)]
    assert [s for _, _, s in calls[-1]] == [9 + k for k in range(6 * attempts_n)]
    assert alone["val_problems"] == 6 and 0 < alone["student_acc_t1"] < 1 and 0 < alone["teacher_acc"] < 1
    # 7 ranks for 6 problems: the last has an empty share and still takes part in every gather.
    for world_size in (2, 3, 4, 7):
        metrics, rank_calls = _evaluate_split(tiny_model_dir, world_size, **eval_settings)
        assert all(m == alone for m in metrics), world_size
        # Call by call, the ranks' samples in rank order are the single engine's: same prompts, seeds, order.
        assert all(len(c) == len(calls) for c in rank_calls)
        for k, samples in enumerate(calls):
            assert [s for c in rank_calls for s in c[k]] == samples, (world_size, k)
