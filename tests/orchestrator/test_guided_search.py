"""The guided sweep's searcher on a sweep folder whose trials are simulated (their trial.json written from a
known law): its decisions are the policy's, it survives save/restore as Tune drives it (a driver killed after a
decision Tune never saved), and status, collect and `opsd analyze` show what it did. No Ray cluster runs here;
tests/orchestrator/test_guided_sweep.py (slow) runs a real one."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from ray.tune.search import Searcher

from analysis.guided import decide
from analysis.predict import predict_improvement
from analysis.report import run_analysis
from orchestrator.collect import collect
from orchestrator.guided_search import GuidedSearcher, candidates_and_outcomes
from orchestrator.guided_screen import screened_gaps
from orchestrator.sweep_state import STATE_FORMAT, SweepState, read_guided
from orchestrator.sweep_status import guided_lines, status_table, sweep_status, unfinished

CONTEXTS = {"none": 0.0, "a": 0.03, "b": 0.06, "c": 0.09, "d": 0.12, "e": 0.15}
SLOPE, INTERCEPT = 0.8, 0.01


def make_sweep(root: Path, *, goal="law", seeds=(0, 1), **settings) -> SweepState:
    trials = {f"m-{c}-s{s}": {"model": "m", "context": c, "seed": s, "model_path": "/models/m", "family": "fam",
                              "size_b": 1.0, "steps": 1} for c in CONTEXTS for s in seeds}
    guided = {"settings": {"goal": goal, "slope_ci_width": 0.3 if goal == "law" else None, "max_trials": None,
                           "max_hours": None, "prior_law": None, "confidence": 0.95, **settings},
              "hours": {t: 2.0 for t in trials}}
    root.mkdir(parents=True, exist_ok=True)
    (root / "sweep.json").write_text(json.dumps({
        "format": STATE_FORMAT, "name": "g", "resources": {"gpus": 0, "cpus": 1, "sandbox_workers": 1},
        "wandb": {"mode": "disabled"}, "checkpoints": {}, "max_failures": 0, "max_concurrent_trials": 1,
        "trials": trials, "remote": None, "links": {}, "guided": guided}))
    (root / "screen").mkdir()
    rng = np.random.default_rng(0)
    rows = [{"model_label": "m", "model": "/models/m", "model_family": "fam", "context": c,
             "initial_gap": g + rng.normal(0, 0.005)} for c, g in CONTEXTS.items()]
    (root / "screen" / "screen.json").write_text(json.dumps({"rows": rows}))
    return SweepState.read(root)


def finish(state: SweepState, trial_id: str, rng) -> None:
    """What a completed trial leaves: its trial.json (gap and improvement on the law, with seed noise)."""
    gap = CONTEXTS[state.trials[trial_id]["context"]] + rng.normal(0, 0.005)
    improvement = INTERCEPT + SLOPE * gap + rng.normal(0, 0.01)
    d = state.dir / "trials" / trial_id
    d.mkdir(parents=True, exist_ok=True)
    (d / "trial.json").write_text(json.dumps({
        "status": "completed", "model": "/models/m", "model_family": "fam", "model_size_b": 1.0,
        "context": state.trials[trial_id]["context"], "seed": state.trials[trial_id]["seed"],
        "initial_student_acc": 0.3, "initial_student_acc_t1": 0.3, "initial_teacher_acc": 0.3 + gap,
        "initial_gap": gap, "final_student_acc": 0.3 + improvement, "improvement": improvement}))


def drive(searcher: GuidedSearcher, state: SweepState, rng, *, start: int = 0, until: int | None = None) -> list:
    """Tune's side, one trial at a time: suggest, the trial completes, on_trial_complete; returns suggestions."""
    got = []
    for i in range(start, until if until is not None else 100):
        config = searcher.suggest(f"tune-{i}")
        got.append(config)
        if config is Searcher.FINISHED or config is None:
            return got
        finish(state, config["trial_id"], rng)
        searcher.on_trial_complete(f"tune-{i}", {"config/trial_id": config["trial_id"]})
    return got


def test_each_suggestion_is_the_policys_decision_on_the_folders_outcomes(tmp_path):
    state = make_sweep(tmp_path / "g")
    searcher = GuidedSearcher(str(state.dir))
    suggestions = drive(searcher, state, np.random.default_rng(1))
    assert suggestions[-1] is Searcher.FINISHED
    log = read_guided(state.dir)
    trained = [d["trial_id"] for d in log["decisions"] if d["action"] == "train"]
    assert [s["trial_id"] for s in suggestions[:-1]] == trained
    assert log["stopped"] == log["decisions"][-1]["reason"] and log["stopped"].startswith("goal reached")
    # Replay: decision k is decide() on the outcomes of the first k − 1 trials.
    candidates, outcomes, policy, _ = candidates_and_outcomes(state, screened_gaps(state))
    for k, entry in enumerate(log["decisions"]):
        seen = {t: outcomes[t] for t in trained[:k]}
        replay = decide(candidates, seen, (), policy)
        assert (replay.action, replay.trial_id, replay.reason) == (entry["action"], entry["trial_id"], entry["reason"])
    # The prediction made before each trial trained is in its folder (None while no line can predict).
    for entry in log["decisions"][:-1]:
        saved = json.loads((state.dir / "trials" / entry["trial_id"] / "prediction.json").read_text())
        assert saved["prediction"] == entry["prediction"]
    assert any(e["prediction"] for e in log["decisions"][:-1]) and not log["decisions"][0]["prediction"]
    # Once stopped, it stays stopped (a resumed sweep asks again).
    assert GuidedSearcher(str(state.dir)).suggest("tune-late") is Searcher.FINISHED


def test_a_restored_searcher_decides_as_one_never_interrupted(tmp_path):
    whole = make_sweep(tmp_path / "whole")
    drive(GuidedSearcher(str(whole.dir)), whole, np.random.default_rng(2))
    cut = make_sweep(tmp_path / "cut")
    rng = np.random.default_rng(2)
    first = GuidedSearcher(str(cut.dir))
    drive(first, cut, rng, until=3)
    running = first.suggest("tune-3")  # decided; Tune saves its state with this trial running
    snapshot = tmp_path / "searcher-state.pkl"
    first.save(str(snapshot))
    finish(cut, running["trial_id"], rng)
    first.on_trial_complete("tune-3", {})
    lost = first.suggest("tune-4")  # decided after the snapshot: the driver is killed before the next one
    # Tune restores the searcher pickled in tuner.pkl (its initial state), then its snapshot.
    restored = pickle.loads(pickle.dumps(GuidedSearcher(str(cut.dir))))
    restored.restore(str(snapshot))
    assert restored.running == {"tune-3": running["trial_id"]}  # Tune reruns it: its trial.json ends it at once
    restored.on_trial_complete("tune-3", {})
    again = restored.suggest("tune-5")
    assert again == lost  # the lost decision is run first, not decided anew
    finish(cut, again["trial_id"], rng)
    restored.on_trial_complete("tune-5", {})
    drive(restored, cut, rng, start=6)
    assert _decisions(cut) == _decisions(whole)


def _decisions(state: SweepState) -> list[tuple]:
    return [(d["action"], d["trial_id"], d["reason"]) for d in read_guided(state.dir)["decisions"]]


def test_a_trial_that_failed_for_good_is_not_chosen_again(tmp_path):
    state = make_sweep(tmp_path / "g", goal="best")
    searcher = GuidedSearcher(str(state.dir))
    first = searcher.suggest("t0")
    searcher.on_trial_complete("t0", None, error=True)
    assert read_guided(state.dir)["failed"] == [first["trial_id"]]
    second = searcher.suggest("t1")
    assert second["trial_id"] != first["trial_id"]
    assert second["trial_id"] == first["trial_id"].replace("-s0", "-s1")  # its configuration's next seed


def test_status_collect_and_report_of_a_stopped_guided_sweep(tmp_path):
    state = make_sweep(tmp_path / "g", max_trials=7)
    drive(GuidedSearcher(str(state.dir)), state, np.random.default_rng(3))
    log = read_guided(state.dir)
    trained = {d["trial_id"] for d in log["decisions"] if d["action"] == "train"}
    statuses = sweep_status(state)
    assert {s.trial_id for s in statuses if s.state == "completed"} == trained
    assert {s.state for s in statuses if s.trial_id not in trained} == {"skipped"}
    assert unfinished(statuses) == 0  # a stopped guided sweep is finished, not interrupted
    lines = guided_lines(state)
    assert lines[0].startswith("guided: goal law (slope interval expected narrower than 0.3), at most 7 trials")
    assert lines[1].startswith("screen: 6 configurations, initial gap m/none ")
    assert lines[-1] == f"stopped after {len(trained)} trials: {log['stopped']}"
    assert "skipped" in status_table(state, statuses).title

    trials_path, _, counts = collect(state)
    table = pd.read_parquet(trials_path)
    assert counts == {"completed": len(trained), "skipped": 12 - len(trained)}
    assert table["planned_hours"].sum() == pytest.approx(24.0)
    predicted = table[table["predicted_improvement"].notna()]
    assert set(predicted["trial_id"]) <= trained and len(predicted) >= 1

    (state.dir / "steps.parquet").unlink()  # the simulated trials have no steps
    out = run_analysis(state.dir, tmp_path / "report", n_bootstrap=0, by_seeds=False)
    report = out.report_path.read_text()
    section = report[report.index("## Predictions checked against outcomes"):report.index("## Figures")]
    inside = ((predicted["pi_lo"] <= predicted["improvement"]) & (predicted["improvement"] <= predicted["pi_hi"]))
    assert f"{len(predicted)} trained trial(s) had a prediction" in section
    assert f"**{inside.mean():.0%} of the realized improvements fall inside their interval**" in section
    error = predicted["improvement"] - predicted["predicted_improvement"]
    assert f"RMSE {np.sqrt(np.mean(error ** 2)):.3f}" in section
    assert f"stopped: {log['stopped']}" in section
    assert f"Device-hours: **{2.0 * len(trained):.3g} spent on {len(trained)} trial(s), against 24 for the full grid of 12**" in section
    # Unequal seeds: the unweighted fit says so and names the fit the policy uses, which then says nothing.
    seeds = table[table["status"] == "completed"].groupby("context").size()
    assert seeds.nunique() > 1
    assert "`opsd analyze --by-seeds` weights each configuration by its seeds" in section
    weighted = run_analysis(state.dir, tmp_path / "report_by_seeds", n_bootstrap=0, by_seeds=True)
    text = weighted.report_path.read_text()
    assert "--by-seeds` weights" not in text and "WLS, each configuration weighted by its seed count" in text
    # Left to itself, `opsd analyze` fits a guided sweep's results as its searcher does: by seed counts.
    default = run_analysis(state.dir, tmp_path / "report_default", n_bootstrap=0)
    assert default.law.settings["by_seeds"] is True
    assert default.law.families == weighted.law.families


def test_the_report_predicts_the_configurations_never_trained(tmp_path):
    state = make_sweep(tmp_path / "g", goal="best")
    drive(GuidedSearcher(str(state.dir)), state, np.random.default_rng(4))
    collect(state)
    (state.dir / "steps.parquet").unlink()
    out = run_analysis(state.dir, tmp_path / "report", n_bootstrap=0)
    report = out.report_path.read_text()
    never_part = report[report.index("were never trained"):report.index("Device-hours")]
    trained = {state.trials[d["trial_id"]]["context"] for d in read_guided(state.dir)["decisions"] if d["trial_id"]}
    never = [c for c in CONTEXTS if c not in trained]
    assert never, "goal best stops before every configuration has trained"
    assert report.count(f"{len(never)} configuration(s) were never trained") == 1
    # Each is predicted by the law just fitted, at its screened gap.
    screen = {r["context"]: r["initial_gap"] for r in json.loads((state.dir / "screen" / "screen.json").read_text())["rows"]}
    for context in CONTEXTS:
        assert (f"| fam | /models/m | {context} |" in never_part) == (context in never)
    for context in never:
        p = predict_improvement(out.law, "fam", [screen[context]]).iloc[0]
        assert (f"| fam | /models/m | {context} | {screen[context]:+.3f} | {p.predicted_improvement:+.3f} "
                f"[{p.pi_lo:+.3f}, {p.pi_hi:+.3f}] |") in never_part
