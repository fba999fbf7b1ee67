"""Per-problem hints for the `llm_peer_hints` context: a JSON Lines file of
{"problem_id": ..., "hint": ..., "passed": true|false}.

The teacher sees a hint as "Correct solution: ..." (METHOD.md section 2), so a hint must be one: every hint
that `opsd hints` writes was graded in the sandbox on all of its problem's tests, and `passed` says how it did.
Hints come from another model's samples (`generate_hints`: several samples per problem, the first that passes
is kept), from a file of hints sampled elsewhere (`check_hints`, `opsd hints --check`), or from the problems'
reference solutions (`hints_from_reference_solutions`; HumanEval's canonical solutions). A problem without a
passing hint gets none: its rollouts have no privileged context (loss 0), and the trial counts such problems in
its data summary.

`load_hints` refuses, for the built-in `llm_peer_hints`, a file whose hints were never graded (no `passed`,
e.g. written by hand or by an older version): `opsd hints --check` grades it. A user template's `{hint}` may
be any text, so there a hint without `passed` is used as written; one that failed is still left out.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from sandbox.problems import Problem
from trainer.errors import HintsError


class Hint(NamedTuple):
    """A problem's hint and its verdict on the problem's tests: True passed, False failed, None never graded."""

    text: str
    passed: bool | None = None


def read_hints(path: str | Path) -> dict[str, Hint]:
    """problem_id -> Hint from a JSONL file; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise HintsError(f"hints file not found: {path}")
    hints: dict[str, Hint] = {}
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise HintsError(f"{path}:{line_no}: not valid JSON: {err}") from None
            if not isinstance(row, dict) or not isinstance(row.get("problem_id"), str) \
                    or not isinstance(row.get("hint"), str) or not isinstance(row.get("passed", False), bool):
                raise HintsError(f'{path}:{line_no}: expected {{"problem_id": string, "hint": string, '
                                 f'"passed": true|false (optional)}}')
            if row["problem_id"] in hints:
                raise HintsError(f"{path}:{line_no}: problem id {row['problem_id']!r} appears twice")
            hints[row["problem_id"]] = Hint(row["hint"], row.get("passed"))
    return hints


def write_hints(path: str | Path, hints: Mapping[str, Hint | str]) -> None:
    """Write hints as JSONL, atomically (a reader never sees half a file); a plain string is an ungraded hint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for problem_id, hint in hints.items():
                hint = Hint(hint) if isinstance(hint, str) else hint
                row: dict[str, Any] = {"problem_id": problem_id, "hint": hint.text}
                if hint.passed is not None:
                    row["passed"] = hint.passed
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _shown(ids: Sequence[str]) -> str:
    return ", ".join(ids[:5]) + (f" and {len(ids) - 5} more" if len(ids) > 5 else "")


def hints_for(problems: Sequence[Problem], hints: Mapping[str, Hint], *, source: str = "the hints",
              require_graded: bool = True) -> dict[str, str]:
    """The hint text the teacher gets for every problem: a hint that failed its tests becomes "" (no hint).

    HintsError names the problems without a row and, with `require_graded`, the hints never graded."""
    missing = [p.id for p in problems if p.id not in hints]
    if missing:
        raise HintsError(f"{source} have no hint for {len(missing)} of {len(problems)} problems: {_shown(missing)}")
    ungraded = [p.id for p in problems if hints[p.id].passed is None]
    if require_graded and ungraded:
        raise HintsError(
            f"{source}: {len(ungraded)} of {len(problems)} hints were never graded on their problem's tests "
            f"({_shown(ungraded)}), and llm_peer_hints tells the teacher each is a correct solution; grade them "
            f"with `opsd hints --check FILE --out CHECKED.jsonl` (hints that fail are left out)")
    return {p.id: "" if hints[p.id].passed is False else hints[p.id].text for p in problems}


def _as_code_block(code: str) -> str:
    return f"```python\n{code.strip(chr(10))}\n```"


def hints_from_reference_solutions(problems: Sequence[Problem]) -> dict[str, str]:
    """Hints made of the problems' reference solutions (`Problem.solution`) as ```python blocks."""
    missing = [p.id for p in problems if not (p.solution or "").strip()]
    if missing:
        raise HintsError(
            f"{len(missing)} problems have no reference solution to use as a hint (e.g. {', '.join(missing[:5])}); "
            "give context.hints_path or generate hints with a model")
    return {p.id: _as_code_block(p.solution) for p in problems}


def load_hints(problems: Sequence[Problem], hints_path: str | None, *, require_graded: bool = True) -> dict[str, str]:
    """The hints a trial uses: from `hints_path` (failed hints left out; with `require_graded`, ungraded ones
    refused), or else the problems' reference solutions (the offline default)."""
    if hints_path is None:
        return hints_from_reference_solutions(problems)
    return hints_for(problems, read_hints(hints_path), source=f"hints file {hints_path}",
                     require_graded=require_graded)


def hint_counts(hints: Mapping[str, Hint]) -> dict[str, float]:
    """How many problems a set of graded hints covers: `hints/problems`, `hints/passing`, `hints/without`."""
    passing = sum(1 for h in hints.values() if h.passed and h.text.strip())
    return {"hints/problems": float(len(hints)), "hints/passing": float(passing),
            "hints/without": float(len(hints) - passing)}


def check_hints(problems: Sequence[Problem], texts: Mapping[str, str | Sequence[str]], grader: Any) -> dict[str, Hint]:
    """Grade candidate hints on all of each problem's tests (`grader`: a sandbox.Grader) and keep, per problem,
    the first candidate that passes; a problem none of whose candidates passes gets Hint("", False).

    `texts` maps a problem id to one candidate or to several (a model's samples, in order); every problem
    needs at least an entry (an empty list or "" counts as no candidate)."""
    candidates = {p.id: [texts[p.id]] if isinstance(texts.get(p.id), str) else list(texts.get(p.id) or [])
                  for p in problems}
    missing = [p.id for p in problems if p.id not in texts]
    if missing:
        raise HintsError(f"no hint for {len(missing)} of {len(problems)} problems: {_shown(missing)}")
    requests = [(p, text) for p in problems for text in candidates[p.id] if text.strip()]
    verdicts = grader.grade_many(requests)
    out = {p.id: Hint("", False) for p in problems}
    for (problem, text), verdict in zip(requests, verdicts):
        if verdict.passed and not out[problem.id].passed:
            out[problem.id] = Hint(text, True)
    return out


def generate_hints(
    problems: Sequence[Problem],
    engine: Any,
    tokenizer: Any,
    grader: Any,
    *,
    n_samples: int = 4,
    temperature: float = 0.6,
    top_p: float = 0.95,
    max_tokens: int = 4096,
    seed: int | None = 0,
    thinking: bool = False,
) -> tuple[dict[str, Hint], dict[str, float]]:
    """Hints from a model: the student prompt of each problem, `n_samples` completions by `engine` (any object
    with the RolloutEngine `generate` method), thinking removed, graded by `grader` on all the problem's tests;
    the first passing sample is the hint, and a problem with none gets no hint. Returns (hints, counts)."""
    from trainer.contexts import strip_thinking
    from trainer.prompts import student_prompt_ids

    prompts = [student_prompt_ids(tokenizer, p, thinking=thinking) for p in problems]
    outputs = engine.generate(prompts, n=n_samples, temperature=temperature, top_p=top_p,
                              max_tokens=max_tokens, seed=seed)
    if len(outputs) != len(problems):
        raise RuntimeError(f"the engine returned {len(outputs)} groups for {len(problems)} prompts")
    samples = {problem.id: [strip_thinking(s.text) for s in group] for problem, group in zip(problems, outputs)}
    hints = check_hints(problems, samples, grader)
    return hints, hint_counts(hints)
