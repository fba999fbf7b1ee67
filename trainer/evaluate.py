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
"""

from __future__ import annotations

from typing import Any, Sequence

from sandbox.grader import GradeRequest, Verdict
from trainer.contexts import GradedRollout, teacher_prompts_for_group
from trainer.data import train_tests_of
from trainer.hints import hints_from_reference_solutions
from trainer.records import mean_or_zero
from trainer.runtime import TrialRuntime


def _scores(verdicts: Sequence[Verdict]) -> tuple[float, float]:
    return mean_or_zero([float(v.passed) for v in verdicts]), mean_or_zero([v.fraction_passed for v in verdicts])


def evaluate(trial: TrialRuntime, *, step: int) -> dict[str, Any]:
    """Student and self-teacher accuracy on the validation problems (rank 0); the engine holds the student's
    weights before and after the call."""
    cfg = trial.cfg
    problems = list(trial.split.val)
    prompts = [trial.prompt_ids[p.id] for p in problems]
    max_tokens = cfg.eval.max_response_tokens or cfg.rollout.max_response_tokens
    seed = trial.sampling_seed(step, "eval")

    # Student at the validation decoding, graded on every test.
    groups = trial.engine.generate(prompts, n=cfg.eval.n_samples, temperature=cfg.eval.temperature,
                                   top_p=cfg.eval.top_p, max_tokens=max_tokens, seed=seed)
    verdicts = trial.grader.grade_many([
        GradeRequest(problem, r.text, None, r.finish_reason == "length")
        for problem, group in zip(problems, groups) for r in group])
    student_acc, student_frac = _scores(verdicts)

    # Student at train-time decoding: graded on all tests (its accuracy) and on the train tests (feedback).
    t1_groups = trial.engine.generate(prompts, n=cfg.eval.teacher_n_samples, temperature=cfg.eval.teacher_temperature,
                                      top_p=cfg.rollout.top_p, max_tokens=max_tokens, seed=seed + 1)
    feedback_tests = {p.id: train_tests_of(p, fraction=cfg.data.train_test_fraction, seed=cfg.data.seed)
                      for p in problems}
    requests = [GradeRequest(problem, r.text, tests, r.finish_reason == "length")
                for problem, group in zip(problems, t1_groups) for r in group
                for tests in (None, feedback_tests[problem.id])]
    both = trial.grader.grade_many(requests)
    t1_all, t1_train = both[0::2], both[1::2]
    student_acc_t1, student_frac_t1 = _scores(t1_all)

    # The self-teacher answers once per context built from the student's graded attempt.
    teacher_prompts = []
    n = cfg.eval.teacher_n_samples
    graded_groups = GradedRollout.groups([[r.text for r in group] for group in t1_groups], t1_train)
    for problem, graded in zip(problems, graded_groups):
        ids, _, _ = teacher_prompts_for_group(trial.tokenizer, graded, problem=problem, context=cfg.context,
                                              hint=trial.hints.get(problem.id), thinking=cfg.model.thinking)
        teacher_prompts.extend(ids)
    with trial.teacher_weights_in_engine():
        teacher_groups = trial.engine.generate(teacher_prompts, n=1, temperature=cfg.eval.teacher_temperature,
                                               top_p=cfg.rollout.top_p, max_tokens=max_tokens, seed=seed + 2)
    teacher_problems = [p for p in problems for _ in range(n)]
    teacher_verdicts = trial.grader.grade_many([
        GradeRequest(problem, group[0].text, None, group[0].finish_reason == "length")
        for problem, group in zip(teacher_problems, teacher_groups)])
    teacher_acc, teacher_frac = _scores(teacher_verdicts)

    ref_logp = {}
    if all((p.solution or "").strip() for p in problems):
        solutions = hints_from_reference_solutions(problems)
        scored = trial.engine.score([
            (trial.prompt_ids[p.id], trial.tokenizer(solutions[p.id], add_special_tokens=False)["input_ids"])
            for p in problems])
        ref_logp = {"student_ref_logp": mean_or_zero([mean_or_zero(logps) for logps in scored])}

    return {
        **ref_logp,
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
