"""`opsd screen` on a trial file: every context's initial gap from one engine start and one student pass.

The copy task (tests/trainer/copy_task.py) gives a self-teacher that clearly beats the student with
`llm_peer_hints`. One screen of the six built-in contexts (with a fitted law, so the predictions are checked
on the same run) is compared with the stored rollouts re-graded by the sandbox's own commands, and with a
gap-only trial of the same context and seed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from tests.trainer.copy_task import copy_task
from tests.trainer.test_trial import clean_env, trial_file

OPSD = [sys.executable, "-m", "orchestrator.cli"]
CONTEXTS = ["none", "expert_preamble", "feedback", "llm_peer_hints", "own_solution_feedback",
            "peer_solution_feedback"]
# Two attempts per problem, so a group can hold a peer and the `none` teacher's seeds overlap the student's.
SIZES = ["--set", "eval.teacher_n_samples=2"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("screen")
    data, model = copy_task(root, tiny_model_dir)
    setup = {"root": root, "data": data, "model": model}
    setup["trial"] = trial_file(setup, "llm_peer_hints")
    return setup


@pytest.fixture(scope="module")
def law(setup) -> Path:
    from analysis.fit import fit_law
    from analysis.results import completed_trials
    from tests.analysis.conftest import noisy_trials

    path = setup["root"] / "law.json"
    fit_law(completed_trials(noisy_trials(np.random.default_rng(0)))).law.save(path)
    return path


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*OPSD, *args], capture_output=True, text=True, timeout=900, env=clean_env())


@pytest.fixture(scope="module")
def screened(setup, law) -> dict:
    out = setup["root"] / "screen"
    proc = run("screen", str(setup["trial"]), "--out", str(out), "--law", str(law), "--pooled", *SIZES)
    assert proc.returncode == 0, proc.stderr[-3000:] + (out / "screen.log").read_text()[-3000:]
    rows = json.loads((out / "screen.json").read_text())["rows"]
    return {"out": out, "proc": proc, "rows": {row["context"]: row for row in rows}, "order": [r["context"] for r in rows]}


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_one_student_pass_serves_every_context(screened):
    rows = screened["rows"]
    assert screened["order"] == CONTEXTS
    student = {(r["initial_student_acc_t1"], r["initial_student_test_frac_t1"]) for r in rows.values()}
    assert len(student) == 1  # the same attempts for every context, by construction
    hints = rows["llm_peer_hints"]
    assert hints["initial_teacher_acc"] >= hints["initial_student_acc_t1"] + 0.5
    assert hints["initial_gap_lo"] > 0 and hints["initial_gap_test_frac_lo"] > 0  # the interval excludes zero
    for row in rows.values():
        assert row["initial_gap"] == pytest.approx(row["initial_teacher_acc"] - row["initial_student_acc_t1"])
        assert row["initial_gap_lo"] <= row["initial_gap"] <= row["initial_gap_hi"]
        assert (row["val_problems"], row["n_samples"], row["bootstrap_resamples"]) == (8, 2, 2000)
    # The tiny student never solves a problem on its own, and neither does the teacher without the solution:
    # with the control `none` (the teacher's prompt is the student's) the gap is exactly 0.
    assert rows["none"]["initial_student_acc_t1"] == 0.0
    assert rows["none"]["initial_gap"] == 0.0 and rows["none"]["initial_gap_lo"] == rows["none"]["initial_gap_hi"] == 0.0
    table = pd.read_parquet(screened["out"] / "screen.parquet")
    assert table["context"].tolist() == CONTEXTS
    assert table["initial_gap"].tolist() == [rows[c]["initial_gap"] for c in CONTEXTS]


def test_the_none_teacher_is_the_student(screened):
    """Same prompt, same decoding, and evaluate.py's seeds: the `none` teacher's answer to attempt k is drawn
    with the seed of the student's attempt k + 1, so within a problem it is that very attempt."""
    student = jsonl(screened["out"] / "student.jsonl")
    teacher = [r for r in jsonl(screened["out"] / "teacher.jsonl") if r["context"] == "none"]
    same = [teacher[k]["response"] == student[k + 1]["response"]
            for k in range(len(student) - 1) if student[k]["problem_id"] == student[k + 1]["problem_id"]]
    assert len(same) == 8 and all(same)


def test_console_shows_progress_and_the_table_and_no_third_party_noise(screened):
    proc, out = screened["proc"], screened["out"]
    for phase in ("engine start", "student sampling", "grading", "teacher 6/6: peer_solution_feedback"):
        assert phase in proc.stderr
    assert "INFO" not in proc.stderr and "WARNING" not in proc.stderr and "Warning" not in proc.stderr
    printed = " ".join(proc.stdout.split())  # the caption wraps
    assert "llm_peer_hints" in printed and "gap acc [lo, hi]" in printed
    assert "95% paired bootstrap interval over problems (2000 resamples, seed 0)" in printed
    assert (out / "screen.log").is_file()
    # Nothing our own code warns about reaches the log either.
    log = (out / "screen.log").read_text()
    assert not [line for line in log.splitlines() if "Warning" in line and ("/trainer/" in line or "/orchestrator/" in line)]


def test_stored_rollouts_regrade_to_the_same_verdicts(screened, setup):
    """The numbers are real: the sandbox's own commands grade the stored responses the same way, and the
    accuracies follow from the stored verdicts."""
    out = screened["out"]
    student, teacher = jsonl(out / "student.jsonl"), jsonl(out / "teacher.jsonl")
    rows = screened["rows"]
    assert rows["none"]["initial_student_acc_t1"] == np.mean([r["passed"] for r in student])
    for context in CONTEXTS:
        mine = [r for r in teacher if r["context"] == context]
        assert len(mine) == len(student) == 16
        assert rows[context]["initial_teacher_acc"] == pytest.approx(np.mean([r["passed"] for r in mine]))
        assert rows[context]["initial_teacher_test_frac"] == pytest.approx(
            np.mean([r["tests_passed"] / r["tests_total"] for r in mine]))

    # Every response through `opsd sandbox grade` (one sandbox for all of them).
    responses = out / "all-responses.jsonl"
    responses.write_text("".join(json.dumps({"problem_id": r["problem_id"], "response": r["response"],
                                             "truncated": r["truncated"]}) + "\n" for r in student + teacher))
    graded = run("sandbox", "grade", str(out / "problems.jsonl"), str(responses), "--out", str(out / "regraded.jsonl"))
    assert graded.returncode == 0, graded.stderr
    regraded = jsonl(out / "regraded.jsonl")
    assert [(r["verdict"], r["tests_passed"]) for r in regraded] == [(r["verdict"], r["tests_passed"])
                                                                    for r in student + teacher]

    # A few through `opsd sandbox check PROBLEM RESPONSE --json`, which grades a response's ```python block but
    # runs a text without a complete one as a bare program (a format error for the trainer): pick complete ones.
    from sandbox.extract import extract_code

    problems = {p["id"]: p for p in jsonl(out / "problems.jsonl")}
    fenced = [r for r in student + teacher if not r["truncated"] and extract_code(r["response"], mode="longest")]
    picked = [r for r in fenced if r["passed"]][:2] + [r for r in fenced if not r["passed"]][:1]
    assert any(r["passed"] for r in picked)
    for i, record in enumerate(picked):
        problem, response = out / f"check-{i}.json", out / f"check-{i}.md"
        problem.write_text(json.dumps(problems[record["problem_id"]]))
        response.write_text(record["response"])
        checked = run("sandbox", "check", str(problem), str(response), "--json")
        assert checked.returncode == 0, checked.stderr
        verdict = json.loads(checked.stdout)
        assert (verdict["verdict"], verdict["passed"], verdict["tests_passed"]) == \
            (record["verdict"], record["passed"], record["tests_passed"])


@pytest.mark.slow
def test_screen_agrees_with_a_gap_only_trial(screened, setup):
    """A gap-only trial of llm_peer_hints with the same seed samples the same student attempts and the same
    teacher answers (evaluate.py's seeds, an engine of the same settings; at step 0 the EMA teacher's weights
    pushed into the trial's engine are the initial model's), so the numbers are equal, not just close.
    Slow: a second engine start and a DeepSpeed student (about 2 minutes on 2 busy cores)."""
    out = setup["root"] / "gap-only"
    proc = run("trial", str(setup["trial"]), "--out", str(out), "--set", "steps=0", *SIZES)
    assert proc.returncode == 0, proc.stderr[-3000:]
    trial = json.loads((out / "trial.json").read_text())
    row = screened["rows"]["llm_peer_hints"]
    for key in ("initial_student_acc_t1", "initial_teacher_acc", "initial_gap", "initial_teacher_test_frac",
                "initial_gap_test_frac"):
        assert row[key] == pytest.approx(trial[key], abs=1e-12), key


def test_predictions_come_from_the_law(screened, law):
    from analysis.predict import screen

    rows = pd.DataFrame([screened["rows"][c] for c in CONTEXTS])
    expected = screen(law, rows, pooled=True)
    assert rows["predicted_improvement"].to_numpy() == pytest.approx(expected["predicted_improvement"].to_numpy())
    assert rows["pi_lo"].to_numpy() == pytest.approx(expected["pi_lo"].to_numpy())
    assert (rows["law"] == "pooled").all()
    assert "predicted improvement" in screened["proc"].stdout


def test_a_law_without_intervals_is_refused_before_anything_runs(setup, tmp_path):
    from analysis.fit import fit_law
    from analysis.results import completed_trials
    from tests.analysis.conftest import trials_from

    trials = trials_from([("a", [0.0, 0.01], [0.0, 0.01]), ("b", [0.2, 0.21], [0.1, 0.11])], family="tiny")
    fit_law(completed_trials(trials)).law.save(tmp_path / "law.json")
    proc = run("screen", str(setup["trial"]), "--out", str(tmp_path / "out"), "--law", str(tmp_path / "law.json"),
               "--pooled")
    assert proc.returncode == 2
    assert proc.stderr.startswith("opsd screen: error: the law 'pooled' is a line through 2 configurations")
    assert not (tmp_path / "out").exists()


def test_contexts_by_name_and_unknown_ones(setup, tmp_path):
    proc = run("screen", str(setup["trial"]), "--out", str(tmp_path), "--contexts", "none,feedbak")
    assert proc.returncode == 2
    assert "unknown context 'feedbak' to screen; known here: none, expert_preamble" in proc.stderr


def test_the_screen_samples_with_the_trials_evaluation_seeds():
    from trainer.config import TrialConfig
    from trainer.runtime import TrialRuntime
    from trainer.screen import eval_sampling_seed

    for seed in (0, 1, 17):
        cfg = TrialConfig(seed=seed)
        assert eval_sampling_seed(cfg) == TrialRuntime.sampling_seed(SimpleNamespace(cfg=cfg), 0, "eval")


def test_bootstrap_interval_is_paired_and_seeded():
    from trainer.screen import bootstrap_gap_interval

    rng = np.random.default_rng(3)
    student = rng.uniform(0, 1, 40)
    teacher = student + 0.1  # the same lead on every problem: every paired resample gives exactly 0.1
    lo, hi = bootstrap_gap_interval(student, teacher, resamples=500, seed=1)
    assert lo == pytest.approx(0.1) and hi == pytest.approx(0.1)
    # Against a loop written here: the same seeded draws, percentiles of the resampled gaps.
    teacher = rng.uniform(0, 1, 40)
    draws = np.random.default_rng(5).integers(0, 40, size=(300, 40))
    gaps = [teacher[i].mean() - student[i].mean() for i in draws]
    assert bootstrap_gap_interval(student, teacher, resamples=300, seed=5) == pytest.approx(
        tuple(np.quantile(gaps, [0.025, 0.975])))
