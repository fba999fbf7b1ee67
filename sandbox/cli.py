"""`opsd sandbox ...`: grade one program, grade many responses, and the HumanEval smoke job."""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from sandbox.problems import Problem, ProblemError, SandboxError

CHECK_EPILOG = """\
examples:
  opsd sandbox check problem.json solution.py              grade a bare program, readable summary
  opsd sandbox check row.json response.md --format lcb --json
                                                           a LiveCodeBench row and a model response, one JSON object
CODE is a model response (its fenced ```python block is graded) or, without any fenced block, a bare program.
Exit 0 whenever the program was graded, whatever the verdict; 2 for bad input.
The program runs in the sandbox; a problem's `check` tests and `check_setup` are trusted test code that runs
in this process, so use problem files you trust.
"""

GRADE_EPILOG = """\
examples:
  opsd sandbox grade problems.jsonl responses.jsonl --out verdicts.jsonl --workers 2
responses.jsonl holds one {"problem_id": ..., "response": ..., "truncated": false} object per line
("truncated" is optional); verdicts.jsonl gets one verdict per response, in order.
"""

HUMANEVAL_EPILOG = """\
examples:
  opsd sandbox humaneval                      grade all 164 canonical solutions (the set-up smoke job)
  opsd sandbox humaneval --limit 10 --out he.jsonl
Exit 0 when every graded solution is accepted, 1 otherwise.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    sandbox = subparsers.add_parser(
        "sandbox", help="grade programs in the isolated sandbox",
        description="Grade programs against problem tests in the isolated sandbox.",
        epilog="examples:\n  opsd sandbox check problem.json response.md --json\n"
               "  opsd sandbox grade problems.jsonl responses.jsonl --out verdicts.jsonl\n"
               "  opsd sandbox humaneval --limit 10\n",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = sandbox.add_subparsers(dest="sandbox_command", metavar="COMMAND", required=True)

    check = commands.add_parser(
        "check", help="grade one program or response on one problem",
        description="Grade one program (or model response) on one problem and print the verdict.",
        epilog=CHECK_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    check.add_argument("problem", help="file with one problem: our JSON, or a LiveCodeBench row with --format lcb")
    check.add_argument("code", help="file with a bare program or a model response")
    check.add_argument("--json", action="store_true", help="print exactly one JSON object")
    check.add_argument("--format", default="ours", help="problem file format: ours | lcb (default: ours)")
    _grading_options(check)
    check.set_defaults(func=cmd_check)

    grade = commands.add_parser(
        "grade", help="grade many responses (JSONL) with a progress bar",
        description="Grade many model responses on their problems; write verdicts as JSON Lines.",
        epilog=GRADE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    grade.add_argument("problems", help="problem file in our JSON Lines format")
    grade.add_argument("responses", help="JSON Lines of {problem_id, response[, truncated]}")
    grade.add_argument("--out", help="write one verdict per line here")
    grade.add_argument("--workers", type=int, default=None, help="sandbox workers (default: CPU count)")
    _grading_options(grade)
    grade.set_defaults(func=cmd_grade)

    humaneval = commands.add_parser(
        "humaneval", help="grade HumanEval's canonical solutions (set-up smoke job)",
        description="Grade HumanEval's canonical solutions in the sandbox and print how many were accepted.",
        epilog=HUMANEVAL_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    humaneval.add_argument("--limit", type=int, default=None, help="grade only the first N problems")
    humaneval.add_argument("--out", help="write one verdict per line here")
    humaneval.add_argument("--workers", type=int, default=None, help="sandbox workers (default: CPU count)")
    humaneval.add_argument("--time-limit", type=float, default=6.0, help="seconds per run or call (default 6)")
    humaneval.set_defaults(func=cmd_humaneval)


def _grading_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--code-block", default="longest", help="which fenced block: longest | last (default: longest)")
    parser.add_argument("--time-limit", type=float, default=6.0, help="seconds per run or call (default 6)")
    parser.add_argument("--float-tolerance", type=float, default=0.0,
                        help="relative/absolute tolerance for numbers (default 0: exact)")


def _check_choice(value: str, choices: tuple[str, ...], option: str) -> str:
    if value not in choices:
        raise SandboxError(f"unknown {option} {value!r} (choose from {' | '.join(choices)})")
    return value


def _read_text(path: str, what: str) -> str:
    p = Path(path)
    if not p.is_file():
        raise SandboxError(f"{path}: no such {what} file")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise SandboxError(f"{path}: the {what} file is not UTF-8 text") from None


def read_problem_file(path: str, fmt: str) -> Problem:
    """One problem from a file: our JSON object, or a raw LiveCodeBench row (`lcb`)."""
    from pydantic import ValidationError

    from sandbox.loaders import lcb_row_to_problem

    _check_choice(fmt, ("ours", "lcb"), "format")
    text = _read_text(path, "problem")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise SandboxError(f"{path}: malformed JSON: {err}") from None
    if not isinstance(data, dict):
        raise SandboxError(f"{path}: expected one JSON object")
    if fmt == "lcb":
        try:
            return lcb_row_to_problem(data)
        except ProblemError as err:
            raise SandboxError(f"{path}: {err}") from None
    try:
        return Problem.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "problem"
        hint = " (a LiveCodeBench row? use --format lcb)" if "question_content" in data else ""
        raise SandboxError(f"{path}: {where}: {first['msg']}{hint}") from None


def _make_grader(args: argparse.Namespace, workers: int | None = None):
    from sandbox.executor import Executor
    from sandbox.grader import Grader

    mode = _check_choice(getattr(args, "code_block", "longest"), ("longest", "last"), "code block")
    executor = Executor(workers)
    grader = Grader(executor, code_block=mode, time_limit_s=args.time_limit,
                    float_tolerance=getattr(args, "float_tolerance", 0.0))
    return executor, grader


def _summary(verdict: Any) -> str:
    head = f"verdict: {verdict.verdict} ({verdict.tests_passed}/{verdict.tests_total} tests passed)"
    return head + (f"\n\n{verdict.feedback}" if verdict.feedback else "")


def cmd_check(args: argparse.Namespace) -> int:
    from sandbox.extract import extract_code
    from sandbox.grader import validate_problem

    problem = read_problem_file(args.problem, args.format)
    text = _read_text(args.code, "code")
    _check_choice(args.code_block, ("longest", "last"), "code block")
    validate_problem(problem)  # zero or malformed tests: exit 2 before any sandbox starts
    executor, grader = _make_grader(args, workers=1)
    with executor:
        if extract_code(text, mode=args.code_block) is None:
            verdict = grader.grade_program(problem, text)
        else:
            verdict = grader.grade(problem, text)
    if args.json:
        print(json.dumps({"verdict": verdict.verdict, "passed": verdict.passed, "tests_passed": verdict.tests_passed,
                          "tests_total": verdict.tests_total, "feedback": verdict.feedback}))
    else:
        print(_summary(verdict))
    return 0


def _read_responses(path: str) -> list[dict[str, Any]]:
    text = _read_text(path, "responses")
    rows = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise SandboxError(f"{path}:{line_no}: malformed JSON: {err}") from None
        if not isinstance(row, dict) or not isinstance(row.get("problem_id"), str) or not isinstance(row.get("response"), str):
            raise SandboxError(f"{path}:{line_no}: expected {{\"problem_id\": str, \"response\": str}}")
        rows.append({**row, "line": line_no})
    return rows


def _print_counts(verdicts: list[Any]) -> None:
    counts = Counter(v.verdict for v in verdicts)
    total = len(verdicts)
    print(f"graded {total} responses")
    for name, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        print(f"  {name:<14} {n:>6}  {n / total:.3f}")


def cmd_grade(args: argparse.Namespace) -> int:
    from sandbox.grader import GradeRequest
    from sandbox.loaders import load_problems_jsonl

    problems = {p.id: p for p in load_problems_jsonl(args.problems)}
    rows = _read_responses(args.responses)
    requests = []
    for row in rows:
        if row["problem_id"] not in problems:
            raise SandboxError(f"{args.responses}:{row['line']}: unknown problem_id {row['problem_id']!r}")
        requests.append(GradeRequest(problems[row["problem_id"]], row["response"], truncated=bool(row.get("truncated"))))
    if not requests:
        raise SandboxError(f"{args.responses}: no responses to grade")
    from sandbox.grader import validate_problem

    for problem_id in dict.fromkeys(row["problem_id"] for row in rows):
        validate_problem(problems[problem_id])
    executor, grader = _make_grader(args, workers=args.workers)
    with executor:
        verdicts = grader.grade_many(requests, progress=True)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            for row, verdict in zip(rows, verdicts):
                f.write(json.dumps({"problem_id": row["problem_id"], **verdict.model_dump()}) + "\n")
    _print_counts(verdicts)
    return 0


def cmd_humaneval(args: argparse.Namespace) -> int:
    from sandbox.grader import GradeRequest
    from sandbox.loaders import load_humaneval

    problems = load_humaneval()[: args.limit] if args.limit else load_humaneval()
    executor, grader = _make_grader(args, workers=args.workers)
    with executor:
        verdicts = grader.grade_many([GradeRequest(p, f"```python\n{p.solution}\n```") for p in problems],
                                     progress=True)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            for problem, verdict in zip(problems, verdicts):
                f.write(json.dumps({"problem_id": problem.id, **verdict.model_dump()}) + "\n")
    accepted = sum(v.passed for v in verdicts)
    print(f"HumanEval canonical solutions accepted: {accepted}/{len(verdicts)}")
    for problem, verdict in zip(problems, verdicts):
        if not verdict.passed:
            print(f"  {problem.id}: {verdict.verdict}", file=sys.stderr)
    return 0 if accepted == len(verdicts) else 1
