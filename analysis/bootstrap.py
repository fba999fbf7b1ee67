"""Seed noise: bootstrap over seeds, resampling within each configuration (METHOD.md §5).

Each resample draws, for every configuration, as many seeds as it has, with replacement, from its own seeds;
configurations are never dropped or mixed, so the grid of the sweep stays fixed and only the seed noise
varies. Every resample refits each family's line, the pooled line and their leave-one-configuration-out
metrics, the same way `fit_law` does; intervals are percentiles of the resampled values.

A line gets no bootstrap where one cannot mean anything (`bootstrap_obstacles`): a line through two
configurations (it has no intervals to begin with), or a line all of whose configurations have a single seed
(every resample is the data itself). Such a line records why in `not_computed["bootstrap"]`.
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
from analysis.law import Law, LineLaw

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
    unit, weighted, by_seeds = settings["unit"], settings["weighted"], settings.get("by_seeds", False)
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
            w_all = config_w if weighted else counts.astype(float) if by_seeds else np.ones(len(labels))
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


def bootstrap_obstacles(fit: FitResult) -> dict[str, str]:
    """{line name: why a seed bootstrap is impossible} for the lines of `fit` that cannot have one."""
    out = {}
    for name, line in {**fit.law.families, "pooled": fit.law.pooled}.items():
        if line is None:
            continue
        if not line.has_intervals:
            out[name] = f"a line through {line.n_configs} configurations has no intervals to resample"
            continue
        families = line.families or (name,)
        seeds = fit.configs.loc[fit.configs["model_family"].isin(families), "n_seeds"]
        if (seeds < 2).all():
            out[name] = "every configuration has a single seed, so every resample is the data itself: run 2 or more"
    return out


def _interval(values: pd.Series, confidence: float) -> list[float] | None:
    finite = values.to_numpy()[np.isfinite(values.to_numpy())]
    if finite.size == 0:
        return None
    tail = 100 * (1 - confidence) / 2
    lo, hi = np.percentile(finite, [tail, 100 - tail])
    return [float(lo), float(hi)]


def attach_bootstrap(law: Law, draws: dict[str, pd.DataFrame] | None, *, seed: int,
                     skip: dict[str, str] | None = None) -> Law:
    """The law with a `bootstrap` entry on every line: percentile intervals of `bootstrap_draws`.

    Lines named in `skip` (see bootstrap_obstacles) get none and record the reason in not_computed; with
    draws None (nothing was resampled) every line must be in `skip` and settings keep bootstrap 0."""
    confidence = law.settings["confidence"]
    skip = skip or {}

    def summary(frame: pd.DataFrame) -> dict:
        failed = int(frame["slope"].isna().sum())
        return {"n_resamples": len(frame), "n_failed": failed,
                **{f"{stat}_ci": _interval(frame[stat], confidence) for stat in STATS}}

    def attach(name: str, line: LineLaw) -> LineLaw:
        if name in skip:
            return replace(line, bootstrap=None, not_computed={**line.not_computed, "bootstrap": skip[name]})
        if draws is None:
            raise AnalysisError(f"no bootstrap draws for {name!r}")
        return replace(line, bootstrap=summary(draws[name]))

    families = {name: attach(name, line) for name, line in law.families.items()}
    pooled = attach("pooled", law.pooled) if law.pooled else None
    settings = dict(law.settings)
    if draws is not None:
        settings.update(bootstrap=len(next(iter(draws.values()))), seed=seed)
    return replace(law, families=families, pooled=pooled, settings=settings)
