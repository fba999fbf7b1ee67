"""Per-problem hints for the `llm_peer_hints` context: a JSON Lines file of {"problem_id": ..., "hint": ...}.

Hints come from another model's solutions (`generate_hints`, with any model a rollout engine can load) or,
offline, from the problems' reference solutions (`hints_from_reference_solutions`; HumanEval's canonical
solutions). The teacher sees a hint as "Correct solution: ..." (METHOD.md section 2). An empty hint is
allowed: that problem's rollouts then get no privileged context (loss 0).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sandbox.problems import Problem
from trainer.errors import HintsError


def read_hints(path: str | Path) -> dict[str, str]:
    """problem_id -> hint from a JSONL file; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise HintsError(f"hints file not found: {path}")
    hints: dict[str, str] = {}
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise HintsError(f"{path}:{line_no}: not valid JSON: {err}") from None
            if not isinstance(row, dict) or not isinstance(row.get("problem_id"), str) \
                    or not isinstance(row.get("hint"), str):
                raise HintsError(f'{path}:{line_no}: expected {{"problem_id": string, "hint": string}}')
            if row["problem_id"] in hints:
                raise HintsError(f"{path}:{line_no}: problem id {row['problem_id']!r} appears twice")
            hints[row["problem_id"]] = row["hint"]
    return hints


def write_hints(path: str | Path, hints: dict[str, str]) -> None:
    """Write hints as JSONL (one {"problem_id", "hint"} per line), atomically: a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for problem_id, hint in hints.items():
                f.write(json.dumps({"problem_id": problem_id, "hint": hint}, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def hints_for(problems: Sequence[Problem], hints: dict[str, str], *, source: str = "the hints") -> dict[str, str]:
    """The hint of every problem; HintsError naming the problems that have none."""
    missing = [p.id for p in problems if p.id not in hints]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise HintsError(f"{source} have no hint for {len(missing)} of {len(problems)} problems: {shown}")
    return {p.id: hints[p.id] for p in problems}


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


def load_hints(problems: Sequence[Problem], hints_path: str | None) -> dict[str, str]:
    """The hints a trial uses: from `hints_path`, or else the problems' reference solutions (offline default)."""
    if hints_path is None:
        return hints_from_reference_solutions(problems)
    return hints_for(problems, read_hints(hints_path), source=f"hints file {hints_path}")


def generate_hints(
    problems: Sequence[Problem],
    engine: Any,
    tokenizer: Any,
    *,
    n_samples: int = 1,
    temperature: float = 0.6,
    top_p: float = 0.95,
    max_tokens: int = 4096,
    seed: int | None = 0,
    thinking: bool = False,
    grade: Callable[[Problem, str], bool] | None = None,
) -> tuple[dict[str, str], dict[str, float]]:
    """Hints from a model: the student prompt of each problem, `n_samples` completions by `engine` (any
    object with the RolloutEngine `generate` method), thinking removed.

    Without `grade` the hint is the first sample. With `grade(problem, text) -> passed` it is the first
    passing sample, or "" when none passed (those problems then get no privileged context).
    Returns (hints, metrics).
    """
    from trainer.contexts import strip_thinking
    from trainer.prompts import student_prompt_ids

    prompts = [student_prompt_ids(tokenizer, p, thinking=thinking) for p in problems]
    outputs = engine.generate(prompts, n=n_samples, temperature=temperature, top_p=top_p,
                              max_tokens=max_tokens, seed=seed)
    if len(outputs) != len(problems):
        raise RuntimeError(f"the engine returned {len(outputs)} groups for {len(problems)} prompts")
    hints: dict[str, str] = {}
    n_passing = 0
    for problem, samples in zip(problems, outputs):
        texts = [strip_thinking(s.text) for s in samples]
        if grade is None:
            hints[problem.id] = texts[0] if texts else ""
            continue
        chosen = next((t for t in texts if grade(problem, t)), "")
        n_passing += bool(chosen)
        hints[problem.id] = chosen
    metrics = {"hints/problems": float(len(problems))}
    if grade is not None:
        metrics["hints/passing_fraction"] = n_passing / max(len(problems), 1)
    return hints, metrics
