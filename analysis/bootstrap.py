"""Seed noise: bootstrap over seeds, resampling within each configuration (METHOD.md §5).

Each resample draws, for every configuration, as many seeds as it has, with replacement, from its own seeds;
configurations are never dropped or mixed, so the grid of the sweep stays fixed and only the seed noise
varies. Every resample refits each family's line, the pooled line and their leave-one-configuration-out
metrics, the same way `fit_law` does; intervals are percentiles of the resampled values.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np
import pandas as pd

from analysis.aggregate import fit_weights
from analysis.crossval import fold_lines, leave_group_out
from analysis.errors import AnalysisError
from analysis.fit import FitResult
from analysis.law import Law

STATS = ("slope", "intercept", "loo_r2", "loo_rmse")


def bootstrap_draws(trials: pd.DataFrame, fit: FitResult, *, n_resamples: int, seed: int,
                    progress: Callable[[int, int], None] | None = None) -> dict[str, pd.DataFrame]:
    """Resampled slope, intercept, loo_r2 and loo_rmse of each fitted family and of "pooled".

    trials: the completed trials the fit used. Returns {name: DataFrame with columns STATS, n_resamples
    rows}; a resample in which a family's gaps all coincide has NaN there. `progress(done, total)` is called
    as resamples finish.
    """
    if n_resamples < 1:
        raise AnalysisError(f"bootstrap needs at least 1 resample, got {n_resamples}")
    settings = fit.law.settings
    unit, weighted = settings["unit"], settings["weighted"]
    fitted = list(fit.law.families)
    frame = trials[trials["model_family"].isin(fitted)].sort_values(["model", "context", "seed"])
    config_keys = frame["model"] + "|" + frame["context"]
    labels, code = np.unique(config_keys.to_numpy(), return_inverse=True)
    counts = np.bincount(code)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    gap = frame["initial_gap"].to_numpy(dtype=float)
    improvement = frame["improvement"].to_numpy(dtype=float)
    config_family = frame.groupby(config_keys.to_numpy())["model_family"].first().loc[labels].to_numpy()
    row_family = frame["model_family"].to_numpy()
    groups = {name: config_family == name for name in fitted} if unit == "configuration" else \
        {name: row_family == name for name in fitted}
    groups["pooled"] = np.ones(len(labels) if unit == "configuration" else len(frame), dtype=bool)
    point_config = np.arange(len(labels)) if unit == "configuration" else code

    rng = np.random.default_rng(seed)
    out = {name: np.full((n_resamples, len(STATS)), np.nan) for name in groups}
    for r in range(n_resamples):
        if progress is not None:
            progress(r, n_resamples)
        idx = starts[code] + rng.integers(0, counts[code])
        g, y = gap[idx], improvement[idx]
        if unit == "configuration" or weighted:
            mean_g = np.bincount(code, g) / counts
            mean_y = np.bincount(code, y) / counts
        if weighted:
            var_y = (np.bincount(code, (y - mean_y[code]) ** 2) / np.maximum(counts - 1, 1))
            try:
                config_w = fit_weights(np.sqrt(var_y), counts)
            except AnalysisError:  # every resampled configuration drew one seed repeatedly: no weights
                continue
        if unit == "configuration":
            x_all, y_all = mean_g, mean_y
            w_all = config_w if weighted else np.ones(len(labels))
        else:
            x_all, y_all = g, y
            w_all = (config_w / counts)[code] if weighted else np.ones(len(frame))
        for name, mask in groups.items():
            x, yy, w = x_all[mask], y_all[mask], w_all[mask]
            intercepts, slopes = fold_lines(x, yy, w, np.ones((1, len(x))))
            if np.isnan(slopes[0]):
                continue
            cv = leave_group_out(x, yy, point_config[mask], w)
            out[name][r] = (slopes[0], intercepts[0], cv.r2, cv.rmse)
    if progress is not None:
        progress(n_resamples, n_resamples)
    return {name: pd.DataFrame(values, columns=list(STATS)) for name, values in out.items()}


def _interval(values: pd.Series, confidence: float) -> list[float] | None:
    finite = values.to_numpy()[np.isfinite(values.to_numpy())]
    if finite.size == 0:
        return None
    tail = 100 * (1 - confidence) / 2
    lo, hi = np.percentile(finite, [tail, 100 - tail])
    return [float(lo), float(hi)]


def attach_bootstrap(law: Law, draws: dict[str, pd.DataFrame], *, seed: int) -> Law:
    """The law with a `bootstrap` entry on every line: percentile intervals of `bootstrap_draws`."""
    confidence = law.settings["confidence"]

    def summary(frame: pd.DataFrame) -> dict:
        failed = int(frame["slope"].isna().sum())
        return {"n_resamples": len(frame), "n_failed": failed,
                **{f"{stat}_ci": _interval(frame[stat], confidence) for stat in STATS}}

    families = {name: replace(line, bootstrap=summary(draws[name])) for name, line in law.families.items()}
    pooled = replace(law.pooled, bootstrap=summary(draws["pooled"])) if law.pooled else None
    n = len(next(iter(draws.values())))
    return replace(law, families=families, pooled=pooled, settings={**law.settings, "bootstrap": n, "seed": seed})
