"""The report and Fig. 2 compare like with like: the gap's two sides at one (train-time) decoding, the
improvement's at validation decoding, axes that name the accuracy measure, whole training steps; and several
sweeps' results analysed together with each trial once."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from analysis.errors import AnalysisError
from analysis.figures import fig2_dynamics
from analysis.report import run_analysis
from analysis.results import join_steps

# Three contexts, two seeds each: (context, [validation-decoding student_0], [train-time student_0], [teacher_0],
# [final student]). The student scores higher at T=0.6 than at T=1, so student_0 at validation decoding is
# not the side of the gap.
CONFIGS = [("none", [0.30, 0.32], [0.20, 0.22], [0.21, 0.23], [0.30, 0.33]),
           ("feedback", [0.30, 0.34], [0.20, 0.24], [0.30, 0.36], [0.36, 0.42]),
           ("peer", [0.31, 0.33], [0.21, 0.23], [0.41, 0.45], [0.45, 0.49])]
CONFIG = {"eval": {"teacher_temperature": 1.0, "temperature": 0.6, "top_p": 0.95}, "rollout": {"top_p": 1.0}}


def trials_and_steps(sweep: str = "s", *, config_key: str | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    rows, steps = [], []
    for context, val, t1, teacher, final in CONFIGS:
        for seed in (0, 1):
            trial_id = f"m-{context}-s{seed}"
            rows.append({"trial_id": trial_id, "model": "m", "model_family": "f", "model_size_b": 1.0,
                         "context": context, "seed": seed, "status": "completed",
                         "initial_student_acc": val[seed], "initial_student_acc_t1": t1[seed],
                         "initial_teacher_acc": teacher[seed], "initial_gap": teacher[seed] - t1[seed],
                         "final_student_acc": final[seed], "improvement": final[seed] - val[seed],
                         "resolved_config": json.dumps(CONFIG), "trained_in": sweep,
                         "config_key": config_key or f"key-{context}-{seed}"})
            for step, frac in ((0, 0.0), (1, 0.5), (2, 1.0)):
                steps.append({"trial_id": trial_id, "step": step, "phase": "eval",
                              "student_acc": val[seed] + frac * (final[seed] - val[seed]),
                              "student_acc_t1": t1[seed] + frac * 0.1, "teacher_acc": teacher[seed],
                              "gap": teacher[seed] - t1[seed] - frac * 0.1})
    return pd.DataFrame(rows), pd.DataFrame(steps)


def write(folder, trials, steps):
    folder.mkdir(parents=True)
    trials.to_parquet(folder / "trials.parquet", index=False)
    steps.to_parquet(folder / "steps.parquet", index=False)
    return folder


def config_rows(report: str) -> dict[str, list[str]]:
    lines = report.split("## Configurations")[1].split("##")[0].splitlines()
    header = next(line for line in lines if line.startswith("| family"))
    assert header == ("| family | model | size (B) | context | seeds | student₀ (train-time) | teacher₀ (train-time) "
                      "| gap (mean ± SD) | student₀ (validation) | student final (validation) | "
                      "improvement (mean ± SD) |")
    return {cells[3]: cells for cells in ([c.strip() for c in line.strip("|").split("|")]
                                          for line in lines if line.startswith("| f |"))}


def test_the_configuration_table_puts_the_gap_beside_its_own_two_sides(tmp_path):
    results = write(tmp_path / "sweep", *trials_and_steps())
    run_analysis(results, tmp_path / "report", n_bootstrap=0)
    report = (tmp_path / "report" / "report.md").read_text()
    rows = config_rows(report)
    # feedback: student_0 at T=1 (0.20 + 0.24) / 2 = 0.220, teacher_0 (0.30 + 0.36) / 2 = 0.330, gaps 0.10 and
    # 0.12: 0.110 ± 0.014 (SD 0.02 / sqrt 2); at T=0.6 student_0 0.320, final 0.390, improvements 0.06 and 0.08.
    assert rows["feedback"][5:11] == ["0.220", "0.330", "0.110 ± 0.014", "0.320", "0.390", "0.070 ± 0.014"]
    for cells in rows.values():  # teacher_0 - student_0 is the gap on every row
        assert float(cells[6]) - float(cells[5]) == pytest.approx(float(cells[7].split(" ± ")[0]), abs=1.5e-3)
    assert "the train-time decoding (T=1, top-p 1): gap = teacher₀ − student₀ there" in report
    assert "at validation decoding (T=0.6, top-p 0.95, mean@n): final − student₀ there" in report


def test_fig2_draws_both_sides_at_train_time_decoding_on_whole_steps(tmp_path):
    trials, steps = trials_and_steps()
    joined = join_steps(steps, trials)
    drawn = fig2_dynamics(joined, tmp_path, decoding="T=1, top-p 1")
    curve = drawn["curves"][("feedback", "m")]
    # The student's line is its train-time accuracy (0.22 at step 0, + 0.05 at step 1), not its T=0.6 one.
    assert curve["student_mean"].tolist() == pytest.approx([0.22, 0.27, 0.32])
    assert curve["teacher_mean"].tolist() == pytest.approx([0.33, 0.33, 0.33])
    assert drawn["xticks"] and all(float(x).is_integer() for x in drawn["xticks"])
    assert drawn["labels"]["title"] == "Student and self-teacher, both at train-time decoding (T=1, top-p 1)"
    assert "all tests passed" in drawn["labels"]["y"]
    # A file without student_acc_t1 gets it from the gap (teacher - gap), as the trainer defines the gap.
    derived = join_steps(steps.drop(columns="student_acc_t1"), trials)
    assert derived["student_acc_t1"].to_numpy() == pytest.approx(joined["student_acc_t1"].to_numpy())


def test_the_tests_measure_is_named_on_every_axis(tmp_path):
    trials, steps = trials_and_steps()
    for frame in (trials, steps):
        for column in [c for c in frame.columns if c.endswith(("_acc", "_acc_t1", "gap", "improvement"))]:
            test_frac = {"initial_gap": "initial_gap_test_frac", "improvement": "improvement_test_frac",
                         "gap": "gap_test_frac"}.get(column, column.replace("_acc", "_test_frac"))
            frame[test_frac] = frame[column]
    out = run_analysis(write(tmp_path / "sweep", trials, steps), tmp_path / "report", n_bootstrap=0,
                       measure="tests")
    for name in ("fig1_law", "fig2_dynamics"):
        labels = out.figures[name]["labels"]
        assert all("acc." not in label for label in labels.values())
    assert "fraction of tests passed" in out.figures["fig1_law"]["labels"]["x"]
    assert "fraction of tests passed" in out.figures["fig1_law"]["labels"]["y"]
    assert "fraction of tests passed" in out.figures["fig2_dynamics"]["labels"]["y"]


def test_two_sweeps_with_a_shared_trial_count_it_once(tmp_path):
    """Fig. 1's and Fig. 3's results: the second sweep's row of a trial the first trained (trained_in) and a
    trial both trained with the same settings (config_key) are each kept once, from the first results."""
    trials1, steps1 = trials_and_steps("paper-fig1")
    trials2, steps2 = trials_and_steps("paper-fig3")
    trials2 = trials2[trials2["context"] == "peer"].copy()
    steps2 = steps2[steps2["trial_id"].isin(trials2["trial_id"])]
    trials2.loc[trials2["seed"] == 0, "trained_in"] = "paper-fig1"  # linked: trained by paper-fig1
    trials2.loc[trials2["seed"] == 1, "final_student_acc"] += 0.5  # trained twice: the second copy must not count
    # A model only the second sweep has, so both results contribute.
    extra = trials2.assign(model="m2", trial_id=trials2["trial_id"] + "-m2")
    steps_extra = steps2.assign(trial_id=steps2["trial_id"] + "-m2")
    fig1 = write(tmp_path / "paper-fig1", trials1, steps1)
    fig3 = write(tmp_path / "paper-fig3", pd.concat([trials2, extra]), pd.concat([steps2, steps_extra]))
    together = run_analysis([fig1, fig3], tmp_path / "report", n_bootstrap=0)
    fig1_alone = run_analysis(fig1, tmp_path / "report1", n_bootstrap=0)
    configs = together.fit.configs
    assert sorted(configs["model"].unique()) == ["m", "m2"]
    assert configs[configs["model"] == "m"]["n_seeds"].tolist() == [2, 2, 2]
    pd.testing.assert_frame_equal(configs[configs["model"] == "m"].reset_index(drop=True),
                                  fig1_alone.fit.configs.reset_index(drop=True), check_dtype=False)
    report = (tmp_path / "report" / "report.md").read_text()
    assert "(of 10 rows; 2 rows left out as the same trial in an earlier result" in report
    # Without the shared keys, the same (model, context, seed) twice is refused, naming both trials.
    with pytest.raises(AnalysisError, match=r"paper-fig1/m-peer-s0.*other/m-peer-s0"):
        run_analysis([fig1, write(tmp_path / "other", trials2.drop(columns=["trained_in", "config_key"]), steps2)],
                     tmp_path / "report2", n_bootstrap=0)
    assert np.isfinite(together.law.families["f"].slope)
