"""Predictions for untrained configurations, from law.json alone, against statsmodels and hand formulas."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm
from scipy import stats

from analysis.aggregate import aggregate_configs
from analysis.errors import AnalysisError
from analysis.fit import fit_law
from analysis.law import load_law
from analysis.predict import predict_improvement, screen
from analysis.results import completed_trials
from tests.analysis.conftest import noisy_trials

OPSD = str(Path(sys.executable).parent / "opsd")


@pytest.fixture
def saved(rng, tmp_path):
    trials = completed_trials(noisy_trials(rng))
    fit_law(trials).law.save(tmp_path / "law.json")
    return trials, tmp_path / "law.json"


def test_prediction_interval_equals_statsmodels_obs_interval_of_the_same_fit(saved):
    trials, path = saved
    sub = aggregate_configs(trials).query("model_family == 'fam_a'")
    res = sm.OLS(sub["improvement_mean"].to_numpy(), sm.add_constant(sub["gap_mean"].to_numpy())).fit()
    gaps = np.array([-0.05, 0.0, 0.1, 0.25, 0.6])
    expected = res.get_prediction(sm.add_constant(gaps)).summary_frame(alpha=0.05)
    got = predict_improvement(path, "fam_a", gaps)
    assert got["predicted_improvement"].to_numpy() == pytest.approx(expected["mean"].to_numpy(), rel=1e-10)
    assert got["pi_lo"].to_numpy() == pytest.approx(expected["obs_ci_lower"].to_numpy(), rel=1e-9)
    assert got["pi_hi"].to_numpy() == pytest.approx(expected["obs_ci_upper"].to_numpy(), rel=1e-9)
    assert got["ci_lo"].to_numpy() == pytest.approx(expected["mean_ci_lower"].to_numpy(), rel=1e-9)
    # By hand: se² of a new observation = s²(1 + 1/n + (g − x̄)²/Sxx).
    x, y = sub["gap_mean"].to_numpy(), sub["improvement_mean"].to_numpy()
    n, xbar = len(x), x.mean()
    sxx = np.sum((x - xbar) ** 2)
    b = np.sum((x - xbar) * (y - y.mean())) / sxx
    a = y.mean() - b * xbar
    s2 = np.sum((y - a - b * x) ** 2) / (n - 2)
    se_obs = np.sqrt(s2 * (1 + 1 / n + (gaps - xbar) ** 2 / sxx))
    t = stats.t.ppf(0.975, n - 2)
    assert got["pi_hi"].to_numpy() == pytest.approx(a + b * gaps + t * se_obs, rel=1e-9)
    assert got["extrapolated"].tolist() == [g < x.min() or g > x.max() for g in gaps]


def test_weighted_law_predicts_with_unit_weight_for_a_new_configuration(rng, tmp_path):
    trials = completed_trials(noisy_trials(rng))
    law = fit_law(trials, weighted=True).law
    line = law.families["fam_b"]
    got = predict_improvement(law.to_dict(), "fam_b", [0.1])
    cov = np.asarray(line.coef_cov)
    x0 = np.array([1.0, 0.1])
    se_obs = np.sqrt(x0 @ cov @ x0 + line.residual_var)
    assert got["se_obs"].iloc[0] == pytest.approx(se_obs)
    assert got["pi_hi"].iloc[0] == pytest.approx(line.intercept + 0.1 * line.slope
                                                  + stats.t.ppf(0.975, line.df_resid) * se_obs)


def test_screen_uses_each_rows_family_and_keeps_input_order(saved):
    _, path = saved
    gaps = pd.DataFrame({"model_family": ["fam_b", "fam_a", "fam_b"], "model": ["m1", "m2", "m3"],
                         "context": ["x", "y", "z"], "initial_gap": [0.1, 0.2, 0.3]})
    out = screen(path, gaps)
    law = load_law(path)
    for row in out.itertuples():
        line = law.families[row.model_family]
        assert row.predicted_improvement == pytest.approx(line.intercept + line.slope * row.initial_gap)
        assert row.law == row.model_family
    assert out["model"].tolist() == ["m1", "m2", "m3"]
    pooled = screen(path, gaps, pooled=True)
    assert pooled["predicted_improvement"].to_numpy() == pytest.approx(
        law.pooled.intercept + law.pooled.slope * gaps["initial_gap"].to_numpy())


def test_unknown_family_and_missing_columns_are_named(saved):
    _, path = saved
    with pytest.raises(AnalysisError, match="no family 'llama'.*fam_a, fam_b, pooled"):
        predict_improvement(path, "llama", [0.1])
    with pytest.raises(AnalysisError, match="lacks column.*initial_gap"):
        screen(path, pd.DataFrame({"model_family": ["fam_a"], "model": ["m"], "context": ["c"]}))


def test_screen_cli_writes_the_api_predictions(saved, tmp_path):
    _, path = saved
    gaps = pd.DataFrame({"model_family": ["fam_a", "fam_b"], "model": ["m1", "m2"], "context": ["x", "y"],
                         "initial_gap": [0.05, 0.25]})
    gaps.to_json(tmp_path / "gaps.json", orient="records")
    out = tmp_path / "pred.csv"
    proc = subprocess.run([OPSD, "screen", str(tmp_path / "gaps.json"), "--law", str(path), "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    written = pd.read_csv(out)
    expected = screen(path, gaps)
    assert written["pi_lo"].to_numpy() == pytest.approx(expected["pi_lo"].to_numpy(), rel=1e-9)
    assert "m2" in proc.stdout
    bad = subprocess.run([OPSD, "screen", str(tmp_path / "gaps.json"), "--law", str(tmp_path / "nope.json")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.strip() == f"opsd screen: error: law file not found: {tmp_path / 'nope.json'}"


def test_law_file_with_wrong_schema_version_is_refused(saved, tmp_path):
    _, path = saved
    data = json.loads(path.read_text())
    data["schema_version"] = 99
    (tmp_path / "old.json").write_text(json.dumps(data))
    with pytest.raises(AnalysisError, match="schema_version 99"):
        predict_improvement(tmp_path / "old.json", "fam_a", [0.1])


def test_the_printed_predictions_fit_80_columns_with_every_cell_whole():
    """`opsd screen GAPS --law` prints one row per context; at 80 columns each cell stays whole, the
    extrapolated prediction starred, the model column only when there are several models."""
    import pandas as pd
    from rich.console import Console

    from analysis.cli import predictions_table

    rows = pd.DataFrame({"model_family": "smollm2", "model": "embedded:smollm2-135m-instruct", "law": "smollm2",
                         "context": ["none", "peer_solution_feedback"], "initial_gap": [0.0, 0.08],
                         "predicted_improvement": [-0.0283, 0.142], "pi_lo": [-1.222, -1.052],
                         "pi_hi": [1.166, 1.336], "extrapolated": [False, True]})
    console = Console(width=80, record=True, file=open("/dev/null", "w"))
    console.print(predictions_table(rows))
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 80
    cells = [[c.strip() for c in line.strip("│").split("│")] for line in text.splitlines() if line.startswith("│")]
    assert cells == [["none", "+0.000", "-0.028 [-1.222, +1.166]"],
                     ["peer_solution_feedback", "+0.080", "+0.142* [-1.052, +1.336]"]]
    two = pd.concat([rows, rows.assign(model="qwen3-8b")])
    console = Console(width=80, record=True, file=open("/dev/null", "w"))
    console.print(predictions_table(two))
    assert "qwen3-8b" in console.export_text()
