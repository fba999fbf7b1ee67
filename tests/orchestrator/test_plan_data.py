"""`opsd sweep plan` counts a sweep's problems from the data when it is on this machine (those it will drop as
over-long too, with the model's tokenizer), and states its assumption when it is not."""

from __future__ import annotations

from pathlib import Path

from orchestrator.plan import eval_tokens
from orchestrator.plan_data import ASSUMED_VAL_PROBLEMS, data_lines, problem_counts
from orchestrator.sweep_file import load_sweep
from sandbox.loaders import save_problems_jsonl
from sandbox.problems import Problem, ProblemTest

SWEEP = """\
name: counted
storage: {storage}
models:
  - {{path: {model}, label: tiny, family: smollm2, size_b: 0.135}}
contexts: [none]
seeds: [0]
data: {{source: jsonl, path: {data}, split: problems, val_fraction: 0.25 {extra}}}
trial:
  steps: 10
  rollout: {{prompts_per_step: 2, n_samples: 2, max_response_tokens: 64, max_prompt_tokens: 512}}
  optim: {{mini_batch_size: 4}}
  eval: {{every_steps: 5, n_samples: 2, teacher_n_samples: 1}}
"""


def problems_file(tmp_path: Path) -> Path:
    """7 problems of a short statement and 3 of about 3,000 words: far on either side of 512 tokens."""
    test = [ProblemTest(kind="stdin", input="1 2\n", output="3\n")]
    short = [Problem(id=f"short{i}", prompt="Read two integers and print their sum.", tests=test) for i in range(7)]
    long = [Problem(id=f"long{i}", prompt="Read the numbers. " + "word " * 3000, tests=test) for i in range(3)]
    path = tmp_path / "problems.jsonl"
    save_problems_jsonl(short + long, path)
    return path


def sweep(tmp_path: Path, *, model: str = "embedded:smollm2-135m-instruct", data: Path | None = None,
          extra: str = "") -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(SWEEP.format(storage=tmp_path / "store", model=model, data=data or problems_file(tmp_path),
                                 extra=extra))
    return path


def test_problems_are_counted_from_local_data_with_the_models_tokenizer(tmp_path):
    path = sweep(tmp_path)
    _, points = load_sweep(path)
    counts = problem_counts(points[0].config)
    # 3 long problems dropped; of the 7 kept, round(7 x 0.25) = 2 validate and 5 train.
    assert (counts.loaded, counts.dropped, counts.train, counts.val) == (10, 3, 5, 2)
    # The estimate evaluates those 2 problems: 10 steps evaluated every 5 and before step 1 = 3 evaluations,
    # each of 2 + 1 + 1 samples (mean@2, the student's attempt at T=1, the self-teacher) of 32 tokens on average.
    assert eval_tokens(points[0]) == 3 * 2 * 4 * 32
    assert data_lines(points) == [
        f"data of tiny: 10 jsonl problems from {tmp_path / 'problems.jsonl'}, 3 dropped (student prompt longer "
        "than 512 tokens): 5 train and 2 validation problems (data.split 'problems')"]


def test_without_the_data_or_the_tokenizer_the_plan_says_what_it_assumes(tmp_path):
    _, points = load_sweep(sweep(tmp_path, data=tmp_path / "elsewhere.jsonl"))
    counts = problem_counts(points[0].config)
    assert counts.loaded is None and "elsewhere.jsonl is not on this machine" in counts.source
    assert counts.val_for_estimate(points[0].config) == ASSUMED_VAL_PROBLEMS == 100
    assert eval_tokens(points[0]) == 3 * 100 * 4 * 32
    _, points = load_sweep(sweep(tmp_path, data=tmp_path / "elsewhere.jsonl", extra=", max_val_problems: 7"))
    assert problem_counts(points[0].config).val_for_estimate(points[0].config) == 7
    # The data is here but the model's tokenizer is not: problems counted, over-long ones not (all 10 split:
    # round(10 x 0.25) = 2 validate, Python rounding half to even, and 8 train).
    _, points = load_sweep(sweep(tmp_path, model="nobody/no-such-model"))
    counts = problem_counts(points[0].config)
    assert (counts.loaded, counts.dropped, counts.train, counts.val) == (10, None, 8, 2)
    assert counts.tokenizer_note == "the tokenizer of nobody/no-such-model is not on this machine"
    assert data_lines(points) == [
        f"data of tiny: 10 jsonl problems from {tmp_path / 'problems.jsonl'}, over-long prompts not counted (the "
        "tokenizer of nobody/no-such-model is not on this machine): 8 train and 2 validation problems (data.split "
        "'problems')"]
