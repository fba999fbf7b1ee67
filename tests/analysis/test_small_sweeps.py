"""Small sweeps (a smoke test, a CPU demo) still get their outputs, and the report says what they are worth.

With 2 configurations a law is the line through their two means: no intervals, p-values or leave-one-out,
a figure without a band, a verdict that says it tells nothing about the law, and `opsd screen` refuses it.
With 3 or 4 the verdict calls the fit weak. Checks that cannot be computed are left out, with the reason.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis.errors import AnalysisError
from analysis.fit import fit_law
from analysis.law import load_law
from analysis.predict import predict_improvement, screen
from analysis.report import run_analysis, verdict
from analysis.results import completed_trials
from tests.analysis.conftest import noisy_trials, trials_from

OPSD = str(Path(sys.executable).parent / "opsd")

# 1 model x 2 contexts x 2 seeds. Configuration means, by hand:
#   a: gap (0.10 + 0.12)/2 = 0.11, improvement (0.05 + 0.07)/2 = 0.06
#   b: gap (0.30 + 0.28)/2 = 0.29, improvement (0.20 + 0.16)/2 = 0.18
# The line through (0.11, 0.06) and (0.29, 0.18): slope 0.12/0.18 = 2/3, intercept 0.06 − (2/3)·0.11 = −0.04/3.
SLOPE, INTERCEPT = 2 / 3, -0.04 / 3
TWO_POINT_NULLS = ("slope_ci", "intercept_ci", "slope_se", "intercept_se", "slope_p", "intercept_p", "r2",
                   "loo_r2", "loo_rmse", "residual_var", "coef_cov", "leave_one_size_out", "bootstrap")
PLAIN = ("A fit on 2 configurations is a line through two points (slope 0.667, intercept -0.013): any two points "
         "lie on a line, so it tells nothing about the law, and it has no intervals, p-values or leave-one-out. "
         "Intervals, p-values and leave-one-out need at least 3 configurations, a fit on fewer than 5 stays weak, "
         "and the papers use 6 contexts per model: add contexts to the sweep.")


def smoke(family="fam", size=1.0) -> pd.DataFrame:
    return trials_from([("a", [0.10, 0.12], [0.05, 0.07]), ("b", [0.30, 0.28], [0.20, 0.16])],
                       family=family, size=size)


def steps_of(trials: pd.DataFrame) -> pd.DataFrame:
    """Eval rows at steps 0 and 5 of every trial, with the trainer's importance-ratio metrics beside them."""
    rows = []
    for t in trials.itertuples():
        for step, frac in ((0, 0.0), (5, 1.0)):
            rows.append({"trial_id": t.trial_id, "step": step, "phase": "eval",
                         "student_acc": t.initial_student_acc + frac * t.improvement,
                         "student_acc_t1": t.initial_student_acc + frac * t.improvement,
                         "teacher_acc": t.initial_teacher_acc, "importance_weight_mean": 1.0,
                         "importance_clip_fraction": 0.0})
    return pd.DataFrame(rows)


@pytest.mark.parametrize("unit,weighted", [("configuration", False), ("seed", False), ("configuration", True)])
def test_two_configurations_give_the_line_through_their_two_means_and_nothing_else(unit, weighted):
    law = fit_law(completed_trials(smoke()), unit=unit, weighted=weighted).law
    for line in (law.families["fam"], law.pooled):
        assert line.slope == pytest.approx(SLOPE, rel=1e-12)
        assert line.intercept == pytest.approx(INTERCEPT, rel=1e-12)
        assert not line.has_intervals
        for key in TWO_POINT_NULLS:
            assert getattr(line, key) is None, key
        assert line.df_resid == 0 and line.n_configs == 2 and line.n_trials == 4
        assert line.n_points == (4 if unit == "seed" else 2)
        assert (line.x_min, line.x_max) == pytest.approx((0.10, 0.30) if unit == "seed" else (0.11, 0.29))
        assert set(line.not_computed) >= {"intervals", "loo", "leave_one_size_out"}
        assert "a line through two points" in line.not_computed["intervals"]
    assert law.pooled.interaction_test is None and law.pooled.leave_one_family_out is None
    assert law.pooled.not_computed["leave_one_family_out"] == "one model family (fam)"


def test_small_sweep_writes_law_figures_and_a_report_that_says_what_the_fit_is_worth(tmp_path):
    trials = smoke()
    trials.to_parquet(tmp_path / "trials.parquet", index=False)
    steps_of(trials).to_parquet(tmp_path / "steps.parquet", index=False)
    output = run_analysis(tmp_path, tmp_path / "out")  # the default 1000 resamples: impossible here, skipped

    data = json.loads(output.law_path.read_text())
    assert data["settings"]["bootstrap"] == 0 and data["settings"]["seed"] is None
    for entry in (data["families"]["fam"], data["pooled"]):
        assert entry["slope"] == pytest.approx(SLOPE) and entry["intercept"] == pytest.approx(INTERCEPT)
        for key in TWO_POINT_NULLS:
            assert entry[key] is None, key
        assert entry["df_resid"] == 0
        assert "no intervals" in entry["not_computed"]["bootstrap"]
    assert load_law(output.law_path).to_dict() == output.law.to_dict()

    report = output.report_path.read_text()
    assert f"**fam: no evidence either way (2 configurations).** {PLAIN}" in report
    assert "no seed bootstrap: it is impossible on every line" in report
    assert "| fam | 2 | 4 | 0.667 n/a | -0.013 n/a | n/a | n/a | n/a | n/a | n/a | n/a | n/a |" in report
    assert "- fam: intervals, p-values, R² and leave-one-configuration-out (2 configurations: a line through " \
           "two points fits them exactly, whatever the law; this needs at least 3); leave-one-size-out (one " \
           "model size (1B)); seed bootstrap (a line through 2 configurations has no intervals to resample)." in report
    assert not re.search(r"\bnan\b|\binf\b", report, re.IGNORECASE)

    for stem in ("fig1_law", "fig2_dynamics"):
        for suffix in ("png", "pdf"):
            assert (tmp_path / "out" / f"{stem}.{suffix}").stat().st_size > 1000, (stem, suffix)
    drawn = output.figures["fig1_law"]["families"]["fam"]
    assert drawn["slope"] == pytest.approx(SLOPE, rel=1e-9)
    assert drawn["intercept"] == pytest.approx(INTERCEPT, abs=1e-12)
    assert drawn["band_lo"] is None and drawn["band_hi"] is None
    assert drawn["n_points"] == 2
    curve = output.figures["fig2_dynamics"]["curves"][("a", "fam-1b")]
    assert curve["student_mean"].iloc[-1] == pytest.approx(0.3 + 0.06)


def test_two_sizes_of_one_context_each_draw_the_scale_figure_without_a_band(tmp_path):
    trials = pd.concat([trials_from([("a", [0.10, 0.12], [0.05, 0.07])], size=1.0),
                        trials_from([("a", [0.30, 0.28], [0.20, 0.16])], size=4.0)], ignore_index=True)
    output = run_analysis(_write(trials, tmp_path), tmp_path / "out", n_bootstrap=0)
    line = output.law.families["fam"]
    assert line.slope == pytest.approx(SLOPE) and line.sizes == (1.0, 4.0)
    assert "a line through two points" in line.not_computed["leave_one_size_out"]
    assert output.figures["fig3_scale"]["family_lines"] == ["fam"]
    assert (tmp_path / "out" / "fig3_scale.png").stat().st_size > 1000


def _write(frame: pd.DataFrame, folder: Path) -> Path:
    frame.to_parquet(folder / "trials.parquet", index=False)
    return folder / "trials.parquet"


def test_cli_analyzes_a_small_sweep_and_screen_refuses_its_law(tmp_path):
    smoke().to_parquet(tmp_path / "trials.parquet", index=False)
    proc = subprocess.run([OPSD, "analyze", str(tmp_path), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert "fam: improvement = -0.0133 + 0.667·gap  a line through 2 points: no intervals, no LOO" in proc.stdout
    assert "nan" not in proc.stdout.lower()
    gaps = pd.DataFrame({"model_family": ["fam"], "model": ["m"], "context": ["c"], "initial_gap": [0.2]})
    gaps.to_csv(tmp_path / "gaps.csv", index=False)
    proc = subprocess.run([OPSD, "screen", str(tmp_path / "gaps.csv"), "--law", str(tmp_path / "out" / "law.json")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip() == (
        "opsd screen: error: the law 'fam' is a line through 2 configurations: it has no prediction interval and "
        "says nothing about a new configuration; refit it on at least 3 configurations (add contexts)")


def test_a_two_configuration_family_beside_a_full_one(rng, tmp_path):
    big = noisy_trials(rng, families=(("big", 1.0, 0.8, 0.0),), n_contexts=6)
    trials = completed_trials(pd.concat([big, smoke(family="tiny")], ignore_index=True))
    fit = fit_law(trials)
    law = fit.law
    assert law.families["big"].has_intervals and not law.families["tiny"].has_intervals
    assert law.families["tiny"].slope == pytest.approx(SLOPE)
    # The pooled line is an ordinary fit over all 8 configurations, with intervals and leave-one-family-out.
    assert law.pooled.has_intervals and law.pooled.n_configs == 8 and law.pooled.leave_one_family_out
    assert law.pooled.interaction_test is None
    assert law.pooled.not_computed["interaction_test"] == "tiny has only 2 configurations, no slope to compare"
    # Diagnostics: the tiny line passes through its two means; no leverage or LOO for it.
    tiny = fit.points[fit.points["model_family"] == "tiny"]
    assert tiny["residual"].to_numpy() == pytest.approx([0.0, 0.0], abs=1e-12)
    assert tiny[["leverage", "cooks_d", "loo_prediction"]].isna().all().all()

    from analysis.bootstrap import attach_bootstrap, bootstrap_draws, bootstrap_obstacles

    skip = bootstrap_obstacles(fit)
    assert set(skip) == {"tiny"}
    law = attach_bootstrap(law, bootstrap_draws(trials, fit, n_resamples=20, seed=0), seed=0, skip=skip)
    assert law.settings["bootstrap"] == 20
    assert law.families["big"].bootstrap["n_resamples"] == 20 and law.families["tiny"].bootstrap is None
    assert "no intervals" in law.families["tiny"].not_computed["bootstrap"]

    law.save(tmp_path / "law.json")
    gaps = pd.DataFrame({"model_family": ["big", "tiny"], "model": ["m1", "m2"], "context": ["x", "y"],
                         "initial_gap": [0.1, 0.2]})
    with pytest.raises(AnalysisError, match=r"^the law 'tiny' is a line through 2 configurations: .* or screen "
                                             r"with the pooled law \(--pooled\), which has intervals$"):
        screen(tmp_path / "law.json", gaps)
    with pytest.raises(AnalysisError, match="line through 2 configurations"):
        predict_improvement(tmp_path / "law.json", "tiny", [0.2])
    pooled = screen(tmp_path / "law.json", gaps, pooled=True)
    assert np.isfinite(pooled[["pi_lo", "pi_hi"]].to_numpy()).all()
    assert predict_improvement(tmp_path / "law.json", "big", [0.2])["pi_lo"].notna().all()


@pytest.mark.parametrize("n", [3, 4])
def test_three_or_four_configurations_are_called_weak(n):
    gaps = [0.0, 0.1, 0.2, 0.3][:n]
    trials = trials_from([(f"c{i}", [g, g + 0.01], [0.5 * g, 0.5 * g + 0.02 * (-1) ** i]) for i, g in enumerate(gaps)])
    line = fit_law(completed_trials(trials)).law.families["fam"]
    assert line.has_intervals and line.df_resid == n - 2
    text = verdict("fam", line)
    assert text.startswith(f"**fam: weak ({n} configurations).** With only {n} configurations the fit has few "
                           f"degrees of freedom ({n - 2} residual degree{'' if n == 3 else 's'} of freedom between "
                           f"configurations)")
    assert "at least 3 configurations, a fit on fewer than 5 stays weak, and the papers use 6 contexts" in text


def test_five_clean_configurations_are_no_longer_weak():
    trials = trials_from([(f"c{i}", [g, g], [0.5 * g + 0.001 * (-1) ** i] * 2)
                          for i, g in enumerate([0.0, 0.1, 0.2, 0.3, 0.4])])
    line = fit_law(completed_trials(trials)).law.families["fam"]
    assert verdict("fam", line).startswith("**fam: the law holds.**")


def test_single_seeds_skip_the_bootstrap_and_the_report_says_so(tmp_path):
    trials = trials_from([(f"c{i}", g, 0.5 * g + 0.01 * (-1) ** i) for i, g in enumerate([0, .1, .2, .3, .4, .5])])
    output = run_analysis(_write(trials, tmp_path), tmp_path / "out", n_bootstrap=100)
    assert output.law.settings["bootstrap"] == 0
    line = output.law.families["fam"]
    assert line.has_intervals and line.bootstrap is None
    assert line.not_computed["bootstrap"].startswith("every configuration has a single seed")
    report = output.report_path.read_text()
    assert "no seed bootstrap: it is impossible on every line" in report
    assert "seed bootstrap (every configuration has a single seed" in report


def test_leave_one_size_out_that_cannot_fit_a_line_is_left_out_with_the_reason():
    # Size 4B has a single configuration: holding out size 1B leaves one gap, no line.
    trials = pd.concat([trials_from([("a", 0.0, 0.0), ("b", 0.1, 0.06), ("c", 0.2, 0.1)], size=1.0),
                        trials_from([("a", 0.3, 0.15)], size=4.0)], ignore_index=True)
    line = fit_law(completed_trials(trials)).law.families["fam"]
    assert line.leave_one_size_out is None
    assert line.not_computed["leave_one_size_out"] == ("holding out a model size leaves fewer than 2 different "
                                                       "gaps to fit a line on")
    assert np.isfinite(line.loo_r2)
