"""Hints files for llm_peer_hints: round trip, errors, reference solutions, generation with a fake engine."""

import json
from dataclasses import dataclass

import pytest

from sandbox.problems import Problem, ProblemTest
from trainer.config import ContextConfig, DataConfig
from trainer.contexts import GradedRollout, build_teacher_texts
from trainer.data import load_problems
from trainer.hints import (
    HintsError,
    generate_hints,
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
    hints = {"HumanEval/0": "```python\nprint('é')\n```", "b": "", "c": 'line1\n"quoted"\n'}
    path = tmp_path / "sub" / "hints.jsonl"
    write_hints(path, hints)
    assert read_hints(path) == hints
    lines = path.read_text(encoding="utf-8").splitlines()
    assert json.loads(lines[0]) == {"problem_id": "HumanEval/0", "hint": "```python\nprint('é')\n```"}
    assert [p.name for p in path.parent.iterdir()] == ["hints.jsonl"]  # no temporary file left


def test_missing_id_and_bad_files(tmp_path):
    path = tmp_path / "h.jsonl"
    write_hints(path, {"a": "A"})
    with pytest.raises(HintsError, match=r"have no hint for 2 of 3 problems: b, c"):
        load_hints([prob("a"), prob("b"), prob("c")], str(path))
    assert load_hints([prob("a")], str(path)) == {"a": "A"}
    with pytest.raises(HintsError, match="hints file not found"):
        read_hints(tmp_path / "none.jsonl")
    path.write_text('{"problem_id": "a", "hint": "x"}\n\n{"problem_id": "a", "hint": "y"}\n')
    with pytest.raises(HintsError, match=r"h.jsonl:3: problem id 'a' appears twice"):
        read_hints(path)
    path.write_text('{"problem_id": "a"}\n')
    with pytest.raises(HintsError, match=r"h.jsonl:1: expected"):
        read_hints(path)
    path.write_text("{oops\n")
    with pytest.raises(HintsError, match=r"h.jsonl:1: not valid JSON"):
        read_hints(path)
    many = [prob(f"m{i}") for i in range(8)]
    with pytest.raises(HintsError, match=r"m0, m1, m2, m3, m4 and 3 more"):
        hints_for(many, {})


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


def test_generate_hints_first_and_first_passing():
    problems = [prob("a"), prob("b")]
    engine = FakeEngine([["<think>hmm</think>\nA1", "A2 ok"], ["B1", "B2"]])
    hints, metrics = generate_hints(problems, engine, CharTokenizer(), n_samples=2, temperature=0.7, max_tokens=99, seed=5)
    assert hints == {"a": "A1", "b": "B1"}
    call = engine.calls[0]
    assert call["n"] == 2 and call["temperature"] == 0.7 and call["max_tokens"] == 99 and call["seed"] == 5
    assert call["prompts"][1] == [ord(c) for c in "<u>" + student_prompt_text(problems[1]) + "<a>"]
    hints, metrics = generate_hints(problems, engine, CharTokenizer(), n_samples=2,
                                    grade=lambda problem, text: text.endswith("ok"))
    assert hints == {"a": "A2 ok", "b": ""} and metrics["hints/passing_fraction"] == 0.5
