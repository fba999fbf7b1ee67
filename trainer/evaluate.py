"""Validation accuracy of the student and of the self-teacher (METHOD.md section 1 step 9, section 5).

- Student: `eval.n_samples` samples per validation problem at the validation decoding (T=0.6, top-p 0.95),
  graded on all of the problem's tests: mean@n of the all-pass score (`student_acc`) and of the fraction of
  tests passed (`student_test_frac`). The law's improvement is measured on `student_acc`.
- The gap, at train-time decoding (T=1.0): the student samples `eval.teacher_n_samples` responses per problem,
  they are graded on the problem's train tests (the feedback a training step would see), the privileged
  context is built from them exactly as in training, and the self-teacher (the EMA weights, swapped into the
  rollout engine for the occasion) answers once per context. `teacher_acc` is the teacher's all-pass score on
  all tests; `student_acc_t1` the student's on the same problems at the same temperature; `gap` the difference.
- Where every validation problem has a reference solution, `student_ref_logp`: the student's mean log-prob
  per token of that solution (as a ```python block) after its prompt. It moves long before accuracy does on
  a weak model, so it shows whether training pulls the student towards what a better teacher would write.

The gap's pieces (`sample_student_attempts`, `teacher_prompts_for_attempts`, `sample_teacher`,
`grade_on_all_tests`) are shared with trainer/screen.py, which measures every context from one student pass.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Sequence

from sandbox.grader import GradeRequest, Grader, Verdict
from sandbox.problems import Problem
from trainer.config import ContextConfig, TrialConfig
from trainer.contexts import GradedRollout, teacher_prompts_for_group
from trainer.data import train_tests_of
from trainer.hints import hints_from_reference_solutions
from trainer.records import mean_or_zero
from trainer.rollout import Rollout, RolloutEngine
from trainer.runtime import TrialRuntime


def _scores(verdicts: Sequence[Verdict]) -> tuple[float, float]:
    return mean_or_zero([float(v.passed) for v in verdicts]), mean_or_zero([v.fraction_passed for v in verdicts])


def _no_phase(name: str) -> ContextManager:
    return contextlib.nullcontext()


def eval_max_tokens(cfg: TrialConfig) -> int:
    """The longest response an evaluation samples."""
    return cfg.eval.max_response_tokens or cfg.rollout.max_response_tokens


@dataclass
class StudentAttempts:
    """The student's samples at train-time decoding: `groups[i]` are problem i's `eval.teacher_n_samples`
    rollouts; `verdicts` (all tests: the student's accuracy) and `train_verdicts` (the train tests: the
    feedback of its privileged contexts) are flat, group after group."""

    problems: list[Problem]
    groups: list[list[Rollout]]
    verdicts: list[Verdict]
    train_verdicts: list[Verdict]

    def response_problems(self) -> list[Problem]:
        """The problem of each rollout, in the flat order of the verdicts (and of the teacher's prompts)."""
        return [p for p, group in zip(self.problems, self.groups) for _ in group]


def sample_student_attempts(engine: RolloutEngine, grader: Grader, cfg: TrialConfig, problems: Sequence[Problem],
                            prompts: Sequence[list[int]], *, seed: int,
                            phase: Callable[[str], ContextManager] = _no_phase) -> StudentAttempts:
    """The student at train-time decoding, graded on all tests (its accuracy) and on the train tests (feedback).

    `phase(name)` wraps the sampling ("student sampling") and the grading ("grading"), e.g. to show progress."""
    with phase("student sampling"):
        groups = engine.generate(list(prompts), n=cfg.eval.teacher_n_samples,
                                 temperature=cfg.eval.teacher_temperature, top_p=cfg.rollout.top_p,
                                 max_tokens=eval_max_tokens(cfg), seed=seed)
    feedback_tests = {p.id: train_tests_of(p, fraction=cfg.data.train_test_fraction, seed=cfg.data.seed)
                      for p in problems}
    requests = [GradeRequest(problem, r.text, tests, r.finish_reason == "length")
                for problem, group in zip(problems, groups) for r in group
                for tests in (None, feedback_tests[problem.id])]
    with phase("grading"):
        both = grader.grade_many(requests)
    return StudentAttempts(list(problems), groups, both[0::2], both[1::2])


def teacher_prompts_for_attempts(tokenizer: Any, attempts: StudentAttempts, *, context: ContextConfig,
                                 hints: dict[str, str], thinking: bool) -> tuple[list[list[int]], list[bool]]:
    """One self-teacher prompt per student attempt, its context built exactly as in training (flat order),
    and whether the construction had anything to add to it (`has_context`)."""
    prompts, has_context = [], []
    graded_groups = GradedRollout.groups([[r.text for r in group] for group in attempts.groups],
                                         attempts.train_verdicts)
    for problem, graded in zip(attempts.problems, graded_groups):
        ids, keep, _ = teacher_prompts_for_group(tokenizer, graded, problem=problem, context=context,
                                                 hint=hints.get(problem.id), thinking=thinking)
        prompts.extend(ids)
        has_context.extend(keep)
    return prompts, has_context


def sample_teacher(engine: RolloutEngine, cfg: TrialConfig, teacher_prompts: Sequence[list[int]], *,
                   seed: int) -> list[Rollout]:
    """The self-teacher's one answer per privileged prompt, at train-time decoding (whatever weights the
    engine holds: the caller puts the teacher's there)."""
    groups = engine.generate(list(teacher_prompts), n=1, temperature=cfg.eval.teacher_temperature,
                             top_p=cfg.rollout.top_p, max_tokens=eval_max_tokens(cfg), seed=seed)
    return [group[0] for group in groups]


def grade_on_all_tests(grader: Grader, problems: Sequence[Problem], rollouts: Sequence[Rollout]) -> list[Verdict]:
    """Each rollout graded on all of its problem's tests (`problems[i]` is rollout i's)."""
    return grader.grade_many([GradeRequest(problem, r.text, None, r.finish_reason == "length")
                              for problem, r in zip(problems, rollouts)])


def validation_is_train_time_decoding(cfg: TrialConfig) -> bool:
    """Whether the student's validation sample (`eval.n_samples` at `eval.temperature`, `eval.top_p`) is drawn
    exactly as its train-time attempts of the gap are (`eval.teacher_n_samples` at `eval.teacher_temperature`,
    `rollout.top_p`), so that one sample serves both."""
    return (cfg.eval.n_samples, cfg.eval.temperature, cfg.eval.top_p) == (
        cfg.eval.teacher_n_samples, cfg.eval.teacher_temperature, cfg.rollout.top_p)


def evaluate(trial: TrialRuntime) -> dict[str, Any]:
    """Student and self-teacher accuracy on the validation problems (every rank with an engine calls it).

    Each such rank evaluates its contiguous share of the problems (`trial.share`), every sample seeded from
    its global index (problem, sample) rather than from its place in the rank's call, and the per-problem
    results are gathered in problem order (`trial.gather_from_engines`): the metrics do not depend on how many
    ranks ran it (up to vLLM's logits, which are not batch-invariant in their last bits). The engine holds
    the student's weights when called; the self-teacher's turn comes last and leaves its weights there, for
    the caller to push the student's back (every rank: under ZeRO-3 that read is collective, and no rank
    keeps a copy of the student during the evaluation)."""
    problems = list(trial.split.val)
    mine = trial.share(len(problems))
    # Decided for the whole set, so that every rank scores the reference solutions or none does.
    with_ref = all((p.solution or "").strip() for p in problems)
    parts = trial.gather_from_engines(_evaluate_share(trial, problems[mine.start:mine.stop], mine.start, with_ref))
    merged = {key: [item for part in parts for item in part[key]] for key in parts[0]}

    student_acc_t1, student_frac_t1 = _scores(merged["attempts"])
    if validation_is_train_time_decoding(trial.cfg):
        student_acc, student_frac = student_acc_t1, student_frac_t1
    else:
        student_acc, student_frac = _scores(merged["validation"])
    teacher_acc, teacher_frac = _scores(merged["teacher"])
    return {
        **({"student_ref_logp": mean_or_zero(merged["ref_logp"])} if with_ref else {}),
        "student_acc": student_acc,
        "student_test_frac": student_frac,
        "student_acc_t1": student_acc_t1,
        "student_test_frac_t1": student_frac_t1,
        "teacher_acc": teacher_acc,
        "teacher_test_frac": teacher_frac,
        "gap": teacher_acc - student_acc_t1,
        "gap_test_frac": teacher_frac - student_frac_t1,
        "val_problems": len(problems),
    }


def _evaluate_share(trial: TrialRuntime, problems: list[Problem], first: int, with_ref: bool) -> dict[str, list]:
    """The verdicts of the validation problems `problems` (the first is problem `first` of the whole set), in
    problem order, flat: `attempts` (teacher_n_samples per problem, all tests), `validation` (n_samples per
    problem; empty when the attempts serve), `teacher` (one per attempt), and `ref_logp` (the student's mean
    log-prob per token of each reference solution, with `with_ref`)."""
    cfg = trial.cfg
    prompts = [trial.prompt_ids[p.id] for p in problems]
    # Every evaluation draws the same random numbers (common random numbers): an improvement, the difference of
    # two evaluations, then measures the change of the model rather than a fresh draw of sampling noise, and a
    # model that has not changed scores exactly what it scored before. Sample j of problem i of the whole set
    # has seed + i * n + j whichever rank samples it (RolloutEngine.generate).
    seed = trial.sampling_seed(0, "eval")
    attempts_n, validation_n = cfg.eval.teacher_n_samples, cfg.eval.n_samples

    # Student at train-time decoding: graded on all tests (its accuracy) and on the train tests (feedback).
    attempts = sample_student_attempts(trial.engine, trial.grader, cfg, problems, prompts,
                                       seed=seed + 1 + first * attempts_n)

    # Student at the validation decoding, graded on every test; when that decoding is the train-time one, the
    # attempts above are already such a sample, and a second would only cost time.
    validation = []
    if not validation_is_train_time_decoding(cfg):
        groups = trial.engine.generate(prompts, n=validation_n, temperature=cfg.eval.temperature,
                                       top_p=cfg.eval.top_p, max_tokens=eval_max_tokens(cfg),
                                       seed=seed + first * validation_n)
        validation = grade_on_all_tests(trial.grader, [p for p in problems for _ in range(validation_n)],
                                        [r for group in groups for r in group])

    ref_logp = []
    if with_ref and problems:
        solutions = hints_from_reference_solutions(problems)
        scored = trial.engine.score([
            (trial.prompt_ids[p.id], trial.tokenizer(solutions[p.id], add_special_tokens=False)["input_ids"])
            for p in problems])
        ref_logp = [mean_or_zero(logps) for logps in scored]

    # The self-teacher answers once per context built from the student's graded attempt (attempt k of the
    # whole set is teacher prompt k).
    teacher_prompts, _ = teacher_prompts_for_attempts(trial.tokenizer, attempts, context=cfg.context,
                                                      hints=trial.hints, thinking=cfg.model.thinking)
    trial.push_teacher_weights()
    teacher_rollouts = sample_teacher(trial.engine, cfg, teacher_prompts, seed=seed + 2 + first * attempts_n)
    teacher = grade_on_all_tests(trial.grader, attempts.response_problems(), teacher_rollouts)
    return {"attempts": attempts.verdicts, "validation": validation, "teacher": teacher, "ref_logp": ref_logp}
