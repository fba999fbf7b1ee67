"""The report's check of predictions against outcomes, for a sweep screened before it trained (a guided sweep,
or one whose screen predicted with an earlier law): each trained trial's prediction, made before it trained,
against its realized improvement; the configurations never trained, predicted by the law just fitted; and
the device-hours spent against the full grid's."""

from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.law import Law
from analysis.predict import predict_improvement

SKIPPED = "skipped"


def _num(v, digits: int = 3, sign: bool = True) -> str:
    return "n/a" if v is None or not np.isfinite(v) else f"{v:+.{digits}f}" if sign else f"{v:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def check_predictions(trials: pd.DataFrame, *, confidence: float) -> dict | None:
    """Trials with a prediction made before training and a realized improvement: n, the share inside their
    prediction intervals, the mean error (realized − predicted) and the RMSE; None without any."""
    if "predicted_improvement" not in trials.columns:
        return None
    done = trials[trials["status"].astype(str).str.lower().eq("completed")]
    done = done[pd.to_numeric(done["predicted_improvement"], errors="coerce").notna()]
    if done.empty:
        return None
    predicted = done["predicted_improvement"].to_numpy(dtype=float)
    realized = done["improvement"].to_numpy(dtype=float)
    inside = (done["pi_lo"].to_numpy(dtype=float) <= realized) & (realized <= done["pi_hi"].to_numpy(dtype=float))
    error = realized - predicted
    return {"n": len(done), "inside": float(inside.mean()), "mean_error": float(error.mean()),
            "rmse": float(np.sqrt(np.mean(error ** 2))), "confidence": confidence, "rows": done.assign(inside=inside)}


def predictions_section(raw_trials: pd.DataFrame, law: Law) -> str | None:
    """The markdown section, or None for a sweep without screened gaps or predictions."""
    if "screened_gap" not in raw_trials.columns and "predicted_improvement" not in raw_trials.columns:
        return None
    confidence = float(law.settings.get("confidence", 0.95))
    parts = ["## Predictions checked against outcomes"]
    stopped = raw_trials["guided_stopped"].dropna() if "guided_stopped" in raw_trials.columns else pd.Series([])
    if len(stopped):
        parts.append(f"A guided sweep: its searcher chose each trial after a screen of every configuration, and "
                     f"stopped: {stopped.iloc[0]}.")
    status = raw_trials["status"].astype(str).str.lower()
    completed = raw_trials[status.eq("completed")]
    seeds = completed.groupby(["model", "context"]).size()
    if seeds.nunique() > 1 and not law.settings.get("by_seeds") and not law.settings.get("weighted"):
        parts.append("Its configurations have unequal seeds: the unweighted fit above gives a configuration of one "
                     "seed the weight of one of several, and its intervals then misstate the slope's uncertainty. "
                     "`opsd analyze --by-seeds` weights each configuration by its seeds, as the guided policy "
                     "fits.")
    check = check_predictions(raw_trials, confidence=confidence)
    if check is None:
        parts.append("No trained trial had a prediction before it trained (no line could predict yet).")
    else:
        unpredicted = len(completed) - check["n"]
        parts.append(
            f"{check['n']} trained trial(s) had a prediction, with its {confidence:.0%} prediction interval, made "
            f"before they trained: **{check['inside']:.0%} of the realized improvements fall inside their interval** "
            f"(nominal {confidence:.0%}); realized − predicted: mean {_num(check['mean_error'])}, RMSE "
            f"{_num(check['rmse'], sign=False)}."
            + (f" {unpredicted} trial(s) trained before any line could predict them (the first configurations of "
               f"a family) have none." if unpredicted else ""))
        rows = [[r.model_family, str(r.model), r.context, str(r.seed), _num(getattr(r, "screened_gap", np.nan)),
                 f"{_num(r.predicted_improvement)} [{_num(r.pi_lo)}, {_num(r.pi_hi)}]", _num(r.improvement),
                 "yes" if r.inside else "**no**", str(r.prediction_law)]
                for r in check["rows"].itertuples()]
        parts.append(_table(["family", "model", "context", "seed", "screened gap", "predicted [PI]", "realized",
                             "inside", "predicted by"], rows))
    untrained = raw_trials[status.eq(SKIPPED)] if "screened_gap" in raw_trials.columns else raw_trials.iloc[:0]
    trained_configs = set(zip(completed["model"], completed["context"]))
    untrained = untrained[[k not in trained_configs for k in zip(untrained["model"], untrained["context"])]]
    if not untrained.empty:
        configs = untrained.drop_duplicates(["model", "context"])
        rows = []
        for r in configs.itertuples():
            line = law.families.get(r.model_family)
            if line is None or not line.has_intervals or not np.isfinite(r.screened_gap):
                rows.append([r.model_family, str(r.model), r.context, _num(r.screened_gap), "n/a (no law with intervals)"])
                continue
            p = predict_improvement(law, r.model_family, [r.screened_gap]).iloc[0]
            rows.append([r.model_family, str(r.model), r.context, _num(r.screened_gap),
                         f"{_num(p.predicted_improvement)} [{_num(p.pi_lo)}, {_num(p.pi_hi)}]"])
        parts.append(f"{len(configs)} configuration(s) were never trained; the law fitted above predicts them from "
                     f"their screened gaps:")
        parts.append(_table(["family", "model", "context", "screened gap", "predicted improvement [PI]"], rows))
    if "planned_hours" in raw_trials.columns:
        hours = pd.to_numeric(raw_trials["planned_hours"], errors="coerce")
        ran = ~status.isin([SKIPPED, "pending"])
        spent, full = float(hours[ran].sum()), float(hours.sum())
        gpu = pd.to_numeric(completed["gpu_hours"], errors="coerce").sum() if "gpu_hours" in completed.columns else 0
        measured = f"; measured by the trials: {gpu:.3g} GPU-hours" if gpu > 0 else ""  # 0 on CPUs
        parts.append(f"Device-hours: **{spent:.3g} spent on {int(ran.sum())} trial(s), against {full:.3g} for the full "
                     f"grid of {len(raw_trials)}** ({spent / full:.0%}; the plan's estimates, the budget's unit"
                     f"{measured}).")
    return "\n\n".join(parts)
