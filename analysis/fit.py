"""Fitting the law improvement = a + b·gap: one line per model family, a pooled line, and the test of whether
families share a slope (METHOD.md §5). Every reported line is a statsmodels OLS (or WLS) fit."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
# The regression module alone: statsmodels.api would import every model family and take seconds.
from statsmodels.regression.linear_model import OLS, WLS, RegressionResultsWrapper

from analysis.aggregate import Unit, aggregate_configs, fit_points
from analysis.crossval import leave_group_out
from analysis.errors import AnalysisError
from analysis.law import MIN_CONFIGS, MIN_LINE_CONFIGS, NEEDS, Law, LineLaw


@dataclass(frozen=True)
class FitResult:
    """A fitted law and what the report and figures show beside it."""

    law: Law
    configs: pd.DataFrame  # aggregate_configs() of the completed trials
    # fit_points() + family_fitted, fitted, residual, leverage, cooks_d, student_resid, loo_prediction
    points: pd.DataFrame
    models: dict[str, RegressionResultsWrapper]  # per fitted family, and "pooled"


def fit_line(x, y, *, weights=None) -> RegressionResultsWrapper:
    """OLS (or WLS with `weights`) of y on [1, x]. params are (intercept, slope)."""
    x = np.asarray(x, dtype=float)
    design = np.column_stack([np.ones_like(x), x])
    y = np.asarray(y, dtype=float)
    model = OLS(y, design) if weights is None else WLS(y, design, weights=np.asarray(weights, dtype=float))
    with warnings.catch_warnings():
        # A perfect fit (zero residual variance) makes t statistics infinite; the numbers stay meaningful.
        warnings.simplefilter("ignore", RuntimeWarning)
        return model.fit()


def _cv_check(x, y, groups, weights, what: str) -> tuple[dict | None, str | None]:
    """Leave-one-group-out over `groups` (e.g. model sizes): (CV dict, None), or (None, why it is impossible)."""
    labels = np.unique(np.asarray(groups))
    if len(labels) < 2:
        return None, f"one {what} ({labels[0]})"
    cv = leave_group_out(x, y, groups, weights)
    if not np.isfinite(cv.predictions).all():
        return None, f"holding out a {what} leaves fewer than 2 different gaps to fit a line on"
    return {"r2": cv.r2, "rmse": cv.rmse, "n_groups": cv.n_groups}, None


def _size_label(size: float) -> str:
    return f"{size:g}B"


def _base_fields(points: pd.DataFrame, n_trials: int) -> dict:
    x = points["gap"].to_numpy()
    return {"n_configs": int(points["config"].nunique()), "n_trials": n_trials, "n_points": len(points),
            "x_mean": float(x.mean()), "x_min": float(x.min()), "x_max": float(x.max()),
            "sizes": tuple(sorted(float(s) for s in points["model_size_b"].unique()))}


def _size_check(points: pd.DataFrame) -> tuple[dict | None, str | None]:
    sizes = points["model_size_b"].map(_size_label).to_numpy()
    return _cv_check(points["gap"].to_numpy(), points["improvement"].to_numpy(), sizes,
                     points["weight"].to_numpy(), "model size")


def _line_law(res: RegressionResultsWrapper, points: pd.DataFrame, n_trials: int, *, confidence: float,
              loo) -> LineLaw:
    ci = np.asarray(res.conf_int(alpha=1 - confidence))
    cov = np.asarray(res.cov_params())
    by_size, why_size = _size_check(points)
    not_computed = {"leave_one_size_out": why_size} if why_size else {}
    if not np.isfinite(loo.predictions).all():
        not_computed["loo"] = "holding out a configuration leaves fewer than 2 different gaps to fit a line on"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        pvalues = np.asarray(res.pvalues, dtype=float)
    r2 = None
    if np.ptp(res.model.endog) > 0:
        r2 = float(res.rsquared)
    else:  # R² = 1 - SSR/SS_tot, and SS_tot is 0 (or float rounding of 0)
        not_computed["r2"] = not_computed["loo"] = (
            "every configuration improved by the same amount: there is no variation for the gap to explain")
    return LineLaw(
        slope=float(res.params[1]), intercept=float(res.params[0]),
        slope_ci=(float(ci[1, 0]), float(ci[1, 1])), intercept_ci=(float(ci[0, 0]), float(ci[0, 1])),
        slope_se=float(res.bse[1]), intercept_se=float(res.bse[0]),
        slope_p=float(pvalues[1]), intercept_p=float(pvalues[0]),
        r2=r2, loo_r2=loo.r2 if "loo" not in not_computed else None, loo_rmse=loo.rmse,
        df_resid=float(res.df_resid), residual_var=float(res.scale),
        coef_cov=((float(cov[0, 0]), float(cov[0, 1])), (float(cov[1, 0]), float(cov[1, 1]))),
        leave_one_size_out=by_size, not_computed=not_computed, **_base_fields(points, n_trials),
    )


def _two_point_line(points: pd.DataFrame) -> tuple[float, float]:
    """(intercept, slope) of the line through the means of exactly two configurations' points."""
    means = points.groupby("config")[["gap", "improvement"]].mean()
    (x1, y1), (x2, y2) = means.to_numpy()
    slope = (y2 - y1) / (x2 - x1)
    return float(y1 - slope * x1), float(slope)


def _two_point_law(points: pd.DataFrame, n_trials: int) -> LineLaw:
    """A line on 2 configurations: the line through their two means, and no statistic that needs a third
    point (intervals, p-values, R², leave-one-out); `not_computed` says why each is missing."""
    intercept, slope = _two_point_line(points)
    why = (f"{MIN_LINE_CONFIGS} configurations: a line through two points fits them exactly, whatever the law; "
           f"this needs at least {MIN_CONFIGS}")
    not_computed = {"intervals": why, "loo": why}
    if points["model_size_b"].nunique() > 1:
        not_computed["leave_one_size_out"] = why
    else:
        not_computed["leave_one_size_out"] = f"one model size ({_size_label(points['model_size_b'].iloc[0])})"
    return LineLaw(slope=slope, intercept=intercept, slope_ci=None, intercept_ci=None, slope_se=None,
                   intercept_se=None, slope_p=None, intercept_p=None, r2=None, loo_r2=None, loo_rmse=None,
                   df_resid=0.0, residual_var=None, coef_cov=None, not_computed=not_computed,
                   **_base_fields(points, n_trials))


def _why_not_fittable(points: pd.DataFrame) -> str | None:
    n_configs = points["config"].nunique()
    if n_configs < MIN_LINE_CONFIGS:
        return f"{n_configs} configuration (model × context); {NEEDS}: add contexts to the sweep"
    gaps = points.groupby("config")["gap"].mean().to_numpy()  # the law is about configurations
    if np.ptp(gaps) <= 1e-12 * max(1.0, float(np.abs(gaps).max())):
        return (f"all {n_configs} configurations have the same gap ({gaps[0]:.4g}), no slope can "
                f"be fitted: add contexts whose gaps differ ({NEEDS})")
    return None


def interaction_test(points: pd.DataFrame, *, confidence: float = 0.95) -> dict | None:
    """Do families share a slope? F-test of improvement ~ gap·family against improvement ~ gap + family.

    Also reports the common slope of the restricted model (family as a factor: one intercept per family,
    one slope). None with fewer than two families.
    """
    families = sorted(points["model_family"].unique())
    if len(families) < 2:
        return None
    gap = points["gap"].to_numpy(dtype=float)
    dummies = np.column_stack([(points["model_family"] == f).to_numpy(dtype=float) for f in families[1:]])
    restricted_x = np.column_stack([np.ones_like(gap), gap, dummies])
    full_x = np.column_stack([restricted_x, dummies * gap[:, None]])
    y = points["improvement"].to_numpy(dtype=float)
    w = points["weight"].to_numpy(dtype=float)
    restricted = WLS(y, restricted_x, weights=w).fit()
    full = WLS(y, full_x, weights=w).fit()
    if full.df_resid < 1:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        f_value, p_value, df_diff = full.compare_f_test(restricted)
    ci = np.asarray(restricted.conf_int(alpha=1 - confidence))
    return {
        "test": "F: improvement ~ gap*family vs improvement ~ gap + family",
        "f": float(f_value), "p": float(p_value), "df_num": float(df_diff), "df_den": float(full.df_resid),
        "families": families,
        "common_slope": float(restricted.params[1]), "common_slope_ci": [float(ci[1, 0]), float(ci[1, 1])],
    }


def fit_law(trials: pd.DataFrame, *, unit: Unit = "configuration", weighted: bool = False,
            by_seeds: bool = False, confidence: float = 0.95) -> FitResult:
    """Fit the law on completed trials (see results.completed_trials).

    One line per family with at least 2 configurations of different gaps (others are listed in
    law.skipped), a pooled line over the fitted families, LOO (leave one configuration out), leave one size
    out per family and leave one family out for the pooled line where there are groups to leave out, and
    per-point diagnostics (leverage, Cook's distance, studentised residuals). A line on 2 configurations is
    the line through their two means, without intervals, p-values, R², LOO or diagnostics (see law.py);
    every line says in `not_computed` what it lacks and why.
    """
    if not 0 < confidence < 1:
        raise AnalysisError(f"confidence must lie in (0, 1), got {confidence}")
    configs = aggregate_configs(trials)
    points = fit_points(trials, unit=unit, weighted=weighted, by_seeds=by_seeds, configs=configs)
    why = _why_not_fittable(points)
    if why:
        raise AnalysisError(f"cannot fit the law: {why}")
    weights = points["weight"].to_numpy() if weighted or by_seeds else None

    families: dict[str, LineLaw] = {}
    skipped: dict[str, str] = {}
    models: dict[str, RegressionResultsWrapper] = {}
    columns = {c: np.full(len(points), np.nan) for c in
               ("fitted", "residual", "leverage", "cooks_d", "student_resid", "loo_prediction")}
    fitted_mask = np.zeros(len(points), dtype=bool)
    for family, rows in points.groupby("model_family", sort=True).groups.items():
        sub = points.loc[rows]
        why = _why_not_fittable(sub)
        if why:
            skipped[family] = why
            continue
        n_trials = int(trials["model_family"].eq(family).sum())
        idx = np.asarray(rows)
        fitted_mask[idx] = True
        if sub["config"].nunique() < MIN_CONFIGS:
            families[family] = line = _two_point_law(sub, n_trials)
            fitted = line.intercept + line.slope * sub["gap"].to_numpy()
            columns["fitted"][idx] = fitted
            columns["residual"][idx] = sub["improvement"].to_numpy() - fitted
            continue
        w = None if weights is None else sub["weight"].to_numpy()
        res = fit_line(sub["gap"], sub["improvement"], weights=w)
        loo = leave_group_out(sub["gap"], sub["improvement"], sub["config"], sub["weight"])
        families[family] = _line_law(res, sub, n_trials, confidence=confidence, loo=loo)
        models[family] = res
        with warnings.catch_warnings():
            # Leaving one configuration out of a small fit can leave one gap value (a rank-deficient design):
            # statsmodels warns (RuntimeWarning, SingularMatrixWarning) and that point's diagnostics are void.
            warnings.simplefilter("ignore")
            # WLS results have no influence measures; those of OLS on the whitened data are the WLS ones.
            influence = OLS(res.model.wendog, res.model.wexog).fit().get_influence()
            columns["leverage"][idx] = influence.hat_matrix_diag
            columns["cooks_d"][idx] = influence.cooks_distance[0]
            columns["student_resid"][idx] = influence.resid_studentized_external
        columns["fitted"][idx] = res.fittedvalues
        columns["residual"][idx] = sub["improvement"].to_numpy() - res.fittedvalues
        columns["loo_prediction"][idx] = loo.predictions
    if not families:
        reasons = "; ".join(f"{f}: {r}" for f, r in skipped.items())
        raise AnalysisError(f"cannot fit the law for any model family ({reasons})")

    pooled_points = points[fitted_mask]
    n_pooled_trials = int(trials["model_family"].isin(list(families)).sum())
    if pooled_points["config"].nunique() < MIN_CONFIGS:
        pooled = _two_point_law(pooled_points, n_pooled_trials)
    else:
        w = None if weights is None else pooled_points["weight"].to_numpy()
        res = fit_line(pooled_points["gap"], pooled_points["improvement"], weights=w)
        loo = leave_group_out(pooled_points["gap"], pooled_points["improvement"], pooled_points["config"],
                              pooled_points["weight"])
        pooled = _line_law(res, pooled_points, n_pooled_trials, confidence=confidence, loo=loo)
        models["pooled"] = res
    not_computed = dict(pooled.not_computed)
    by_family, why = _cv_check(pooled_points["gap"].to_numpy(), pooled_points["improvement"].to_numpy(),
                               pooled_points["model_family"].to_numpy(), pooled_points["weight"].to_numpy(),
                               "model family")
    if why:
        not_computed["leave_one_family_out"] = why
    test = None
    few = [f for f, line in families.items() if not line.has_intervals]
    if len(families) < 2:
        not_computed["interaction_test"] = f"one model family ({next(iter(families))})"
    elif few:
        names = few[0] if len(few) == 1 else ", ".join(few[:-1]) + " and " + few[-1]
        not_computed["interaction_test"] = (f"{names} {'has' if len(few) == 1 else 'have'} only "
                                            f"{MIN_LINE_CONFIGS} configurations, no slope to compare")
    else:
        test = interaction_test(pooled_points, confidence=confidence)
        if test is None:
            not_computed["interaction_test"] = "too few configurations to fit a slope per family and test them"
    pooled = replace(pooled, families=tuple(families), leave_one_family_out=by_family, interaction_test=test,
                     not_computed=not_computed)

    settings = {"unit": unit, "weighted": weighted, "by_seeds": by_seeds, "confidence": confidence, "bootstrap": 0,
                "seed": None}
    law = Law(settings=settings, families=families, pooled=pooled, skipped=skipped)
    points = points.assign(family_fitted=fitted_mask, **columns)
    return FitResult(law=law, configs=configs, points=points, models=models)
