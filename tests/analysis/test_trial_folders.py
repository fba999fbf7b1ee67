"""RESULTS may be a folder of `opsd trial` outputs (trial.json + steps.parquet each) instead of trials.parquet."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from analysis.errors import AnalysisError
from analysis.results import completed_trials, load_results


def write_trial(folder, *, context, seed, gap, improvement):
    folder.mkdir(parents=True)
    (folder / "trial.json").write_text(json.dumps({
        "trial_id": "same-name", "model": "m", "model_family": "F", "model_size_b": 0.1, "context": context,
        "seed": seed, "status": "completed", "initial_student_acc": 0.2, "initial_teacher_acc": 0.2 + gap,
        "initial_gap": gap, "final_student_acc": 0.2 + improvement, "improvement": improvement}))
    pd.DataFrame({"step": [0, 1, 1], "phase": ["eval", "train", "eval"], "student_acc": [0.2, None, 0.3],
                  "teacher_acc": [0.2 + gap, None, 0.4]}).to_parquet(folder / "steps.parquet")


def test_trial_folders_are_collected_with_their_paths_as_ids(tmp_path):
    write_trial(tmp_path / "ctxA" / "seed0", context="A", seed=0, gap=0.1, improvement=0.05)
    write_trial(tmp_path / "ctxB" / "seed0", context="B", seed=0, gap=0.3, improvement=0.2)
    trials, steps = load_results(tmp_path)
    assert sorted(trials["trial_id"]) == ["ctxA/seed0", "ctxB/seed0"]
    assert completed_trials(trials).set_index("context")["improvement"].to_dict() == {"A": 0.05, "B": 0.2}
    assert len(steps) == 6 and set(steps["trial_id"]) == {"ctxA/seed0", "ctxB/seed0"}
    assert steps[steps.trial_id == "ctxB/seed0"]["teacher_acc"].iloc[0] == pytest.approx(0.5)


def test_a_folder_with_neither_trials_nor_trial_folders_is_a_clear_error(tmp_path):
    with pytest.raises(AnalysisError, match="no trials.parquet and no trial folders"):
        load_results(tmp_path)
