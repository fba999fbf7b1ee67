"""steps.parquet written before the trainer renamed is_weight_mean/is_clip_fraction still reads, under the new names."""

from __future__ import annotations

import json

import pandas as pd

from analysis.results import load_results


def write_trial(folder, columns):
    folder.mkdir(parents=True)
    (folder / "trial.json").write_text(json.dumps({
        "trial_id": "t", "model": "m", "model_family": "F", "model_size_b": 0.1, "context": "c", "seed": 0,
        "status": "completed", "initial_student_acc": 0.2, "initial_teacher_acc": 0.3, "initial_gap": 0.1,
        "final_student_acc": 0.25, "improvement": 0.05}))
    pd.DataFrame({"step": [0, 1], "phase": ["eval", "train"], "student_acc": [0.2, None],
                  "teacher_acc": [0.3, None], **columns}).to_parquet(folder / "steps.parquet")


def test_old_and_new_step_columns_read_as_the_new_ones(tmp_path):
    write_trial(tmp_path / "old", {"is_weight_mean": [None, 0.9], "is_clip_fraction": [None, 0.1]})
    write_trial(tmp_path / "new", {"importance_weight_mean": [None, 0.8], "importance_clip_fraction": [None, 0.2]})
    _, steps = load_results(tmp_path)
    train = steps[steps.phase == "train"].set_index("trial_id")
    assert "is_weight_mean" not in steps.columns and "is_clip_fraction" not in steps.columns
    assert train["importance_weight_mean"].to_dict() == {"old": 0.9, "new": 0.8}
    assert train["importance_clip_fraction"].to_dict() == {"old": 0.1, "new": 0.2}


def test_a_steps_file_beside_trials_parquet_is_renamed_too(tmp_path):
    write_trial(tmp_path / "one", {"is_weight_mean": [None, 0.9], "is_clip_fraction": [None, 0.1]})
    trials = pd.DataFrame([json.loads((tmp_path / "one" / "trial.json").read_text())])
    trials.to_parquet(tmp_path / "trials.parquet")
    (tmp_path / "one" / "steps.parquet").rename(tmp_path / "steps.parquet")
    _, steps = load_results(tmp_path)
    assert list(steps["importance_weight_mean"].dropna()) == [0.9]
