"""Configurations (model × context) from trials: means and SDs over seeds, and the points a fit uses."""

from __future__ import annotations

from typing import Literal

import numpy as np
import pandas as pd

from analysis.errors import AnalysisError

CONFIG_KEYS = ["model_family", "model", "model_size_b", "context"]
Unit = Literal["configuration", "seed"]


def aggregate_configs(trials: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, context) of completed trials.

    Columns: CONFIG_KEYS, n_seeds, gap_mean, gap_sd, improvement_mean, improvement_sd (sample SD, ddof=1;
    0 for a single seed), initial_student_mean, initial_teacher_mean, final_student_mean, and
    initial_student_t1_mean: the student at the self-teacher's train-time decoding, the side of the gap (each
    trial's gap is teacher − that student, so its mean is initial_teacher_mean − gap_mean exactly), where
    initial_student_mean is the student at validation decoding, the side of the improvement.
    """
    # numpy rather than a pandas groupby: the coverage checks and the bootstrap call this thousands of times.
    # Family and size are fixed per model (results.completed_trials checks it), so (family, model, context)
    # names a configuration; the unit separator keeps the joined keys in tuple order.
    key = (trials["model_family"] + "\x1f" + trials["model"] + "\x1f" + trials["context"]).to_numpy(dtype=object)
    _, first, code = np.unique(key, return_index=True, return_inverse=True)
    n = np.bincount(code).astype(float)

    def mean(col: str) -> np.ndarray:
        return np.bincount(code, trials[col].to_numpy(dtype=float)) / n

    def sd(col: str, centre: np.ndarray) -> np.ndarray:
        sq = np.bincount(code, (trials[col].to_numpy(dtype=float) - centre[code]) ** 2)
        return np.sqrt(np.divide(sq, n - 1, out=np.zeros_like(sq), where=n > 1))

    out = trials.iloc[first][CONFIG_KEYS].reset_index(drop=True)
    gap, improvement = mean("initial_gap"), mean("improvement")
    out = out.assign(
        n_seeds=n.astype("int64"), gap_mean=gap, gap_sd=sd("initial_gap", gap),
        improvement_mean=improvement, improvement_sd=sd("improvement", improvement),
        initial_student_mean=mean("initial_student_acc"), initial_teacher_mean=mean("initial_teacher_acc"),
        final_student_mean=mean("final_student_acc"),
    )
    out["initial_student_t1_mean"] = out["initial_teacher_mean"] - out["gap_mean"]
    return out


def fit_weights(improvement_sd: np.ndarray, n_seeds: np.ndarray) -> np.ndarray:
    """Inverse-variance weights of configuration means, normalised to mean 1.

    The variance of a mean is SD²/n; it is floored at 10% of the median positive variance so that a
    configuration whose seeds happened to agree does not take all the weight. Normalising to mean 1 keeps the
    residual variance of the fit on the scale of a typical configuration, which is what a prediction for a
    new configuration needs.
    """
    n_seeds = np.asarray(n_seeds, dtype=float)
    if (n_seeds < 2).any():
        raise AnalysisError("weighted fit needs at least 2 seeds per configuration")
    var = np.asarray(improvement_sd, dtype=float) ** 2 / n_seeds
    positive = var[var > 0]
    if positive.size == 0:
        raise AnalysisError("weighted fit: every configuration has zero seed variance")
    w = 1.0 / np.maximum(var, 0.1 * np.median(positive))
    return w / w.mean()


def fit_points(trials: pd.DataFrame, *, unit: Unit = "configuration", weighted: bool = False,
               by_seeds: bool = False, configs: pd.DataFrame | None = None) -> pd.DataFrame:
    """The points a law is fitted on: columns CONFIG_KEYS, config (model|context), gap, improvement, weight.

    unit "configuration": one point per configuration (means over seeds); "seed": one point per trial, and a
    weighted fit gives each trial its configuration's weight divided by its seed count. `by_seeds` weights a
    configuration mean by its seed count (its variance is the seed noise over n when the configurations' own
    scatter about the law is small): for configurations with unequal seeds, as a guided sweep trains them.
    """
    if weighted and by_seeds:
        raise AnalysisError("choose one weighting: by the seed variance (--weighted) or by the seed count "
                            "(--by-seeds)")
    configs = aggregate_configs(trials) if configs is None else configs
    weights = (fit_weights(configs["improvement_sd"], configs["n_seeds"]) if weighted
               else configs["n_seeds"].to_numpy(dtype=float) if by_seeds else np.ones(len(configs)))
    configs = configs.assign(weight=weights, config=configs["model"] + "|" + configs["context"])
    if unit == "configuration":
        points = configs.rename(columns={"gap_mean": "gap", "improvement_mean": "improvement"})
    elif unit == "seed":
        per_config = configs[["model", "context", "config", "weight", "n_seeds"]]
        points = trials.merge(per_config, on=["model", "context"], how="left")
        points = points.rename(columns={"initial_gap": "gap"})
        points["weight"] = points["weight"] / points["n_seeds"]
        points["weight"] = points["weight"] / points["weight"].mean()
    else:
        raise AnalysisError(f"unknown fit unit {unit!r} (use 'configuration' or 'seed')")
    return points[[*CONFIG_KEYS, "config", "gap", "improvement", "weight"]].reset_index(drop=True)


def gap_reliability(configs: pd.DataFrame) -> float:
    """Share of the spread of configuration gaps that is not seed noise: λ = 1 − mean(SD²/n) / var(gap means).

    The measured gap carries seed noise, so a regression on it is biased towards zero by the factor λ (errors
    in variables); λ near 1 means the bias is negligible. configs: rows of aggregate_configs(). NaN with fewer
    than two configurations or no spread.
    """
    if len(configs) < 2:
        return float("nan")
    spread = float(np.var(configs["gap_mean"].to_numpy(), ddof=1))
    noise = float(np.mean(configs["gap_sd"].to_numpy() ** 2 / configs["n_seeds"].to_numpy()))
    return 1.0 - noise / spread if spread > 0 else float("nan")
