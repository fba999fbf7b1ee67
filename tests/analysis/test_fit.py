"""The fitted numbers against independent computations: numpy least squares and hand-written formulas."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from analysis.aggregate import aggregate_configs
from analysis.errors import AnalysisError
from analysis.fit import fit_law
from analysis.results import completed_trials
from tests.analysis.conftest import noisy_trials, trials_from


def ols_reference(x, y, w=None):
    """Weighted least squares by np.linalg.lstsq on sqrt(w)-scaled rows, with textbook SEs."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    w = np.ones_like(x) if w is None else np.asarray(w, float)
    X = np.column_stack([np.ones_like(x), x])
    sw = np.sqrt(w)
    coef, *_ = np.linalg.lstsq(X * sw[:, None], y * sw, rcond=None)
    resid = y - X @ coef
    df = len(x) - 2
    s2 = np.sum(w * resid**2) / df
    cov = s2 * np.linalg.inv(X.T @ (w[:, None] * X))
    se = np.sqrt(np.diag(cov))
    t = stats.t.ppf(0.975, df)
    ybar = np.sum(w * y) / np.sum(w)
    r2 = 1 - np.sum(w * resid**2) / np.sum(w * (y - ybar) ** 2)
    p = 2 * stats.t.sf(np.abs(coef / se), df)
    return {"coef": coef, "se": se, "ci": np.column_stack([coef - t * se, coef + t * se]), "r2": r2,
            "s2": s2, "cov": cov, "p": p, "resid": resid, "df": df}


def loo_reference(x, y, groups, w=None):
    """Hand-written leave-one-group-out loop with lstsq: (predictions, LOO R², RMSE)."""
    x, y, groups = np.asarray(x, float), np.asarray(y, float), np.asarray(groups)
    w = np.ones_like(x) if w is None else np.asarray(w, float)
    pred = np.empty_like(y)
    for g in np.unique(groups):
        out = groups == g
        X = np.column_stack([np.ones(np.sum(~out)), x[~out]])
        sw = np.sqrt(w[~out])
        coef, *_ = np.linalg.lstsq(X * sw[:, None], y[~out] * sw, rcond=None)
        pred[out] = coef[0] + coef[1] * x[out]
    press = np.sum((y - pred) ** 2)
    return pred, 1 - press / np.sum((y - y.mean()) ** 2), np.sqrt(press / len(y))


def test_points_exactly_on_a_line_give_the_line_r2_one_and_perfect_loo():
    gaps = [0.0, 0.05, 0.1, 0.2, 0.3]
    trials = trials_from([(f"c{i}", [g, g], [0.02 + 0.7 * g] * 2) for i, g in enumerate(gaps)])
    law = fit_law(completed_trials(trials)).law
    line = law.families["fam"]
    assert line.slope == pytest.approx(0.7, abs=1e-12)
    assert line.intercept == pytest.approx(0.02, abs=1e-12)
    assert line.r2 == pytest.approx(1.0, abs=1e-12)
    assert line.loo_r2 == pytest.approx(1.0, abs=1e-12)
    assert line.loo_rmse == pytest.approx(0.0, abs=1e-12)
    assert line.slope_ci[0] == pytest.approx(0.7, abs=1e-9) and line.slope_ci[1] == pytest.approx(0.7, abs=1e-9)
    assert (line.n_configs, line.n_trials, line.n_points) == (5, 10, 5)


def test_identical_improvements_give_a_flat_line_and_no_r2_without_warnings():
    # A demo-sized sweep can end with every configuration improved by exactly the same amount.
    trials = trials_from([(f"c{i}", [g], [0.047]) for i, g in enumerate([0.0, 0.04, 0.08])])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        line = fit_law(completed_trials(trials)).law.families["fam"]
    assert line.slope == pytest.approx(0.0, abs=1e-12) and line.intercept == pytest.approx(0.047, abs=1e-12)
    assert line.r2 is None and line.loo_r2 is None
    assert "improved by the same amount" in line.not_computed["r2"]


def test_hand_computed_four_point_example():
    # x = 0,1,2,3; y = 1,3,2,5. By hand: x̄ = 1.5, ȳ = 2.75, Sxx = 5, Sxy = 5.5 → b = 1.1, a = 1.1;
    # residuals -0.1, 0.8, -1.3, 0.6 → RSS 2.7, s² = 1.35, SS_tot = 8.75; leverages 0.7, 0.3, 0.3, 0.7 →
    # deleted residuals -1/3, 8/7, -13/7, 2.
    trials = trials_from([("a", 0.0, 1.0), ("b", 1.0, 3.0), ("c", 2.0, 2.0), ("d", 3.0, 5.0)])
    line = fit_law(completed_trials(trials)).law.families["fam"]
    assert line.slope == pytest.approx(1.1)
    assert line.intercept == pytest.approx(1.1)
    assert line.r2 == pytest.approx(1 - 2.7 / 8.75)
    assert line.slope_se == pytest.approx(np.sqrt(1.35 / 5))
    assert line.intercept_se == pytest.approx(np.sqrt(1.35 * (1 / 4 + 1.5**2 / 5)))
    t = 4.302652729911275  # t_{0.975, 2}
    assert line.slope_ci[0] == pytest.approx(1.1 - t * np.sqrt(0.27))
    assert line.slope_ci[1] == pytest.approx(1.1 + t * np.sqrt(0.27))
    press = 1 / 9 + 64 / 49 + 169 / 49 + 4
    assert line.loo_r2 == pytest.approx(1 - press / 8.75)
    assert line.loo_rmse == pytest.approx(np.sqrt(press / 4))
    assert line.residual_var == pytest.approx(1.35)
    assert line.df_resid == 2


def test_family_fits_match_least_squares_formulas_and_a_hand_written_loo(rng):
    trials = completed_trials(noisy_trials(rng))
    result = fit_law(trials)
    configs = aggregate_configs(trials)
    for family, line in result.law.families.items():
        sub = configs[configs["model_family"] == family]
        ref = ols_reference(sub["gap_mean"], sub["improvement_mean"])
        assert [line.intercept, line.slope] == pytest.approx(ref["coef"], rel=1e-10)
        assert [line.intercept_se, line.slope_se] == pytest.approx(ref["se"], rel=1e-10)
        assert list(line.slope_ci) == pytest.approx(ref["ci"][1], rel=1e-10)
        assert list(line.intercept_ci) == pytest.approx(ref["ci"][0], rel=1e-10)
        assert line.r2 == pytest.approx(ref["r2"], rel=1e-10)
        assert [line.intercept_p, line.slope_p] == pytest.approx(ref["p"], rel=1e-8)
        assert np.asarray(line.coef_cov) == pytest.approx(ref["cov"], rel=1e-10)
        assert line.residual_var == pytest.approx(ref["s2"], rel=1e-10)
        _, loo_r2, loo_rmse = loo_reference(sub["gap_mean"], sub["improvement_mean"], sub["context"])
        assert line.loo_r2 == pytest.approx(loo_r2, rel=1e-10)
        assert line.loo_rmse == pytest.approx(loo_rmse, rel=1e-10)
        assert line.n_configs == len(sub) and line.n_trials == int(sub["n_seeds"].sum())
    # The pooled line is one line through every family's configurations.
    ref = ols_reference(configs["gap_mean"], configs["improvement_mean"])
    assert [result.law.pooled.intercept, result.law.pooled.slope] == pytest.approx(ref["coef"], rel=1e-10)
    keys = configs["model"] + configs["context"]
    _, loo_r2, _ = loo_reference(configs["gap_mean"], configs["improvement_mean"], keys)
    assert result.law.pooled.loo_r2 == pytest.approx(loo_r2, rel=1e-10)


def test_aggregation_means_and_sds_over_seeds(rng):
    trials = completed_trials(noisy_trials(rng, n_seeds=4))
    configs = aggregate_configs(trials)
    for row in configs.itertuples():
        sel = trials[(trials["model"] == row.model) & (trials["context"] == row.context)]
        assert row.n_seeds == 4
        assert row.gap_mean == pytest.approx(np.mean(sel["initial_gap"]))
        assert row.gap_sd == pytest.approx(np.std(sel["initial_gap"], ddof=1))
        assert row.improvement_sd == pytest.approx(np.std(sel["improvement"], ddof=1))


def test_seed_level_fit_uses_every_trial_and_holds_out_whole_configurations(rng):
    trials = completed_trials(noisy_trials(rng))
    line = fit_law(trials, unit="seed").law.families["fam_a"]
    sub = trials[trials["model_family"] == "fam_a"]
    ref = ols_reference(sub["initial_gap"], sub["improvement"])
    assert [line.intercept, line.slope] == pytest.approx(ref["coef"], rel=1e-10)
    assert list(line.slope_ci) == pytest.approx(ref["ci"][1], rel=1e-10)
    assert line.n_points == len(sub) and line.df_resid == len(sub) - 2
    _, loo_r2, loo_rmse = loo_reference(sub["initial_gap"], sub["improvement"], sub["context"])
    assert line.loo_r2 == pytest.approx(loo_r2, rel=1e-10)
    assert line.loo_rmse == pytest.approx(loo_rmse, rel=1e-10)


def test_weighted_fit_is_inverse_variance_least_squares(rng):
    trials = completed_trials(noisy_trials(rng))
    line = fit_law(trials, weighted=True).law.families["fam_b"]
    sub = aggregate_configs(trials).query("model_family == 'fam_b'")
    var = sub["improvement_sd"].to_numpy() ** 2 / sub["n_seeds"].to_numpy()
    w_all = 1 / np.maximum(var, 0.1 * np.median(var))  # the documented floor; no config hits it here
    ref = ols_reference(sub["gap_mean"], sub["improvement_mean"], w_all)
    assert [line.intercept, line.slope] == pytest.approx(ref["coef"], rel=1e-10)
    assert [line.intercept_se, line.slope_se] == pytest.approx(ref["se"], rel=1e-10)
    _, loo_r2, _ = loo_reference(sub["gap_mean"], sub["improvement_mean"], sub["context"], w_all)
    assert line.loo_r2 == pytest.approx(loo_r2, rel=1e-10)


def test_by_seeds_weights_each_configuration_by_its_seed_count(rng):
    trials = completed_trials(noisy_trials(rng))
    # Unequal seeds, as a guided sweep leaves them: drop some seeds of fam_b's configurations.
    fam_b = trials[trials["model_family"] == "fam_b"]
    drop = fam_b.groupby("context").head(1).index[::2]
    trials = trials.drop(index=drop)
    line = fit_law(trials, by_seeds=True).law.families["fam_b"]
    sub = aggregate_configs(trials).query("model_family == 'fam_b'")
    assert sub["n_seeds"].nunique() > 1
    ref = ols_reference(sub["gap_mean"], sub["improvement_mean"], sub["n_seeds"].to_numpy(dtype=float))
    assert [line.intercept, line.slope] == pytest.approx(ref["coef"], rel=1e-10)
    assert [line.intercept_se, line.slope_se] == pytest.approx(ref["se"], rel=1e-10)
    # The point estimate is that of every seed a point at its configuration's mean gap.
    rows = sub.loc[sub.index.repeat(sub["n_seeds"])]
    slope = np.polyfit(rows["gap_mean"], rows["improvement_mean"], 1)[0]
    assert line.slope == pytest.approx(slope, rel=1e-10)
    with pytest.raises(AnalysisError, match="choose one weighting"):
        fit_law(trials, weighted=True, by_seeds=True)


def test_interaction_test_is_the_f_test_of_separate_against_common_slopes(rng):
    trials = completed_trials(noisy_trials(rng))
    test = fit_law(trials).law.pooled.interaction_test
    configs = aggregate_configs(trials)
    x, y = configs["gap_mean"].to_numpy(), configs["improvement_mean"].to_numpy()
    d = (configs["model_family"] == "fam_b").to_numpy(float)
    restricted = np.column_stack([np.ones_like(x), x, d])
    full = np.column_stack([restricted, d * x])
    rss = [np.sum((y - X @ np.linalg.lstsq(X, y, rcond=None)[0]) ** 2) for X in (restricted, full)]
    df_den = len(y) - 4
    f = (rss[0] - rss[1]) / (rss[1] / df_den)
    assert test["f"] == pytest.approx(f, rel=1e-8)
    assert test["p"] == pytest.approx(stats.f.sf(f, 1, df_den), rel=1e-6)
    assert test["common_slope"] == pytest.approx(np.linalg.lstsq(restricted, y, rcond=None)[0][1], rel=1e-10)
    # The two families were drawn with slopes 0.8 and 0.5: the test sees the difference.
    assert test["p"] < 0.01


def test_leave_one_size_out_and_leave_one_family_out(rng):
    trials = completed_trials(noisy_trials(rng, sizes_per_family=2))
    law = fit_law(trials).law
    configs = aggregate_configs(trials)
    sub = configs[configs["model_family"] == "fam_a"]
    _, r2, rmse = loo_reference(sub["gap_mean"], sub["improvement_mean"], sub["model_size_b"])
    assert law.families["fam_a"].leave_one_size_out == {"r2": pytest.approx(r2), "rmse": pytest.approx(rmse),
                                                        "n_groups": 2}
    _, r2, rmse = loo_reference(configs["gap_mean"], configs["improvement_mean"], configs["model_family"])
    assert law.pooled.leave_one_family_out["r2"] == pytest.approx(r2)
    assert law.pooled.leave_one_family_out["rmse"] == pytest.approx(rmse)


def test_diagnostics_leverage_and_cooks_distance(rng):
    trials = completed_trials(noisy_trials(rng))
    result = fit_law(trials)
    points = result.points[result.points["model_family"] == "fam_a"]
    x, y = points["gap"].to_numpy(), points["improvement"].to_numpy()
    X = np.column_stack([np.ones_like(x), x])
    h = np.diag(X @ np.linalg.inv(X.T @ X) @ X.T)
    ref = ols_reference(x, y)
    cooks = ref["resid"] ** 2 / (2 * ref["s2"]) * h / (1 - h) ** 2
    assert points["leverage"].to_numpy() == pytest.approx(h, rel=1e-10)
    assert points["cooks_d"].to_numpy() == pytest.approx(cooks, rel=1e-8)
    assert points["residual"].to_numpy() == pytest.approx(ref["resid"], abs=1e-12)


def test_a_family_with_one_configuration_or_one_gap_is_skipped_not_fitted(rng):
    trials = noisy_trials(rng)
    single = trials_from([("x", 0.1, 0.05)], family="single")
    flat = trials_from([("x", 0.1, 0.05), ("y", 0.1, 0.1)], family="flat")
    law = fit_law(completed_trials(pd.concat([trials, single, flat], ignore_index=True))).law
    assert "single" not in law.families and "flat" not in law.families
    assert law.skipped["single"].startswith("1 configuration (model × context)")
    assert "add contexts" in law.skipped["single"]
    assert law.skipped["flat"].startswith("all 2 configurations have the same gap (0.1)")
    assert law.pooled.families == ("fam_a", "fam_b")


@pytest.mark.parametrize("unit", ["configuration", "seed"])
def test_law_json_round_trip_keeps_every_number(rng, tmp_path, unit):
    from analysis.law import load_law

    law = fit_law(completed_trials(noisy_trials(rng)), unit=unit).law
    law.save(tmp_path / "law.json")
    again = load_law(tmp_path / "law.json")
    assert again.to_dict() == law.to_dict()
    keys = {"slope", "intercept", "slope_ci", "intercept_ci", "r2", "loo_r2", "loo_rmse", "n_configs", "n_trials"}
    assert keys <= set(law.to_dict()["families"]["fam_a"]) and keys <= set(law.to_dict()["pooled"])


def test_bad_confidence_is_rejected(rng):
    with pytest.raises(AnalysisError, match="confidence"):
        fit_law(completed_trials(noisy_trials(rng)), confidence=95)


def test_gap_reliability_by_hand():
    from analysis.aggregate import gap_reliability

    # Gap means 0, 0.1, 0.2 (variance 0.01); seed SDs 0.01, 0.02, 0.03 over 2, 2, 4 seeds:
    # noise = mean(1e-4/2, 4e-4/2, 9e-4/4) = (0.5 + 2 + 2.25)e-4 / 3 → λ = 1 − noise/0.01.
    configs = pd.DataFrame({"gap_mean": [0.0, 0.1, 0.2], "gap_sd": [0.01, 0.02, 0.03], "n_seeds": [2, 2, 4]})
    assert gap_reliability(configs) == pytest.approx(1 - (4.75e-4 / 3) / 0.01)
