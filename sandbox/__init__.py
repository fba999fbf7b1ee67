"""sandbox: the world of a trial (problems and their tests, code extraction, isolated execution, grading,
feedback text). Imports no torch. Grading on a Ray cluster: ``sandbox.ray_pool.RayGraderPool`` (imports Ray)."""

from sandbox.executor import CallOutcome, Executor, ExecutorError, Limits, RunOutcome, Session
from sandbox.extract import Extraction, assemble_program, code_blocks, extract_code, extract_program
from sandbox.feedback import FORMAT_ERROR_TEXT, TRUNCATED_TEXT, TestResult, as_text, render_feedback
from sandbox.grader import GradeRequest, Grader, Verdict, stdout_matches, validate_problem, values_equal
from sandbox.loaders import (
    RELEASE_WINDOWS,
    decode_lcb_tests,
    filter_by_date,
    lcb_row_to_problem,
    load_humaneval,
    load_livecodebench_file,
    load_livecodebench_hf,
    load_problems_jsonl,
    release_window,
    save_problems_jsonl,
)
from sandbox.problems import Problem, ProblemError, ProblemTest, SandboxError

__all__ = [
    "FORMAT_ERROR_TEXT", "RELEASE_WINDOWS", "TRUNCATED_TEXT", "CallOutcome", "Executor", "ExecutorError",
    "Extraction", "GradeRequest", "Grader", "Limits", "Problem", "ProblemError", "RunOutcome", "Session",
    "ProblemTest", "SandboxError", "TestResult", "Verdict", "as_text", "assemble_program", "code_blocks", "decode_lcb_tests",
    "extract_code", "extract_program", "filter_by_date", "lcb_row_to_problem", "load_humaneval", "load_livecodebench_file",
    "load_livecodebench_hf", "load_problems_jsonl", "release_window", "render_feedback", "save_problems_jsonl",
    "stdout_matches", "validate_problem", "values_equal",
]
