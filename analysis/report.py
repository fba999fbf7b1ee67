"""`opsd analyze` end to end: results → fit → bootstrap → law.json, figures and report.md."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.aggregate import Unit, gap_reliability
from analysis.bootstrap import attach_bootstrap, bootstrap_draws, bootstrap_obstacles
from analysis.errors import AnalysisError
from analysis.fit import FitResult, fit_law
from analysis.law import FEW_CONFIGS, MIN_CONFIGS, MIN_LINE_CONFIGS, PAPER_CONTEXTS, Law, LineLaw
from analysis.results import completed_trials, decodings, join_steps, load_all_results, use_measure

# The verdict's thresholds: a law "holds" when its slope is positive with an interval that excludes zero and
# it predicts held-out configurations better than half their variance.
LOO_R2_HOLDS = 0.5
ALPHA = 0.05


@dataclass(frozen=True)
class AnalysisOutput:
    law: Law
    fit: FitResult
    out_dir: Path
    law_path: Path
    report_path: Path
    figures: dict[str, dict] = field(default_factory=dict)  # fig name → what the figure function returned


def _fit_method(settings: dict) -> str:
    if settings["weighted"]:
        return "WLS, weighted by the inverse seed variance of each configuration"
    return "WLS, each configuration weighted by its seed count" if settings.get("by_seeds") else "OLS"


def run_analysis(results: str | Path | Sequence[str | Path], out_dir: str | Path, *, unit: Unit = "configuration",
                 weighted: bool = False, by_seeds: bool | None = None, n_bootstrap: int = 1000, seed: int = 0,
                 confidence: float = 0.95,
                 progress: Callable[[int, int], None] | None = None, measure: str = "all_pass") -> AnalysisOutput:
    """Fit the law from RESULTS (folder with trials.parquet [+ steps.parquet], or the trials file; or several,
    each trial kept once: results.load_all_results) and write out_dir/law.json, out_dir/report.md and the
    figures (PNG and PDF). n_bootstrap=0 skips the bootstrap. `by_seeds` None: configuration means weighted by
    their seed counts for a guided sweep's results (`guided_sweep`), unweighted otherwise."""
    if n_bootstrap < 0:
        raise AnalysisError(f"--bootstrap must be 0 or more, got {n_bootstrap}")
    sources = [Path(results)] if isinstance(results, (str, Path)) else [Path(r) for r in results]
    raw_trials, raw_steps, n_repeated = load_all_results(sources)
    raw_trials, raw_steps = use_measure(raw_trials, measure), use_measure(raw_steps, measure)
    trials = completed_trials(raw_trials)
    if by_seeds is None:
        by_seeds = unit == "configuration" and not weighted and guided_sweep(raw_trials)
    fit = fit_law(trials, unit=unit, weighted=weighted, by_seeds=by_seeds, confidence=confidence)
    law = fit.law
    if n_bootstrap:
        obstacles = bootstrap_obstacles(fit)
        names = [*law.families, "pooled"]
        draws = (bootstrap_draws(trials, fit, n_resamples=n_bootstrap, seed=seed, progress=progress)
                 if any(name not in obstacles for name in names) else None)
        law = attach_bootstrap(law, draws, seed=seed, skip=obstacles)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    law_path = out / "law.json"
    law.save(law_path)

    from analysis.figures import fig1_law, fig2_dynamics, fig3_scale  # matplotlib only once there is a fit

    decoding = decodings(raw_trials)
    figures = {"fig1_law": fig1_law(fit, out, measure=measure)}
    steps = join_steps(raw_steps, raw_trials) if raw_steps is not None else None
    # Fig. 2 compares student and self-teacher at one decoding: it needs the student's train-time accuracy.
    left_out = []
    if steps is not None and steps["student_acc_t1"].notna().any():
        figures["fig2_dynamics"] = fig2_dynamics(steps, out, measure=measure, decoding=decoding["train"])
    elif steps is not None and not steps.empty:
        left_out.append("Fig. 2 is left out: the steps lack the student's accuracy at the self-teacher's "
                        "train-time decoding (`student_acc_t1`, or `gap`), and its validation accuracy is at "
                        "another decoding.")
    fitted_configs = fit.configs[fit.configs["model_family"].isin(list(law.families))]
    if fitted_configs["model_size_b"].nunique() > 1:
        figures["fig3_scale"] = fig3_scale(fit, out, measure=measure)

    report_path = out / "report.md"
    from analysis.predicted import predictions_section

    report = render_report(law, fit, figures, results=sources, n_all=len(raw_trials) + n_repeated,
                           n_repeated=n_repeated,
                           decoding=decoding, left_out=left_out, predictions=predictions_section(raw_trials, law))
    if measure == "tests":  # said once, under the title: every accuracy below is a fraction of tests
        title, _, rest = report.partition("\n")
        report = f"{title}\n\nAccuracy measure: the fraction of tests passed (`*_test_frac`), not all tests passed.\n{rest}"
    report_path.write_text(report)
    return AnalysisOutput(law=law, fit=fit, out_dir=out, law_path=law_path, report_path=report_path,
                          figures=figures)


def guided_sweep(raw_trials: pd.DataFrame) -> bool:
    """Whether the results hold a guided sweep's trials (`planned_hours`, written by `opsd sweep collect` for a
    guided sweep only). Its searcher trains a configuration's further seeds where they narrow the law most, so
    its configurations have unequal seeds by design, and it fits them by their seed counts: `opsd analyze`
    reports the same fit unless told otherwise."""
    return "planned_hours" in raw_trials.columns and bool(raw_trials["planned_hours"].notna().any())


def fmt_num(value, digits: int = 3) -> str:
    """A number with `digits` decimals, "n/a" for a missing or non-finite one (the report's and the CLI's)."""
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def fmt_ci(pair, digits: int = 3) -> str:
    """An interval as "[lo, hi]", "n/a" when there is none."""
    return "n/a" if pair is None else f"[{fmt_num(pair[0], digits)}, {fmt_num(pair[1], digits)}]"


def _p(value) -> str:
    if value is None or not np.isfinite(value):
        return "n/a"
    return f"{value:.2g}" if value >= 1e-4 else "<1e-4"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


HOW_MANY = (f"Intervals, p-values and leave-one-out need at least {MIN_CONFIGS} configurations, a fit on "
            f"fewer than {FEW_CONFIGS} stays weak, and the papers use {PAPER_CONTEXTS} contexts per model")


def _dof(df: float) -> str:
    return f"{df:g} residual degree{'' if df == 1 else 's'} of freedom"


def verdict(name: str, line: LineLaw) -> str:
    """One plain-language verdict on whether the law holds for this line.

    2 configurations: a line through two points, no verdict. 3 or 4 (fewer than FEW_CONFIGS): weak, whatever
    the slope, for want of degrees of freedom. From 5: holds, weak or not supported by the slope's interval
    (and its seed bootstrap) and the LOO R².
    """
    n = line.n_configs
    if not line.has_intervals:
        return (f"**{name}: no evidence either way ({n} configurations).** A fit on {MIN_LINE_CONFIGS} "
                f"configurations is a line through two points (slope {fmt_num(line.slope)}, intercept "
                f"{fmt_num(line.intercept)}): any two points lie on a line, so it tells nothing about the law, and "
                f"it has no intervals, p-values or leave-one-out. {HOW_MANY}: add contexts to the sweep.")
    lo, hi = line.slope_ci
    boot = (line.bootstrap or {}).get("slope_ci")
    positive = lo > 0 and (boot is None or boot[0] > 0)
    loo = line.loo_r2
    loo_text = f"held-out configurations are predicted with LOO R² {fmt_num(loo, 2)}"
    if n < FEW_CONFIGS:
        evidence = (f"the slope {fmt_num(line.slope, 2)} {fmt_ci(line.slope_ci, 2)} "
                    + ("is positive" if positive else "does not reliably exclude zero") + f" and {loo_text}")
        return (f"**{name}: weak ({n} configurations).** With only {n} configurations the fit has few degrees of "
                f"freedom ({_dof(n - 2)} between configurations): {evidence}, but each "
                f"held-out configuration is predicted from {n - 1} others and the intervals are wide. {HOW_MANY}: "
                f"add contexts before trusting it.")
    if not positive:
        return (f"**{name}: not supported.** The slope's interval {fmt_ci(line.slope_ci, 2)} does not exclude zero"
                f"{' (or its seed bootstrap does not)' if lo > 0 else ''}: the gap does not reliably predict "
                f"improvement here; {loo_text}.")
    intercept = ("the intercept's interval includes zero (no gap, no improvement)"
                 if line.intercept_ci[0] <= 0 <= line.intercept_ci[1] else
                 f"the intercept {fmt_num(line.intercept)} differs from zero")
    if loo is not None and np.isfinite(loo) and loo >= LOO_R2_HOLDS:
        return (f"**{name}: the law holds.** Each point of gap buys {fmt_num(line.slope, 2)} points of improvement "
                f"({fmt_ci(line.slope_ci, 2)}), {loo_text}, and {intercept}.")
    return (f"**{name}: weak.** The slope {fmt_num(line.slope, 2)} {fmt_ci(line.slope_ci, 2)} is positive, but "
            f"{loo_text} (below {LOO_R2_HOLDS}): the gap ranks configurations but predicts them poorly.")


CHECK_NAMES = {"intervals": "intervals, p-values, R²", "loo": "leave-one-configuration-out",
               "leave_one_size_out": "leave-one-size-out", "leave_one_family_out": "leave-one-family-out",
               "interaction_test": "the test of a shared slope", "bootstrap": "seed bootstrap"}


def _and(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def not_computed(law: Law) -> list[str]:
    """One line per law that lacks some check: which, and why (reasons shared by several checks once)."""
    lines = {**law.families, **({"pooled": law.pooled} if law.pooled else {})}
    out = []
    for name, line in lines.items():
        if name == "pooled" and len(law.families) == 1:
            family = next(iter(law.families))
            out.append(f"pooled: the line of {family} (one model family), so no leave-one-family-out and no test "
                       f"of a shared slope.")
            continue
        by_reason: dict[str, list[str]] = {}
        for check, reason in line.not_computed.items():
            by_reason.setdefault(reason, []).append(CHECK_NAMES.get(check, check))
        if by_reason:
            out.append(f"{name}: " + "; ".join(f"{_and(checks)} ({reason})"
                                               for reason, checks in by_reason.items()) + ".")
    return out


def _bootstrap_impossible(law: Law) -> bool:
    lines = [*law.families.values(), *([law.pooled] if law.pooled else [])]
    return all("bootstrap" in line.not_computed for line in lines)


def render_report(law: Law, fit: FitResult, figures: dict[str, dict], *, results: Path | Sequence[Path], n_all: int,
                  n_repeated: int = 0, decoding: dict[str, str | None] | None = None,
                  left_out: Sequence[str] = (), predictions: str | None = None) -> str:
    settings = law.settings
    unit = "configuration means" if settings["unit"] == "configuration" else "every seed as a point"
    sources = [results] if isinstance(results, Path) else list(results)
    repeated = (f"; {n_repeated} row{'s' * (n_repeated != 1)} left out as the same trial in an earlier result: "
                f"a trial shared by two sweeps counts once" if n_repeated else "")
    decoding = decoding or {}
    train_decoding = "train-time decoding" + (f" ({decoding['train']})" if decoding.get("train") else "")
    val_decoding = "validation decoding" + (f" ({decoding['validation']}, mean@n)" if decoding.get("validation")
                                            else " (mean@n)")
    parts = [
        "# The predictive law: improvement = a + b · initial gap",
        f"Results: {', '.join(f'`{s}`' for s in sources)} — {len(fit.configs)} configurations, "
        f"{int(fit.configs['n_seeds'].sum())} completed trials (of {n_all} rows{repeated}). Fit on {unit} by "
        f"{_fit_method(settings)}; "
        f"intervals at "
        f"{100 * settings['confidence']:g}%; "
        + (f"seed bootstrap with {settings['bootstrap']} resamples (seed {settings['seed']})."
           if settings["bootstrap"] else
           "no seed bootstrap: it is impossible on every line (see below)." if _bootstrap_impossible(law) else
           "no bootstrap."),
        "## Verdict",
    ]
    bullets = [verdict(name, line) for name, line in law.families.items()]
    if len(law.families) > 1 and law.pooled is not None:
        bullets.append(verdict("pooled (all families)", law.pooled))
        test = law.pooled.interaction_test
        if test:
            differ = test["p"] < ALPHA
            bullets.append(
                f"Do families share one slope? F = {fmt_num(test['f'], 2)} (df {test['df_num']:g}, "
                f"{test['df_den']:g}), p = {_p(test['p'])}: "
                + ("**the slopes differ**; use each family's own law." if differ else
                   f"no evidence that the slopes differ; the common slope is {fmt_num(test['common_slope'], 2)} "
                   f"{fmt_ci(test['common_slope_ci'], 2)}."))
        elif "interaction_test" in law.pooled.not_computed:
            bullets.append(f"Do families share one slope? Not testable here: "
                           f"{law.pooled.not_computed['interaction_test']}.")
    parts.append("\n".join(f"- {b}" for b in bullets))
    if law.skipped:
        parts.append("Families without a law: " + "; ".join(f"{f} ({r})" for f, r in law.skipped.items()) + ".")

    parts.append("## Fits")
    rows = []
    lines = {**law.families, **({"pooled": law.pooled} if law.pooled else {})}
    for name, line in lines.items():
        boot = line.bootstrap or {}
        loso = line.leave_one_size_out
        rows.append([
            name, str(line.n_configs), str(line.n_trials), f"{fmt_num(line.slope)} {fmt_ci(line.slope_ci)}",
            f"{fmt_num(line.intercept)} {fmt_ci(line.intercept_ci)}", fmt_num(line.r2), _p(line.slope_p),
            fmt_num(line.loo_r2), fmt_num(line.loo_rmse), fmt_num(loso["r2"]) if loso else "n/a",
            fmt_ci(boot.get("slope_ci")), fmt_ci(boot.get("loo_r2_ci")),
        ])
    parts.append(_table(["law", "configs", "trials", "slope [CI]", "intercept [CI]", "R²", "p (slope)",
                         "LOO R²", "LOO RMSE", "leave-size-out R²", "bootstrap slope", "bootstrap LOO R²"], rows))
    parts.append("LOO: each configuration (model × context) held out in turn, the line refitted on the rest "
                 "and the held-out configuration predicted; LOO R² = 1 − PRESS/SS_tot. Leave-size-out holds out "
                 "every configuration of one model size at once.")
    lofo = law.pooled.leave_one_family_out if law.pooled else None
    if lofo:
        parts.append(f"Leave one family out (pooled line, predicting a whole family from the others): "
                     f"R² {fmt_num(lofo['r2'])}, RMSE {fmt_num(lofo['rmse'])}.")
    missing = not_computed(law)
    if missing:
        parts.append("Not computed (impossible on these results; n/a in the table above, null in law.json):\n\n"
                     + "\n".join(f"- {item}" for item in missing))

    parts.append("## Configurations")
    parts.append(f"Means over seeds. The gap compares student and self-teacher at the same decoding, the "
                 f"{train_decoding}: gap = teacher₀ − student₀ there. The improvement is the student's at "
                 f"{val_decoding}: final − student₀ there.")
    rows = [[r.model_family, r.model, f"{r.model_size_b:g}", r.context, str(r.n_seeds),
             fmt_num(r.initial_student_t1_mean), fmt_num(r.initial_teacher_mean), f"{fmt_num(r.gap_mean)} ± {fmt_num(r.gap_sd)}",
             fmt_num(r.initial_student_mean), fmt_num(r.final_student_mean),
             f"{fmt_num(r.improvement_mean)} ± {fmt_num(r.improvement_sd)}"]
            for r in fit.configs.itertuples()]
    parts.append(_table(["family", "model", "size (B)", "context", "seeds", "student₀ (train-time)",
                         "teacher₀ (train-time)", "gap (mean ± SD)", "student₀ (validation)",
                         "student final (validation)", "improvement (mean ± SD)"], rows))

    parts.append("## Diagnostics")
    points = fit.points[fit.points["family_fitted"]]
    parts.append("Per fitted point of each family's line: residual, externally studentised residual, leverage, "
                 "Cook's distance and the leave-one-configuration-out prediction. Points with Cook's distance "
                 "above 4/n are marked ⚠ (they move the line on their own). A line through two configurations "
                 "has none of these (n/a): it passes through both.")
    notes = []
    for family in law.families:
        lam = gap_reliability(fit.configs[fit.configs["model_family"] == family])
        notes.append(f"{family}: λ = {fmt_num(lam, 3)}")
    parts.append("Seed noise in the measured gaps biases every slope towards zero by the reliability factor "
                 "λ = 1 − mean(SD²/n)/var(gap means) (errors in variables; λ near 1: negligible). "
                 + "; ".join(notes) + ".")
    rows = []
    for family, sub in points.groupby("model_family", sort=True):
        threshold = 4 / len(sub)
        for r in sub.itertuples():
            flag = " ⚠" if r.cooks_d > threshold else ""
            rows.append([family, r.model, r.context, fmt_num(r.gap), fmt_num(r.improvement), fmt_num(r.fitted),
                         fmt_num(r.residual), fmt_num(r.student_resid, 2), fmt_num(r.leverage, 2),
                         fmt_num(r.cooks_d, 2) + flag, fmt_num(r.loo_prediction)])
    parts.append(_table(["family", "model", "context", "gap", "improvement", "fitted", "residual",
                         "stud. resid.", "leverage", "Cook's D", "LOO pred."], rows))

    if predictions:  # a sweep screened first (analysis/predicted.py)
        parts.append(predictions)

    parts.append("## Figures")
    two_point = any(not line.has_intervals for line in law.families.values())
    captions = {
        "fig1_law": "Fig. 1 — improvement vs initial gap per family (1-SD error bars over seeds), fitted line "
                    "and its confidence band"
                    + (" (none on a line through two configurations)." if two_point else "."),
        "fig2_dynamics": f"Fig. 2 — student (solid) and self-teacher (dashed) accuracy on the validation problems "
                         f"over training, both at {train_decoding}.",
        "fig3_scale": "Fig. 3 — the law across model sizes.",
    }
    for name, caption in captions.items():
        if name in figures:
            parts.append(f"![{caption}]({name}.png)\n\n{caption} ([PDF]({name}.pdf))")
    parts.extend(left_out)
    return "\n\n".join(parts) + "\n"

