"""`opsd sandbox ...` through the installed console script, in subprocesses."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OPSD = ROOT / ".venv" / "bin" / "opsd"
DATA = Path(__file__).parent / "data"


def opsd(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    exe = [str(OPSD)] if OPSD.exists() else [sys.executable, "-m", "orchestrator.cli"]
    return subprocess.run([*exe, "sandbox", *args], capture_output=True, text=True, timeout=300, cwd=cwd or ROOT)


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


# ------------------------------------------------------------------------------------------------ bad input


def test_missing_files_exit_2_in_one_line(tmp_path):
    code = write(tmp_path / "code.py", "print(1)\n")
    res = opsd("check", str(tmp_path / "absent.json"), code, "--json")
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.strip().count("\n") == 0 and "absent.json: no such problem file" in res.stderr
    res = opsd("check", str(DATA / "add_problem.json"), str(tmp_path / "absent.py"))
    assert res.returncode == 2 and "absent.py: no such code file" in res.stderr
    (tmp_path / "latin1.py").write_bytes(b"print('\xe9')\n")
    res = opsd("check", str(DATA / "add_problem.json"), str(tmp_path / "latin1.py"))
    assert res.returncode == 2 and "latin1.py: the code file is not UTF-8 text" in res.stderr


def test_malformed_problem_json_and_unknown_format(tmp_path):
    code = write(tmp_path / "code.py", "print(1)\n")
    res = opsd("check", write(tmp_path / "p.json", '{"id": "x", "prompt": '), code, "--json")
    assert res.returncode == 2 and "malformed JSON" in res.stderr and "Traceback" not in res.stderr
    res = opsd("check", write(tmp_path / "q.json", '{"id": "x", "prompt": "p"}'), code)
    assert res.returncode == 2 and "tests: Field required" in res.stderr
    res = opsd("check", str(DATA / "lcb_functional_row.json"), code)
    assert res.returncode == 2 and "use --format lcb" in res.stderr
    res = opsd("check", str(DATA / "add_problem.json"), code, "--format", "xml")
    assert res.returncode == 2 and "unknown format 'xml'" in res.stderr
    res = opsd("check", str(DATA / "add_problem.json"), code, "--code-block", "first")
    assert res.returncode == 2 and "unknown code block 'first'" in res.stderr


def test_zero_tests_is_a_clear_error(tmp_path):
    problem = write(tmp_path / "p.json", json.dumps({"id": "empty", "prompt": "p", "tests": []}))
    res = opsd("check", problem, write(tmp_path / "code.py", "print(1)\n"), "--json")
    assert res.returncode == 2 and "problem empty has no tests to grade against" in res.stderr


def test_grade_with_unknown_problem_id_exits_2(tmp_path):
    responses = write(tmp_path / "r.jsonl", json.dumps({"problem_id": "nope", "response": "x"}) + "\n")
    res = opsd("grade", str(DATA / "problems.jsonl"), responses)
    assert res.returncode == 2 and "unknown problem_id 'nope'" in res.stderr
    res = opsd("grade", str(DATA / "problems.jsonl"), write(tmp_path / "s.jsonl", "{bad\n"))
    assert res.returncode == 2 and "s.jsonl:1: malformed JSON" in res.stderr


def test_every_help_has_an_example():
    for args in ([], ["check"], ["grade"], ["humaneval"]):
        res = opsd(*args, "--help")
        assert res.returncode == 0 and "example" in res.stdout and "opsd sandbox" in res.stdout


# ---------------------------------------------------------------------------------- grading in the sandbox


def test_check_json_accepted_wrong_and_format(tmp_path):
    problem = str(DATA / "add_problem.json")
    bare = write(tmp_path / "bare.py", "a, b = map(int, input().split())\nprint(a + b)\n")
    res = opsd("check", problem, bare, "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == {"verdict": "accepted", "passed": True, "tests_passed": 3, "tests_total": 3,
                                      "feedback": ""}

    response = write(tmp_path / "resp.md", "Sure:\n```python\nprint(sum(map(int, input().split())) + 1)\n```\n")
    res = opsd("check", problem, response, "--json")
    out = json.loads(res.stdout)
    assert res.returncode == 0 and res.stdout.count("\n") == 1
    assert (out["verdict"], out["passed"], out["tests_passed"], out["tests_total"]) == ("wrong_answer", False, 0, 3)
    # Shortest first (input + output): test 1 (5 characters), then tests 2 and 3 tie at 6: test order decides.
    assert out["feedback"] == ("Test Case 1: Wrong Answer\n\nInput\n1 2\n\nOutput\n4\n\nExpected\n3\n\n"
                               "Test Case 2: Wrong Answer\n\nInput\n5 7\n\nOutput\n13\n\nExpected\n12")

    res = opsd("check", problem, response)  # readable summary
    assert res.returncode == 0 and res.stdout.startswith("verdict: wrong_answer (0/3 tests passed)")


def test_check_runtime_error_and_non_utf8_output(tmp_path):
    problem = str(DATA / "add_problem.json")
    res = opsd("check", problem, write(tmp_path / "re.py", "x = int(input().split()[0])\nprint(1 // (x - x))\n"),
               "--json")
    out = json.loads(res.stdout)
    assert out["verdict"] == "runtime_error" and out["feedback"].startswith("Runtime Error\n")
    assert "ZeroDivisionError" in out["feedback"] and "Last Executed Input\n1 2" in out["feedback"]

    res = opsd("check", problem, write(tmp_path / "bin.py", "import sys\nsys.stdout.buffer.write(b'3\\xff\\n')\n"),
               "--json")
    out = json.loads(res.stdout)
    assert res.returncode == 0 and out["verdict"] == "wrong_answer"
    assert "(the output is not valid UTF-8)" in out["feedback"]


def test_check_lcb_row_functional(tmp_path):
    row = str(DATA / "lcb_functional_row.json")
    good = ("```python\nclass Solution:\n    def maxPair(self, nums, k):\n"
            "        return sum(sorted(nums)[-2:]) + k\n```\n")
    res = opsd("check", row, write(tmp_path / "good.md", good), "--format", "lcb", "--json")
    assert json.loads(res.stdout)["verdict"] == "accepted", res.stdout + res.stderr
    assert json.loads(res.stdout)["tests_total"] == 3
    res = opsd("check", row, write(tmp_path / "bad.md", good.replace("+ k", "- k")), "--format", "lcb", "--json")
    out = json.loads(res.stdout)
    # [1,2,3],0 passes (k = 0); [5,5],1 gives 9 not 11; [-1,-2,-3],10 gives -13 not 7.
    assert (out["verdict"], out["tests_passed"]) == ("wrong_answer", 1)
    assert out["feedback"].startswith("Test Case 2: Wrong Answer\n\nInput\n[5, 5]\n1\n\nOutput\n9\n\nExpected\n11")


def test_grade_many_writes_verdicts_and_summary(tmp_path):
    lines = [
        {"problem_id": "add", "response": "```python\na, b = map(int, input().split())\nprint(a + b)\n```"},
        {"problem_id": "square", "response": "```python\ndef square(x):\n    return x * x\n```"},
        {"problem_id": "square", "response": "no code here", "truncated": True},
        {"problem_id": "add", "response": "```python\nprint(0)\n```"},
    ]
    responses = write(tmp_path / "r.jsonl", "".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "v.jsonl"
    res = opsd("grade", str(DATA / "problems.jsonl"), responses, "--out", str(out), "--workers", "2")
    assert res.returncode == 0, res.stderr
    verdicts = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(v["problem_id"], v["verdict"]) for v in verdicts] == [
        ("add", "accepted"), ("square", "accepted"), ("square", "format_error"), ("add", "wrong_answer")]
    assert verdicts[2]["feedback"].startswith("Truncated Attempt:")
    assert "accepted" in res.stdout and "0.500" in res.stdout and "0.250" in res.stdout


def test_humaneval_smoke_command(tmp_path):
    out = tmp_path / "he.jsonl"
    res = opsd("humaneval", "--limit", "5", "--out", str(out))
    assert res.returncode == 0, res.stderr
    assert "accepted: 5/5" in res.stdout
    assert [json.loads(line)["problem_id"] for line in out.read_text().splitlines()] == [
        f"HumanEval/{i}" for i in range(5)]
