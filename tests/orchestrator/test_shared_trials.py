"""Trials shared between sweeps: the same settings in the same storage are trained once, linked by the second
sweep (its plan, sweep.json, status and collect say so), and `opsd analyze` on both sweeps counts them once."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from orchestrator.cli import main
from orchestrator.collect import collect
from orchestrator.shared_trials import result_key, shared_between
from orchestrator.sweep_file import load_sweep
from orchestrator.sweep_state import SweepState, prepare_sweep_dir, sweep_location
from orchestrator.sweep_status import status_table, sweep_status

SWEEPS = Path(__file__).resolve().parents[2] / "sweeps"

SWEEP = """\
name: {name}
storage: {storage}
models:
  - {{path: nobody/tiny-model, label: tiny, family: smollm2, size_b: 0.135}}   # no tokenizer here: the plan counts fast
contexts: {contexts}
seeds: [0]
data: {{source: humaneval, max_val_problems: 4}}
trial:
  steps: 1
  context: {{max_teacher_prompt_tokens: 512 {hints}}}
  rollout: {{prompts_per_step: 2, n_samples: 2, max_response_tokens: 32, max_prompt_tokens: 512}}
  optim: {{mini_batch_size: 4}}
"""


def sweep_file(tmp_path: Path, name: str, contexts: str, hints: str = "") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(SWEEP.format(name=name, storage=tmp_path / "store", contexts=contexts, hints=hints))
    return path


def finish(trial_dir: Path, *, gap: float, improvement: float) -> None:
    """What a completed trial leaves: trial.json and its eval rows (no training needed to test the bookkeeping)."""
    trial_dir.mkdir(parents=True, exist_ok=True)
    summary = {"status": "completed", "initial_student_acc": 0.2, "initial_student_acc_t1": 0.1,
               "initial_teacher_acc": 0.1 + gap, "initial_gap": gap, "final_student_acc": 0.2 + improvement,
               "improvement": improvement, "steps": 1}
    (trial_dir / "trial.json").write_text(json.dumps(summary))
    rows = [{"step": s, "phase": "eval", "student_acc": 0.2 + s * improvement, "student_acc_t1": 0.1,
             "teacher_acc": 0.1 + gap, "gap": gap} for s in (0, 1)]
    pq.write_table(pa.Table.from_pylist(rows), trial_dir / "steps.parquet")


def test_paper_fig1_and_fig3_share_the_three_qwen3_8b_peer_solution_feedback_trials():
    fig1, points1 = load_sweep(SWEEPS / "paper_fig1.yaml")
    fig3, points3 = load_sweep(SWEEPS / "paper_fig3.yaml")
    shared = shared_between([(fig1.name, fig1.storage, points1), (fig3.name, fig3.storage, points3)])
    assert shared == {("paper-fig3", f"qwen3-8b-peer_solution_feedback-s{s}"): "paper-fig1" for s in (0, 1, 2)}
    # Fig. 1's hints file is in every trial's settings; it counts only where the context reads hints.
    hints = next(p for p in points1 if p.context == "llm_peer_hints")
    assert hints.config.context.hints_path is not None
    assert result_key(hints.config) != result_key(hints.config.model_copy(update={
        "context": hints.config.context.model_copy(update={"hints_path": "/other.jsonl"})}))
    # Another storage folder is another set of results, and remote storage links nothing: nothing is shared.
    assert shared_between([(fig1.name, "/a", points1), (fig3.name, "/b", points3)]) == {}
    assert shared_between([(fig1.name, "s3://b/p", points1), (fig3.name, "s3://b/p", points3)]) == {}


def test_a_second_sweep_links_the_trials_a_first_one_completed(tmp_path, monkeypatch, capsys):
    first_file = sweep_file(tmp_path, "first", "[none, peer_solution_feedback]")
    second_file = sweep_file(tmp_path, "second", "[peer_solution_feedback, feedback]")
    first, first_points = load_sweep(first_file)
    first_state = prepare_sweep_dir(first, first_points, sweep_location(first)[0], first_file)
    second, second_points = load_sweep(second_file)
    # Nothing completed yet: the second sweep trains everything itself.
    early = sweep_location(second)[0] / "early"
    assert prepare_sweep_dir(second, second_points, early, second_file).links == {}
    finish(first_state.trial_files("tiny-none-s0").dir, gap=0.05, improvement=0.02)
    finish(first_state.trial_files("tiny-peer_solution_feedback-s0").dir, gap=0.20, improvement=0.10)

    # The plan of the second sweep says which trial it will link, and leaves it out of its total.
    monkeypatch.setenv("COLUMNS", "250")
    assert main(["sweep", "plan", str(second_file)]) == 0
    plan = capsys.readouterr().out
    assert "shared: trained by first, not counted" in plan
    assert "2 trials (1 shared with first: trained there, not here)" in plan

    state = prepare_sweep_dir(second, second_points, sweep_location(second)[0], second_file)
    assert state.links == {"tiny-peer_solution_feedback-s0": "first/trials/tiny-peer_solution_feedback-s0"}
    assert state.trials_to_train == ["tiny-feedback-s0"]
    assert json.loads((state.dir / "sweep.json").read_text())["links"] == state.links
    assert not (state.dir / "trials" / "tiny-peer_solution_feedback-s0").exists()  # no folder of its own
    assert SweepState.read(state.dir).links == state.links  # what `status`, `collect`, `resume` read

    statuses = {s.trial_id: s for s in sweep_status(state)}
    linked = statuses["tiny-peer_solution_feedback-s0"]
    assert (linked.state, linked.linked) == ("completed", "first") and statuses["tiny-feedback-s0"].state == "pending"
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(status_table(state, list(statuses.values())))
    assert "completed (in first)" in console.export_text()

    # The second sweep's own trial completes; collect writes the linked one with where it was trained.
    finish(state.trial_files("tiny-feedback-s0").dir, gap=0.10, improvement=0.06)
    collect(first_state)
    trials_path, steps_path, counts = collect(state)
    rows = pd.read_parquet(trials_path).set_index("trial_id")
    assert counts == {"completed": 2}
    assert rows.loc["tiny-peer_solution_feedback-s0", "trained_in"] == "first"
    assert rows.loc["tiny-feedback-s0", "trained_in"] == "second"
    first_rows = pd.read_parquet(first_state.dir / "trials.parquet").set_index("trial_id")
    assert rows.loc["tiny-peer_solution_feedback-s0", "config_key"] == \
        first_rows.loc["tiny-peer_solution_feedback-s0", "config_key"]
    assert len(pd.read_parquet(steps_path)) == 4  # both trials' eval rows, the linked one's from its folder

    # `opsd analyze` on both sweeps' folders: three configurations, the shared trial once.
    out = tmp_path / "report"
    assert main(["analyze", str(first_state.dir), str(state.dir), "--out", str(out), "--bootstrap", "0"]) == 0
    report = (out / "report.md").read_text()
    assert "3 configurations, 3 completed trials (of 4 rows; 1 row left out as the same trial" in report
    assert "both at train-time decoding (T=1, top-p 1)" in report  # read from the trials' settings
    # The line through (0.05, 0.02), (0.10, 0.06), (0.20, 0.10): OLS slope 0.5143 (Sxy 0.0036 / Sxx 0.007).
    law = json.loads((out / "law.json").read_text())
    assert abs(law["families"]["smollm2"]["slope"] - 0.0036 / 0.007) < 1e-9

    # A link, once made, stays: the sweep run again keeps it.
    assert prepare_sweep_dir(second, second_points, sweep_location(second)[0], second_file).links == state.links


def test_a_sweep_whose_trials_are_all_linked_runs_no_tune(tmp_path, monkeypatch):
    import orchestrator.tune_run as tune_run
    from orchestrator.driver import DriverRecord
    from rich.console import Console

    first_file = sweep_file(tmp_path, "first", "[none]")
    second_file = sweep_file(tmp_path, "second", "[none]")
    first, first_points = load_sweep(first_file)
    finish(prepare_sweep_dir(first, first_points, sweep_location(first)[0], first_file).trial_files("tiny-none-s0").dir,
           gap=0.1, improvement=0.05)
    second, second_points = load_sweep(second_file)
    state = prepare_sweep_dir(second, second_points, sweep_location(second)[0], second_file)

    def no_tune(*args, **kwargs):
        raise AssertionError("Ray Tune was started for a sweep with nothing to train")

    monkeypatch.setattr(tune_run, "build_tuner", no_tune)
    console = Console(width=200, record=True)
    tune_run.run_sweep(state, driver=DriverRecord.start(state.dir), console=console)
    assert "1 of 1 trials completed in other sweeps of the same storage are linked, not trained again: " \
           "tiny-none-s0" in console.export_text()
