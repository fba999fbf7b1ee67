"""`opsd analyze --measure tests`: the law on the fraction of tests passed, the other measure trials report."""

from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.report import run_analysis


def test_the_tests_measure_fits_the_test_fraction_columns(tmp_path):
    gaps_all = [0.0, 0.0, 0.0, 0.0]  # all-pass gaps without spread: that measure has no law here
    gaps_tests = [-0.02, 0.01, 0.03, 0.06]
    improvement_tests = [0.01, 0.02, 0.05, 0.06]
    rows = []
    for i, (g, imp) in enumerate(zip(gaps_tests, improvement_tests)):
        rows.append({"model": "m", "model_family": "f", "model_size_b": 1.0, "context": f"c{i}", "seed": 0,
                     "status": "completed", "initial_student_acc": 0.0, "initial_teacher_acc": 0.0,
                     "initial_gap": gaps_all[i], "final_student_acc": 0.0, "improvement": 0.0,
                     "initial_student_test_frac": 0.2, "initial_teacher_test_frac": 0.2 + g,
                     "initial_gap_test_frac": g, "final_student_test_frac": 0.2 + imp, "improvement_test_frac": imp})
    pd.DataFrame(rows).to_parquet(tmp_path / "trials.parquet")
    out = run_analysis(tmp_path / "trials.parquet", tmp_path / "report", n_bootstrap=0, measure="tests")
    slope, intercept = np.polyfit(gaps_tests, improvement_tests, 1)
    line = out.law.families["f"]
    assert abs(line.slope - slope) < 1e-9 and abs(line.intercept - intercept) < 1e-9
    assert "Accuracy measure: the fraction of tests passed" in (tmp_path / "report" / "report.md").read_text()
