"""Hints files for llm_peer_hints: round trip, errors, grading (only hints that pass their problem's tests reach
the teacher), reference solutions, generation with a fake engine."""

import json
from dataclasses import dataclass

import pytest

from orchestrator.cli import main
from sandbox.problems import Problem, ProblemTest
from trainer.config import ContextConfig, DataConfig
from trainer.contexts import GradedRollout, build_teacher_texts
from trainer.data import load_problems
from trainer.hints import (
    Hint,
    HintsError,
    check_hints,
    generate_hints,
    hint_counts,
    hints_for,
    hints_from_reference_solutions,
    load_hints,
    read_hints,
    write_hints,
)
from trainer.prompts import student_prompt_text


def prob(pid, solution=None):
    return Problem(id=pid, prompt=f"task {pid}", tests=[ProblemTest(kind="stdin", input="", output="")], solution=solution)


def test_round_trip(tmp_path):
    hints = {"HumanEval/0": Hint("```python\nprint('é')\n```", True), "b": Hint("", False), "c": Hint('line1\n"q"\n')}
    path = tmp_path / "sub" / "hints.jsonl"
    write_hints(path, hints)
    assert read_hints(path) == hints
    lines = path.read_text(encoding="utf-8").splitlines()
    assert json.loads(lines[0]) == {"problem_id": "HumanEval/0", "hint": "```python\nprint('é')\n```", "passed": True}
    assert json.loads(lines[2]) == {"problem_id": "c", "hint": 'line1\n"q"\n'}  # never graded: no verdict
    assert [p.name for p in path.parent.iterdir()] == ["hints.jsonl"]  # no temporary file left


def test_missing_id_and_bad_files(tmp_path):
    path = tmp_path / "h.jsonl"
    write_hints(path, {"a": Hint("A", True)})
    with pytest.raises(HintsError, match=r"have no hint for 2 of 3 problems: b, c"):
        load_hints([prob("a"), prob("b"), prob("c")], str(path))
    assert load_hints([prob("a")], str(path)) == {"a": "A"}
    with pytest.raises(HintsError, match="hints file not found"):
        read_hints(tmp_path / "none.jsonl")
    path.write_text('{"problem_id": "a", "hint": "x"}\n\n{"problem_id": "a", "hint": "y"}\n')
    with pytest.raises(HintsError, match=r"h.jsonl:3: problem id 'a' appears twice"):
        read_hints(path)
    for bad in ('{"problem_id": "a"}', '{"problem_id": "a", "hint": "x", "passed": "yes"}'):
        path.write_text(bad + "\n")
        with pytest.raises(HintsError, match=r"h.jsonl:1: expected"):
            read_hints(path)
    path.write_text("{oops\n")
    with pytest.raises(HintsError, match=r"h.jsonl:1: not valid JSON"):
        read_hints(path)
    many = [prob(f"m{i}") for i in range(8)]
    with pytest.raises(HintsError, match=r"m0, m1, m2, m3, m4 and 3 more"):
        hints_for(many, {})


def test_ungraded_hints_are_refused_for_llm_peer_hints_and_failed_ones_never_used(tmp_path):
    path = tmp_path / "h.jsonl"
    write_hints(path, {"a": "sampled A", "b": Hint("wrong B", False), "c": Hint("right C", True)})
    problems = [prob("a"), prob("b"), prob("c")]
    with pytest.raises(HintsError, match=r"1 of 3 hints were never graded .*\(a\).*opsd hints --check"):
        load_hints(problems, str(path))
    # A user template's {hint} may be any text: an ungraded one is used, a failed one still is not.
    assert load_hints(problems, str(path), require_graded=False) == {"a": "sampled A", "b": "", "c": "right C"}


def test_hints_from_humaneval_canonical_solutions(tmp_path):
    problems = load_problems(DataConfig(max_problems=3))
    hints = hints_from_reference_solutions(problems)
    first = problems[0]
    assert hints[first.id] == "```python\n" + first.solution.strip("\n") + "\n```"
    assert "def has_close_elements" in hints[first.id] and "return False" in hints[first.id]
    assert load_hints(problems, None) == hints  # the offline default
    with pytest.raises(HintsError, match="no reference solution"):
        hints_from_reference_solutions([prob("nosol")])
    # the hint reaches the teacher as a correct solution
    teacher = build_teacher_texts([GradedRollout("x", False, "")], problem=first,
                                  context=ContextConfig(name="llm_peer_hints"), hint=hints[first.id])[0]
    assert teacher.text == (student_prompt_text(first) + "\nCorrect solution:\n\n" + hints[first.id]
                            + "\n\nCorrectly solve the original question.")


def test_a_file_of_sampled_hints_some_wrong_only_passing_ones_reach_the_teacher(tmp_path, capsys):
    """`opsd hints --check` grades a file of sampled hints in the sandbox on all of each problem's tests; the
    trial's hints are then the passing ones, and a problem whose hint failed gets no privileged context."""
    problems = load_problems(DataConfig(max_problems=4))
    canonical = hints_from_reference_solutions(problems)
    sampled = tmp_path / "sampled.jsonl"
    write_hints(sampled, {
        problems[0].id: canonical[problems[0].id],                                       # right
        problems[1].id: "```python\n" + problems[1].prompt + "    return []\n```",       # wrong answer
        problems[2].id: "I would sort the list first.",                                  # no code at all
        problems[3].id: canonical[problems[3].id],                                       # right
    })
    with pytest.raises(HintsError, match="never graded"):  # the sampled file itself is refused
        load_hints(problems, str(sampled))
    checked = tmp_path / "checked.jsonl"
    assert main(["hints", "--check", str(sampled), "--max-problems", "4", "--workers", "2",
                 "--out", str(checked)]) == 0
    assert "2 of 4 problems have a hint that passes all its tests; 2 have none" in capsys.readouterr().out
    assert read_hints(checked) == {problems[0].id: Hint(canonical[problems[0].id], True), problems[1].id: Hint("", False),
                                   problems[2].id: Hint("", False), problems[3].id: Hint(canonical[problems[3].id], True)}
    hints = load_hints(problems, str(checked))
    context = ContextConfig(name="llm_peer_hints", hints_path=str(checked))
    for problem in problems:
        teacher = build_teacher_texts([GradedRollout("x", False, "")], problem=problem, context=context,
                                      hint=hints[problem.id])[0]
        if problem.id in (problems[0].id, problems[3].id):
            assert teacher.has_context and teacher.used_hint
            assert "\nCorrect solution:\n\n" + canonical[problem.id] + "\n\nCorrectly solve" in teacher.text
        else:  # the wrong hint is nowhere in the teacher's prompt, and the rollout gets loss 0
            assert not teacher.has_context and "Correct solution" not in teacher.text
            assert teacher.text == student_prompt_text(problem)


class PredicateGrader:
    """A grader whose verdict is a predicate of the response; it records what it was asked."""

    def __init__(self, passes):
        self.passes, self.asked = passes, []

    def grade_many(self, items):
        self.asked.extend(items)
        return [type("Verdict", (), {"passed": self.passes(problem, text)})() for problem, text in items]


def test_check_hints_keeps_the_first_passing_candidate():
    problems = [prob("a"), prob("b"), prob("c")]
    grader = PredicateGrader(lambda problem, text: text.endswith("ok"))
    hints = check_hints(problems, {"a": ["A1", "A2 ok", "A3 ok"], "b": "B1", "c": ["", "  "]}, grader)
    assert hints == {"a": Hint("A2 ok", True), "b": Hint("", False), "c": Hint("", False)}
    assert [text for _, text in grader.asked] == ["A1", "A2 ok", "A3 ok", "B1"]  # blank candidates not graded
    assert hint_counts(hints) == {"hints/problems": 3.0, "hints/passing": 1.0, "hints/without": 2.0}
    with pytest.raises(HintsError, match="no hint for 1 of 3 problems: c"):
        check_hints(problems, {"a": "x", "b": "y"}, grader)


@dataclass
class FakeRollout:
    token_ids: list
    logps: list
    text: str
    finish_reason: str = "stop"


class FakeEngine:
    def __init__(self, texts_per_prompt):
        self.texts_per_prompt = texts_per_prompt
        self.calls = []

    def generate(self, prompts, *, n, temperature, top_p, max_tokens, seed=None):
        self.calls.append(dict(prompts=prompts, n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed))
        return [[FakeRollout([], [], t) for t in texts[:n]] for texts in self.texts_per_prompt]


class CharTokenizer:
    chat_template = "{{ messages }}"

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        return "<u>" + messages[0]["content"] + "<a>"

    def __call__(self, text, add_special_tokens):
        return {"input_ids": [ord(c) for c in text]}


def test_generate_hints_keeps_the_first_passing_sample():
    problems = [prob("a"), prob("b")]
    engine = FakeEngine([["<think>hmm</think>\nA1", "A2 ok"], ["B1", "B2"]])
    grader = PredicateGrader(lambda problem, text: text.endswith("ok"))
    hints, counts = generate_hints(problems, engine, CharTokenizer(), grader, n_samples=2, temperature=0.7,
                                   max_tokens=99, seed=5)
    assert hints == {"a": Hint("A2 ok", True), "b": Hint("", False)}
    assert counts == {"hints/problems": 2.0, "hints/passing": 1.0, "hints/without": 1.0}
    assert [text for _, text in grader.asked] == ["A1", "A2 ok", "B1", "B2"]  # thinking removed before grading
    call = engine.calls[0]
    assert call["n"] == 2 and call["temperature"] == 0.7 and call["max_tokens"] == 99 and call["seed"] == 5
    assert call["prompts"][1] == [ord(c) for c in "<u>" + student_prompt_text(problems[1]) + "<a>"]
