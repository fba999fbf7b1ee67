"""Loaders: LiveCodeBench decoding (JSON and base64+zlib+pickle, malicious pickles refused), date windows,
our JSONL format with errors naming file and line, HumanEval's split into check tests."""

from __future__ import annotations

import base64
import json
import os
import pickle
import zlib
from pathlib import Path

import pytest

from sandbox.loaders import (
    RELEASE_WINDOWS,
    decode_lcb_tests,
    filter_by_date,
    lcb_row_to_problem,
    lcb_shards,
    load_humaneval,
    load_livecodebench_file,
    load_livecodebench_hf,
    load_problems_jsonl,
    release_window,
    save_problems_jsonl,
    split_check_function,
)
from sandbox.problems import Problem, ProblemError, ProblemTest, SandboxError

DATA = Path(__file__).parent / "data"
CASES = [{"input": "[1, 2]\n3", "output": "6", "testtype": "functional"},
         {"input": "[]\n0", "output": "0", "testtype": "functional"}]


def compressed(obj) -> str:
    return base64.b64encode(zlib.compress(pickle.dumps(obj))).decode("ascii")


def test_decode_json_and_compressed_pickle():
    assert decode_lcb_tests(json.dumps(CASES)) == CASES
    assert decode_lcb_tests(compressed(json.dumps(CASES))) == CASES
    assert decode_lcb_tests("") == []


class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path):
    target = tmp_path / "pwned"
    field = compressed(_Evil(str(target)))
    with pytest.raises(ProblemError, match="refus"):
        decode_lcb_tests(field)
    assert not target.exists()
    # A pickle of a JSON string wrapped in an arbitrary class is refused as well.
    with pytest.raises(ProblemError, match="refus"):
        decode_lcb_tests(compressed(Path("x")))


def test_pickle_of_non_string_and_garbage_fields():
    with pytest.raises(ProblemError, match="expected a JSON string"):
        decode_lcb_tests(compressed([1, 2]))
    with pytest.raises(ProblemError, match="neither JSON nor"):
        decode_lcb_tests("this is not base64 ###")
    with pytest.raises(ProblemError, match="JSON list"):
        decode_lcb_tests(json.dumps({"input": "1"}))


def test_lcb_file_rows_become_problems():
    problems = load_livecodebench_file(DATA / "lcb_rows.jsonl")
    assert [p.id for p in problems] == ["abc400_a", "3700", "1999A"]
    add, pair, old = problems
    assert [(t.kind, t.input, t.output, t.public) for t in add.tests] == [
        ("stdin", "1 2\n", "3\n", True), ("stdin", "10 20\n", "30\n", False), ("stdin", "-5 5\n", "0\n", False)]
    assert pair.func_name == "maxPair" and pair.starter_code.startswith("class Solution:")
    assert [(t.kind, t.input, t.output, t.public) for t in pair.tests] == [
        ("functional", "[1, 2, 3]\n0", "5", True), ("functional", "[5, 5]\n1", "11", False),
        ("functional", "[-1, -2, -3]\n10", "7", False)]
    assert (pair.date, pair.difficulty, pair.source) == ("2025-03-08T00:00:00", "medium", "livecodebench")
    assert len(old.tests) == 1


def test_lcb_parquet_equals_jsonl(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in (DATA / "lcb_rows.jsonl").read_text().splitlines()]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "rows.parquet")
    assert load_livecodebench_file(tmp_path / "rows.parquet") == load_livecodebench_file(DATA / "lcb_rows.jsonl")


def test_lcb_errors_name_file_line_and_problem(tmp_path):
    rows = (DATA / "lcb_rows.jsonl").read_text().splitlines()
    bad = json.loads(rows[1])
    bad["private_test_cases"] = compressed(_Evil(str(tmp_path / "x")))
    path = tmp_path / "bad.jsonl"
    path.write_text(rows[0] + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(SandboxError, match=r"bad\.jsonl:2: LiveCodeBench problem 3700: test-case pickle refused"):
        load_livecodebench_file(path)
    missing = json.loads(rows[0])
    del missing["question_content"]
    with pytest.raises(ProblemError, match="abc400_a: missing field 'question_content'"):
        lcb_row_to_problem(missing)
    with pytest.raises(SandboxError, match="no such"):
        load_livecodebench_file(tmp_path / "absent.jsonl")


def test_release_windows_and_date_filter():
    assert release_window("v6") == ("2025-02-01", "2025-05-01")
    assert release_window("release_v6") == ("2023-05-01", "2025-05-01")  # cumulative, as on Hugging Face
    assert release_window("release_v1") == release_window("v1")
    # Consecutive windows tile the whole range without gaps or overlaps.
    windows = [RELEASE_WINDOWS[f"v{i}"] for i in range(1, 7)]
    assert all(a[1] == b[0] for a, b in zip(windows, windows[1:]))
    with pytest.raises(SandboxError, match="unknown LiveCodeBench release"):
        release_window("v99")

    def dated(pid, day):
        return Problem(id=pid, prompt="p", tests=[ProblemTest(kind="stdin", input="", output="")], date=day)

    problems = [dated("jan", "2025-01-31T23:59:59"), dated("feb", "2025-02-01T00:00:00"),
                dated("apr", "2025-04-30"), dated("may", "2025-05-01"), dated("none", None)]
    assert [p.id for p in filter_by_date(problems, release="v6")] == ["feb", "apr"]
    assert [p.id for p in filter_by_date(problems, release="v6", date_from="2025-03-01")] == ["apr"]
    assert [p.id for p in filter_by_date(problems, date_to="2025-02-01")] == ["jan"]
    assert [p.id for p in filter_by_date(problems)] == ["jan", "feb", "apr", "may", "none"]
    with pytest.raises(SandboxError, match="not an ISO date"):
        filter_by_date(problems, date_from="March")


def test_hf_loader_downloads_the_release_shards_and_windows_them(monkeypatch, tmp_path):
    import sys
    import types

    rows = (DATA / "lcb_rows.jsonl").read_text().splitlines()  # dated 2025-04-05, 2025-03-08, 2024-08-10
    (tmp_path / "test5.jsonl").write_text(rows[2] + "\n")
    (tmp_path / "test6.jsonl").write_text(rows[0] + "\n" + rows[1] + "\n")
    for n in (1, 2, 3, 4):
        (tmp_path / ("test.jsonl" if n == 1 else f"test{n}.jsonl")).write_text("")
    asked = []

    def hf_hub_download(repo_id, filename, repo_type, cache_dir=None):
        asked.append((repo_id, filename, repo_type))
        return str(tmp_path / filename)

    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(hf_hub_download=hf_hub_download))
    assert [p.id for p in load_livecodebench_hf("v6")] == ["abc400_a", "3700"]
    assert asked == [("livecodebench/code_generation_lite", "test6.jsonl", "dataset")]
    asked.clear()
    assert [p.id for p in load_livecodebench_hf("release_v6")] == ["1999A", "abc400_a", "3700"]
    assert [a[1] for a in asked] == ["test.jsonl", "test2.jsonl", "test3.jsonl", "test4.jsonl", "test5.jsonl",
                                     "test6.jsonl"]
    assert [p.id for p in load_livecodebench_hf(None, date_to="2025-04-01")] == ["1999A", "3700"]

    def offline(**kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(hf_hub_download=offline))
    with pytest.raises(SandboxError, match="could not download test6.jsonl .*OSError: network is unreachable"):
        load_livecodebench_hf("v6")
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # not installed
    with pytest.raises(SandboxError, match="needs the `huggingface_hub` package"):
        load_livecodebench_hf("v6")
    with pytest.raises(SandboxError, match="unknown LiveCodeBench release 'v7'"):
        lcb_shards("v7")


def test_jsonl_round_trip_and_errors(tmp_path):
    problems = load_problems_jsonl(DATA / "problems.jsonl")
    assert [p.id for p in problems] == ["add", "square"]
    save_problems_jsonl(problems, tmp_path / "copy.jsonl")
    assert load_problems_jsonl(tmp_path / "copy.jsonl") == problems

    lines = (DATA / "problems.jsonl").read_text().splitlines()
    (tmp_path / "bad.jsonl").write_text(lines[0] + "\n\n" + '{"id": "x", "prompt": "p"}\n')
    with pytest.raises(SandboxError, match=r"bad\.jsonl:3: tests: Field required"):
        load_problems_jsonl(tmp_path / "bad.jsonl")
    (tmp_path / "notjson.jsonl").write_text(lines[0] + "\n{oops\n")
    with pytest.raises(SandboxError, match=r"notjson\.jsonl:2: "):
        load_problems_jsonl(tmp_path / "notjson.jsonl")
    (tmp_path / "kind.jsonl").write_text('{"id": "k", "prompt": "p", "tests": [{"kind": "magic", "input": ""}]}\n')
    with pytest.raises(SandboxError, match=r"kind\.jsonl:1: tests\.0\.kind"):
        load_problems_jsonl(tmp_path / "kind.jsonl")
    (tmp_path / "dup.jsonl").write_text(lines[0] + "\n" + lines[0] + "\n")
    with pytest.raises(SandboxError, match="'add' appears twice"):
        load_problems_jsonl(tmp_path / "dup.jsonl")
    with pytest.raises(SandboxError, match="no such problem file"):
        load_problems_jsonl(tmp_path / "absent.jsonl")


def test_humaneval_loads_164_problems_with_several_tests():
    problems = load_humaneval()
    assert len(problems) == 164
    assert all(p.source == "humaneval" and p.func_name and p.tests for p in problems)
    assert all(p.solution.startswith(p.prompt) for p in problems)
    assert sum(len(p.tests) >= 2 for p in problems) >= 150
    he0 = problems[0]
    assert he0.id == "HumanEval/0" and he0.func_name == "has_close_elements"
    assert he0.tests[0].input == "assert candidate([1.0, 2.0, 3.9, 4.0, 5.0, 2.2], 0.3) == True\n"
    # HumanEval/38 checks decode_cyclic with the prompt's encode_cyclic: the helper is in the set-up.
    he38 = problems[38]
    namespace: dict = {}
    exec(he38.check_setup, namespace)
    assert namespace["encode_cyclic"]("abcdef") == "bcaefd"


def test_check_split_keeps_loops_whole_and_dependent_statements_with_their_test():
    test_code = (
        "import math\n"
        "def check(candidate):\n"
        "    base = 2\n"
        "    assert candidate(1) == base\n"
        "    for i in range(3):\n"
        "        assert candidate(i) > 0\n"
        "    r = candidate(5)\n"
        "    assert r == 6\n"
        "    assert True\n"
    )
    setup, tests = split_check_function(test_code, prompt="def f(x):\n    pass\n", entry_point="f")
    assert tests == ["assert candidate(1) == base\n", "for i in range(3):\n    assert candidate(i) > 0\n",
                     "r = candidate(5)\nassert r == 6\n"]
    assert "import math" in setup and "base = 2" in setup and "assert True" in setup and "def f" not in setup
    with pytest.raises(ProblemError, match="never calls"):
        split_check_function("def check(candidate):\n    assert True\n", prompt="", entry_point="f")
