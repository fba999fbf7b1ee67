"""Screening privileged contexts before training: every context's initial gap from one student pass.

A gap-only trial (`opsd trial FILE --set steps=0`) measures one context with its own engine start and its own
student pass. At step 0 the self-teacher is the initial model, so one vLLM engine serves the student and every
context's teacher without any weight swap, and the student's graded attempts are the same whatever context is
built from them. `run_screen(cfg, contexts)` therefore:

1. loads the problems and splits them as a trial of `cfg` does, and starts the sandbox and the rollout engine
   once (the trial's own engine settings, wide enough for the longest teacher prompt of any context);
2. samples the student once on the validation problems at train-time decoding (`eval.teacher_temperature`,
   `eval.teacher_n_samples` per problem) and grades every attempt on all tests (its accuracy) and on the train
   tests (the feedback), with the pieces trainer/evaluate.py uses;
3. for each context, builds the privileged prompts from those same attempts, samples the self-teacher once
   per attempt and grades its answers on all tests.

The sampling seeds are the ones a gap-only trial of `cfg` uses at step 0 (`eval_sampling_seed`), so the
student's attempts, and each context's teacher answers, are the ones that trial's initial evaluation samples.

`screen_rows` turns a result into one row per context (student and self-teacher accuracy and the gap, all-pass
`*_acc` and fraction of tests `*_test_frac`, with a paired bootstrap interval over problems for each gap);
`write_screen` writes them (screen.json, screen.parquet) with every attempt and answer as JSON Lines.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sandbox.grader import Verdict
from sandbox.problems import Problem
from trainer.config import ContextConfig, TrialConfig
from trainer.contexts import needs_hints
from trainer.data import load_problems, make_split
from trainer.errors import ContextError, TrialConfigError
from trainer.evaluate import (
    StudentAttempts,
    grade_on_all_tests,
    sample_student_attempts,
    sample_teacher,
    teacher_prompts_for_attempts,
)
from trainer.hints import load_hints
from trainer.models import count_parameters_b, load_tokenizer, model_family, resolve_model
from trainer.options import CONTEXT_NAMES
from trainer.prompts import drop_long_prompts, student_prompt_ids
from trainer.records import PhaseTimer, atomic_write_bytes, write_json
from trainer.rollout import Rollout
# The trial's own start-up of the sandbox and the engine, so the screen samples with the trial's engine settings.
from trainer.runtime import start_sandbox_and_rollout_engine

BOOTSTRAP_RESAMPLES = 2000
CONFIDENCE = 0.95


# ------------------------------------------------------------------------------------------- which contexts


def screen_contexts(cfg: TrialConfig, names: Sequence[str] | None = None,
                    extra: Sequence[ContextConfig] = ()) -> list[ContextConfig]:
    """The contexts to screen: the six built-ins (each with the trial's shared context settings: hints file,
    truncation, ...), `cfg.context` itself when it is a user template, and `extra` (a sweep file's contexts,
    screened by default when given: a sweep's own templates and settings win over a built-in of the same
    name). `names` picks some of them, in that order (a sweep file's screen may name built-ins it does not
    train); an unknown name is a ContextError listing the known ones."""
    builtins = {name: cfg.context.model_copy(update={"name": name, "template": None}) for name in CONTEXT_NAMES}
    if cfg.context.template is not None:
        builtins[cfg.context.name] = cfg.context
    known = {**builtins, **{c.name: c for c in extra}}
    if names is None:
        return list(extra) if extra else list(builtins.values())
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ContextError(f"unknown context {unknown[0]!r} to screen; known here: {', '.join(known)}")
    if len(set(names)) != len(names):
        raise ContextError("a context to screen is listed twice")
    return [known[n] for n in names]


def eval_sampling_seed(cfg: TrialConfig, step: int = 0) -> int:
    """The base seed of a trial's evaluation at `step`: `TrialRuntime.sampling_seed(step, "eval")`, without a
    runtime (the screen builds no student)."""
    digest = hashlib.sha256(f"{cfg.seed}/{step}/eval".encode()).digest()
    return int.from_bytes(digest[:4], "little") // 2


# ------------------------------------------------------------------------------------------------ measuring


@dataclass
class ContextScreen:
    """One context's self-teacher: its prompt, answer and verdict for each student attempt (flat order)."""

    context: ContextConfig
    teacher_prompts: list[list[int]]
    has_context: list[bool]
    answers: list[Rollout]
    verdicts: list[Verdict]


@dataclass
class ScreenResult:
    """The student's graded attempts and every context's self-teacher on them."""

    cfg: TrialConfig
    model_path: Path
    tokenizer: Any
    attempts: StudentAttempts
    contexts: list[ContextScreen] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)


def run_screen(cfg: TrialConfig, contexts: Sequence[ContextConfig], *,
               phase: Callable[[str], ContextManager] | None = None) -> ScreenResult:
    """Measure the student and each context's self-teacher at step 0 (one engine, one student pass).

    `phase(name)`, if given, wraps each phase ("loading", "engine start", "student sampling", "grading",
    "teacher k/N: NAME"), e.g. to show progress; the seconds of each are in `ScreenResult.seconds`."""
    if not contexts:
        raise ContextError("no context to screen")
    timer = PhaseTimer()

    @contextlib.contextmanager
    def step(name: str):
        with (phase(name) if phase is not None else contextlib.nullcontext()), timer(name):
            yield

    with step("loading"):
        model_path = resolve_model(cfg.model)
        tokenizer = load_tokenizer(model_path)
        problems, _ = drop_long_prompts(load_problems(cfg.data), tokenizer, max_tokens=cfg.rollout.max_prompt_tokens,
                                        thinking=cfg.model.thinking)
        if not problems:
            raise TrialConfigError(f"every problem's prompt is longer than rollout.max_prompt_tokens="
                                   f"{cfg.rollout.max_prompt_tokens}")
        val = list(make_split(problems, cfg.data).val)
        prompts = [student_prompt_ids(tokenizer, p, thinking=cfg.model.thinking) for p in val]
        hints = {c.name: _hints(val, c) for c in contexts}

    # The engine must hold the longest teacher prompt any of the contexts allows.
    widest = max(contexts, key=lambda c: c.max_teacher_prompt_tokens)
    seed = eval_sampling_seed(cfg)
    with contextlib.ExitStack() as stack:
        with step("engine start"):
            grader, engine = start_sandbox_and_rollout_engine(cfg.model_copy(update={"context": widest}),
                                                               model_path, stack)
        # The offsets of trainer/evaluate.py: seed + 1 for the student's attempts, seed + 2 for the teacher.
        attempts = sample_student_attempts(engine, grader, cfg, val, prompts, seed=seed + 1, phase=step)
        result = ScreenResult(cfg, model_path, tokenizer, attempts)
        for k, context in enumerate(contexts, start=1):
            with step(f"teacher {k}/{len(contexts)}: {context.name}"):
                teacher_prompts, has_context = teacher_prompts_for_attempts(
                    tokenizer, attempts, context=context, hints=hints[context.name], thinking=cfg.model.thinking)
                answers = sample_teacher(engine, cfg, teacher_prompts, seed=seed + 2)
                verdicts = grade_on_all_tests(grader, attempts.response_problems(), answers)
            result.contexts.append(ContextScreen(context, teacher_prompts, has_context, answers, verdicts))
    result.seconds = {name: round(sec, 3) for name, sec in timer.seconds.items()}
    return result


def _hints(problems: Sequence[Problem], context: ContextConfig) -> dict[str, str]:
    return (load_hints(problems, context.hints_path, require_graded=context.template is None)
            if needs_hints(context) else {})


# ----------------------------------------------------------------------------------------------- the table


def per_problem(verdicts: Sequence[Verdict], n_problems: int) -> tuple[np.ndarray, np.ndarray]:
    """(all-pass score, fraction of tests) per problem, each the mean over its samples; `verdicts` are flat,
    the same number per problem, problem after problem."""
    passed = np.array([float(v.passed) for v in verdicts]).reshape(n_problems, -1)
    frac = np.array([v.fraction_passed for v in verdicts]).reshape(n_problems, -1)
    return passed.mean(axis=1), frac.mean(axis=1)


def bootstrap_gap_interval(student: np.ndarray, teacher: np.ndarray, *, resamples: int = BOOTSTRAP_RESAMPLES,
                           seed: int = 0, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Percentile interval of mean(teacher) - mean(student) over problems resampled with replacement, paired
    (a resample takes a problem's student and teacher scores together). student, teacher: [problems]."""
    rng = np.random.default_rng(seed)
    index = rng.integers(0, len(student), size=(resamples, len(student)))
    gaps = teacher[index].mean(axis=1) - student[index].mean(axis=1)
    tail = (1 - confidence) / 2
    lo, hi = np.quantile(gaps, [tail, 1 - tail])
    return float(lo), float(hi)


def screen_rows(result: ScreenResult, *, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0,
                confidence: float = CONFIDENCE) -> list[dict[str, Any]]:
    """One row per context, named as trial.json names a trial's initial evaluation (`initial_student_acc_t1`,
    `initial_teacher_acc`, `initial_gap`, `*_test_frac`), with the gap's bootstrap interval (`*_lo`, `*_hi`).

    Every row has the same student numbers: one student pass serves every context. The student accuracy here is
    at train-time decoding (trial.json's `initial_student_acc` is mean@n at the validation decoding, which a
    screen does not measure)."""
    cfg, attempts = result.cfg, result.attempts
    n_problems = len(attempts.problems)
    student_acc, student_frac = per_problem(attempts.verdicts, n_problems)
    identity = {
        "model": cfg.model.path, "model_family": cfg.model.family or model_family(cfg.model.path),
        "model_size_b": cfg.model.size_b if cfg.model.size_b is not None else count_parameters_b(result.model_path),
        "seed": cfg.seed,
    }
    rows = []
    for screened in result.contexts:
        teacher_acc, teacher_frac = per_problem(screened.verdicts, n_problems)
        acc_lo, acc_hi = bootstrap_gap_interval(student_acc, teacher_acc, resamples=resamples, seed=seed,
                                                confidence=confidence)
        frac_lo, frac_hi = bootstrap_gap_interval(student_frac, teacher_frac, resamples=resamples, seed=seed,
                                                  confidence=confidence)
        rows.append({
            **identity, "context": screened.context.name,
            "initial_student_acc_t1": float(student_acc.mean()), "initial_teacher_acc": float(teacher_acc.mean()),
            "initial_gap": float(teacher_acc.mean() - student_acc.mean()),
            "initial_gap_lo": acc_lo, "initial_gap_hi": acc_hi,
            "initial_student_test_frac_t1": float(student_frac.mean()),
            "initial_teacher_test_frac": float(teacher_frac.mean()),
            "initial_gap_test_frac": float(teacher_frac.mean() - student_frac.mean()),
            "initial_gap_test_frac_lo": frac_lo, "initial_gap_test_frac_hi": frac_hi,
            "has_context_fraction": float(np.mean(screened.has_context)),
            "val_problems": n_problems, "n_samples": cfg.eval.teacher_n_samples,
            "temperature": cfg.eval.teacher_temperature,
            "bootstrap_resamples": resamples, "bootstrap_seed": seed, "confidence": confidence,
        })
    return rows


# ------------------------------------------------------------------------------------------------- writing


def write_screen(out_dir: Path, result: ScreenResult, rows: list[dict[str, Any]]) -> dict[str, Path]:
    """Write the table (screen.json, screen.parquet) and what it was computed from, for anyone to re-grade:
    problems.jsonl (the validation problems), student.jsonl (one attempt per line: problem_id, response,
    truncated, its verdict on all tests and the feedback of its train tests) and teacher.jsonl (one answer per
    line and context, with the teacher's prompt). `opsd sandbox grade problems.jsonl student.jsonl` grades the
    attempts again. Returns the paths by name."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {name: out_dir / name for name in
             ("screen.json", "screen.parquet", "problems.jsonl", "student.jsonl", "teacher.jsonl")}
    write_json(paths["screen.json"], {"rows": rows, "seconds": result.seconds,
                                      "config": result.cfg.model_dump(mode="json")})
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows), sink)
    atomic_write_bytes(paths["screen.parquet"], sink.getvalue().to_pybytes())

    attempts = result.attempts
    _write_jsonl(paths["problems.jsonl"], [json.loads(p.model_dump_json()) for p in attempts.problems])
    flat = [(p.id, j, r) for p, group in zip(attempts.problems, attempts.groups) for j, r in enumerate(group)]
    _write_jsonl(paths["student.jsonl"], [
        {"problem_id": pid, "sample": j, "response": r.text, "truncated": r.finish_reason == "length",
         **_verdict(v), "train_verdict": t.verdict, "feedback": t.feedback}
        for (pid, j, r), v, t in zip(flat, attempts.verdicts, attempts.train_verdicts)])
    _write_jsonl(paths["teacher.jsonl"], [
        {"context": screened.context.name, "problem_id": pid, "sample": j,
         "teacher_prompt": result.tokenizer.decode(ids), "has_context": keep, "response": a.text,
         "truncated": a.finish_reason == "length", **_verdict(v)}
        for screened in result.contexts
        for (pid, j, _), ids, keep, a, v in zip(flat, screened.teacher_prompts, screened.has_context,
                                                 screened.answers, screened.verdicts)])
    return paths


def _verdict(v: Verdict) -> dict[str, Any]:
    return {"verdict": v.verdict, "passed": v.passed, "tests_passed": v.tests_passed, "tests_total": v.tests_total}


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    atomic_write_bytes(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode())
