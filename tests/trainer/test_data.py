"""Trial data: loading and date windows, the train/validation split, the resumable prompt sampler."""

import math
from collections import Counter

import pytest

from sandbox.loaders import save_problems_jsonl
from sandbox.problems import Problem, ProblemTest
from trainer.config import DataConfig
from trainer.data import DataError, PromptSampler, load_problems, make_split, train_tests_of


def problem(pid, n_tests, date=None, n_public=0):
    tests = [ProblemTest(kind="stdin", input=f"pub{i}", output="x", public=True) for i in range(n_public)]
    tests += [ProblemTest(kind="stdin", input=f"{pid}-{i}", output=str(i)) for i in range(n_tests)]
    return Problem(id=pid, prompt=f"problem {pid}", tests=tests, date=date, source="livecodebench")


PROBLEMS = [problem(f"q{i}", n_tests=1 + (i * 7) % 12) for i in range(40)]


def test_tests_split_sizes_membership_and_order():
    cfg = DataConfig(train_test_fraction=0.5, seed=0)
    split = make_split(PROBLEMS, cfg)
    assert split.kind == "tests" and len(split.train) == len(split.val) == 40
    for tp in split.train:
        n = len(tp.problem.tests)
        assert len(tp.train_tests) == max(1, n // 2)
        positions = [tp.problem.tests.index(t) for t in tp.train_tests]
        assert positions == sorted(positions) and len(set(positions)) == len(positions)
    # evaluation uses every test
    assert all(p.tests == q.tests for p, q in zip(split.val, sorted(PROBLEMS, key=lambda p: int(p.id[1:]))))


@pytest.mark.parametrize("fraction", [0.1, 0.3, 0.75, 1.0])
def test_tests_split_fraction_and_at_least_one(fraction):
    split = make_split(PROBLEMS, DataConfig(train_test_fraction=fraction))
    for tp in split.train:
        n = len(tp.problem.tests)
        assert len(tp.train_tests) == max(1, int(n * fraction + 1e-9))
        assert len(tp.train_tests) >= 1


def test_tests_split_is_seeded_and_independent_of_other_problems():
    a = make_split(PROBLEMS, DataConfig(seed=3))
    b = make_split(list(reversed(PROBLEMS)), DataConfig(seed=3))
    assert a == b
    alone = train_tests_of(PROBLEMS[5], fraction=0.5, seed=3)
    assert next(tp for tp in a.train if tp.id == PROBLEMS[5].id).train_tests == alone
    c = make_split(PROBLEMS, DataConfig(seed=4))
    assert any(x.train_tests != y.train_tests for x, y in zip(a.train, c.train))


def test_tests_split_draws_from_private_tests_and_is_roughly_uniform():
    p = problem("lcb", n_tests=4, n_public=2)
    counts = Counter()
    for seed in range(400):
        chosen = train_tests_of(p, fraction=0.5, seed=seed)
        assert len(chosen) == 2 and not any(t.public for t in chosen)
        counts.update(t.input for t in chosen)
    # each private test is chosen with probability 1/2: 200 of 400, sd 10
    assert set(counts) == {f"lcb-{i}" for i in range(4)}
    assert all(abs(c - 200) < 50 for c in counts.values())
    only_public = Problem(id="pub", prompt="x", tests=[ProblemTest(kind="stdin", input="1", public=True)] * 3)
    assert len(train_tests_of(only_public, fraction=0.5, seed=0)) == 1


def test_problems_split_is_disjoint_and_sized():
    cfg = DataConfig(split="problems", val_fraction=0.2, seed=1)
    split = make_split(PROBLEMS, cfg)
    train_ids = {tp.id for tp in split.train}
    val_ids = {p.id for p in split.val}
    assert not train_ids & val_ids and train_ids | val_ids == {p.id for p in PROBLEMS}
    assert len(val_ids) == round(40 * 0.2)
    assert all(tp.train_tests == tuple(tp.problem.tests) for tp in split.train)
    assert make_split(PROBLEMS, cfg) == split
    assert {p.id for p in make_split(PROBLEMS, DataConfig(split="problems", seed=2)).val} != val_ids
    with pytest.raises(DataError, match="at least 2 problems"):
        make_split(PROBLEMS[:1], cfg)


def test_max_val_problems():
    split = make_split(PROBLEMS, DataConfig(max_val_problems=7))
    assert len(split.val) == 7 and len(split.train) == 40
    ids = [p.id for p in split.val]
    assert ids == sorted(ids, key=lambda s: int(s[1:]))
    assert make_split(PROBLEMS, DataConfig(max_val_problems=7)).val == split.val


def test_sampler_epochs_are_permutations():
    items = list(range(10))
    sampler = PromptSampler(items, seed=0)
    seen = sampler.next_batch(4) + sampler.next_batch(4) + sampler.next_batch(4) + sampler.next_batch(8)
    assert sorted(seen[:10]) == items and sorted(seen[10:20]) == items
    assert seen[:10] != seen[10:20]  # a fresh order each epoch
    assert PromptSampler(items, seed=0).next_batch(20) == seen
    assert PromptSampler(items, seed=1).next_batch(10) != seen[:10]


def test_sampler_resume_sees_the_same_batches():
    items = [f"p{i}" for i in range(13)]
    reference = PromptSampler(items, seed=7)
    expected = [reference.next_batch(5) for _ in range(8)]
    first = PromptSampler(items, seed=7)
    got = [first.next_batch(5) for _ in range(3)]
    state = dict(first.state_dict())
    resumed = PromptSampler(items, seed=7)
    resumed.load_state_dict(state)
    got += [resumed.next_batch(5) for _ in range(5)]
    assert got == expected
    with pytest.raises(DataError, match="data settings changed"):
        PromptSampler(items[:-1], seed=7).load_state_dict(state)
    with pytest.raises(DataError, match=r"\(other problem ids\): the data settings changed"):
        PromptSampler(items[:-1] + ["other"], seed=7).load_state_dict(state)
    with pytest.raises(DataError, match="data settings changed"):
        PromptSampler(items, seed=8).load_state_dict(state)


def test_sampler_state_survives_json_and_uses_problem_ids():
    import json

    split = make_split(PROBLEMS, DataConfig())
    sampler = PromptSampler(split.train, seed=0)
    sampler.next_batch(33)
    state = json.loads(json.dumps(sampler.state_dict()))
    resumed = PromptSampler(make_split(PROBLEMS, DataConfig()).train, seed=0)
    resumed.load_state_dict(state)
    assert [tp.id for tp in resumed.next_batch(30)] == [tp.id for tp in sampler.next_batch(30)]


def test_load_jsonl_window_order_and_max(tmp_path):
    path = tmp_path / "p.jsonl"
    dated = [problem("x10", 2, "2025-03-01"), problem("x2", 2, "2025-01-15"), problem("x9", 2, "2025-02-01"),
             problem("x1", 2, "2025-04-30T10:00:00"), problem("x3", 2, "2025-05-01")]
    save_problems_jsonl(dated, path)
    got = load_problems(DataConfig(source="jsonl", path=str(path), release="v6"))
    assert [p.id for p in got] == ["x1", "x9", "x10"]  # natural id order, window [2025-02-01, 2025-05-01)
    got = load_problems(DataConfig(source="jsonl", path=str(path), date_from="2025-03-01", max_problems=1))
    assert [p.id for p in got] == ["x1"]


def test_empty_window_names_window_and_source(tmp_path):
    path = tmp_path / "p.jsonl"
    save_problems_jsonl([problem("a", 1, "2024-01-05"), problem("b", 1, "2024-03-01")], path)
    with pytest.raises(DataError) as err:
        load_problems(DataConfig(source="jsonl", path=str(path), release="v6"))
    msg = str(err.value)
    assert "[2025-02-01, 2025-05-01)" in msg and "v6" in msg and "2 problems dated 2024-01-05 to 2024-03-01" in msg
    assert err.value.user_facing
    with pytest.raises(DataError, match="164 problems, none of them dated"):
        load_problems(DataConfig(source="humaneval", date_from="2025-01-01"))


def test_missing_file():
    with pytest.raises(DataError, match="data.path: file not found: /nonexistent/p.jsonl"):
        load_problems(DataConfig(source="jsonl", path="/nonexistent/p.jsonl"))


def test_humaneval_default_offline():
    problems = load_problems(DataConfig(max_problems=12))
    assert [p.id for p in problems] == [f"HumanEval/{i}" for i in range(12)]
    split = make_split(problems, DataConfig())
    for tp in split.train:
        assert len(tp.train_tests) == max(1, math.floor(len(tp.problem.tests) / 2))


def lcb_row(qid, date, private, public=(), func_name=None, starter=""):
    import base64
    import json
    import pickle
    import zlib

    def enc(cases):
        return base64.b64encode(zlib.compress(pickle.dumps(json.dumps(cases)))).decode()

    kind = "functional" if func_name else "stdin"
    return {
        "question_title": qid, "question_content": f"Solve {qid}.", "platform": "atcoder", "question_id": qid,
        "contest_id": "c1", "contest_date": date, "starter_code": starter, "difficulty": "easy",
        "public_test_cases": json.dumps([{"input": i, "output": o, "testtype": kind} for i, o in public]),
        "private_test_cases": enc([{"input": i, "output": o, "testtype": kind} for i, o in private]),
        "metadata": json.dumps({"func_name": func_name} if func_name else {}),
    }


def test_livecodebench_local_file_v6_and_private_split(tmp_path):
    import json

    rows = [
        lcb_row("abc400_a", "2025-04-05T00:00:00", private=[(f"{i}\n", f"{i}\n") for i in range(6)], public=[("9\n", "9\n")]),
        lcb_row("abc390_b", "2025-01-25T00:00:00", private=[("1\n", "1\n")]),
        lcb_row("3700", "2025-02-10T00:00:00", private=[("[1]", "1"), ("[2]", "2")], func_name="f",
                starter="class Solution:\n    def f(self, a):\n        "),
    ]
    path = tmp_path / "lcb.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    problems = load_problems(DataConfig(source="livecodebench", path=str(path), release="v6"))
    assert [p.id for p in problems] == ["3700", "abc400_a"]
    split = make_split(problems, DataConfig())
    by_id = {tp.id: tp for tp in split.train}
    assert len(by_id["abc400_a"].train_tests) == 3 and not any(t.public for t in by_id["abc400_a"].train_tests)
    assert len(by_id["3700"].train_tests) == 1
    assert len(next(p for p in split.val if p.id == "abc400_a").tests) == 7
