"""Screening: predicted improvement, with intervals, for configurations whose gap is measured but which were
never trained — computed from law.json alone (see analysis/law.py for the formula)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from analysis.errors import AnalysisError
from analysis.law import MIN_CONFIGS, Law, LineLaw, load_law
from analysis.results import read_table

GAP_COLUMNS = ["model_family", "model", "context", "initial_gap"]


def _as_law(law: Law | dict | str | Path) -> Law:
    if isinstance(law, Law):
        return law
    if isinstance(law, dict):
        return Law.from_dict(law)
    return load_law(law)


def predict_improvement(law: Law | dict | str | Path, family: str,
                        gaps: Sequence[float] | np.ndarray | pd.Series | pd.DataFrame) -> pd.DataFrame:
    """Predicted improvement of new configurations of `family` (or "pooled") from their initial gaps.

    gaps: numbers, or a DataFrame with an `initial_gap` column (its other columns are kept). Returns one row
    per gap with columns initial_gap, predicted_improvement, se_mean, ci_lo, ci_hi (the confidence interval of
    the law's mean at that gap), se_obs, pi_lo, pi_hi (the prediction interval of a new configuration's
    improvement, what statsmodels' get_prediction calls the obs interval), extrapolated (gap outside the
    range of the fitted gaps). The level is the law's confidence setting.

    A line without intervals (fitted on 2 configurations) is refused: it predicts nothing about a new
    configuration, and the AnalysisError says so and what the law needs.
    """
    law = _as_law(law)
    line = law.line(family)
    _check_can_predict(law, family, line)
    confidence = float(law.settings.get("confidence", 0.95))
    if isinstance(gaps, pd.DataFrame):
        if "initial_gap" not in gaps.columns:
            raise AnalysisError("gaps table lacks column: initial_gap")
        frame = gaps.reset_index(drop=True).copy()
    else:
        frame = pd.DataFrame({"initial_gap": np.atleast_1d(np.asarray(gaps, dtype=float))})
    g = pd.to_numeric(frame["initial_gap"], errors="coerce").to_numpy(dtype=float)
    if not np.isfinite(g).all():
        raise AnalysisError(f"initial_gap is missing or not a number in row(s) "
                            f"{', '.join(map(str, np.flatnonzero(~np.isfinite(g))[:5]))}")
    span = 1e-9 * max(1.0, abs(line.x_max))
    return frame.assign(
        initial_gap=g,
        **line_prediction(line.intercept, line.slope, line.coef_cov, line.residual_var, line.df_resid, g,
                          confidence=confidence),
        extrapolated=(g < line.x_min - span) | (g > line.x_max + span),
    )


def line_prediction(intercept: float, slope: float, coef_cov, residual_var: float, df_resid: float, gaps,
                    *, confidence: float) -> dict[str, np.ndarray]:
    """The law's prediction at `gaps` (see law.py): predicted_improvement, se_mean, ci_lo, ci_hi (the line's
    mean), se_obs, pi_lo, pi_hi (a new configuration's improvement). coef_cov is over (intercept, slope)."""
    g = np.asarray(gaps, dtype=float)
    cov = np.asarray(coef_cov, dtype=float)
    mean = intercept + slope * g
    var_mean = np.maximum(cov[0, 0] + 2 * g * cov[0, 1] + g * g * cov[1, 1], 0.0)
    se_mean = np.sqrt(var_mean)
    se_obs = np.sqrt(var_mean + residual_var)
    t = stats.t.ppf(0.5 + confidence / 2, df_resid)
    return {"predicted_improvement": mean, "se_mean": se_mean, "ci_lo": mean - t * se_mean,
            "ci_hi": mean + t * se_mean, "se_obs": se_obs, "pi_lo": mean - t * se_obs, "pi_hi": mean + t * se_obs}


def _check_can_predict(law: Law, family: str, line: LineLaw) -> None:
    if line.has_intervals:
        return
    pooled = law.pooled
    hint = (" or screen with the pooled law (--pooled), which has intervals"
            if family != "pooled" and pooled is not None and pooled.has_intervals else "")
    raise AnalysisError(
        f"the law {family!r} is a line through {line.n_configs} configurations: it has no prediction interval "
        f"and says nothing about a new configuration; refit it on at least {MIN_CONFIGS} configurations "
        f"(add contexts){hint}")


def screen(law: Law | dict | str | Path, gaps: pd.DataFrame, *, pooled: bool = False) -> pd.DataFrame:
    """Predictions for a gaps table (GAP_COLUMNS), each row by its family's law or, with pooled, the pooled law.

    Rows are returned in input order with the column `law` naming the line that predicted them.
    """
    missing = [c for c in GAP_COLUMNS if c not in gaps.columns]
    if missing:
        raise AnalysisError(f"gaps table lacks column(s): {', '.join(missing)}")
    if gaps.empty:
        raise AnalysisError("gaps table has no rows")
    law = _as_law(law)
    frame = gaps.reset_index(drop=True)
    families = ["pooled"] * len(frame) if pooled else frame["model_family"].astype(str).tolist()
    for family in dict.fromkeys(families):
        # An unknown family, or a line without intervals, fails here before any prediction.
        _check_can_predict(law, family, law.line(family))
    parts = []
    for family in dict.fromkeys(families):
        rows = frame[[f == family for f in families]]
        parts.append(predict_improvement(law, family, rows).assign(law=family).set_index(rows.index))
    return pd.concat(parts).sort_index()


def load_gaps(path: str | Path) -> pd.DataFrame:
    """A gaps table from .parquet, .csv, .json (a list of records) or .jsonl."""
    return read_table(Path(path), what="gaps file")
