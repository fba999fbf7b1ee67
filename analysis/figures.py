"""The paper's three figures, from a FitResult (and steps for the dynamics), as PNG and PDF.

Figures are built on matplotlib's object API (no pyplot, so no global state and no display) at paper size:
single column 3.4 in, double 7 in, fonts of 7–8 pt. Each function returns what it drew, so tests can check
the plotted lines against the fit.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from matplotlib.ticker import MaxNLocator

from analysis.fit import FitResult, fit_line
from analysis.results import MEASURE_NAMES

SINGLE, DOUBLE = 3.4, 7.0  # column widths in inches
STYLE = {
    "font.size": 7, "axes.titlesize": 8, "axes.labelsize": 7.5, "legend.fontsize": 7,
    "xtick.labelsize": 7, "ytick.labelsize": 7, "lines.linewidth": 1.2, "axes.linewidth": 0.6,
    "axes.spines.top": False, "axes.spines.right": False, "savefig.dpi": 300, "pdf.fonttype": 42,
}
MARKERS = "osD^vP*X"


def gap_label(measure: str) -> str:
    """The gap axis, naming the accuracy measure (results.MEASURE_NAMES)."""
    return f"Initial gap: self-teacher − student\n({MEASURE_NAMES[measure]})"


def improvement_label(measure: str) -> str:
    return f"Improvement: final − initial student\n({MEASURE_NAMES[measure]})"


def _save(fig: Figure, out_dir: Path, stem: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{stem}.png", out_dir / f"{stem}.pdf"]
    for path in paths:
        fig.savefig(path)  # constrained layout already fits the page; a tight bbox would draw twice
    return paths


def _palette(names) -> dict[str, tuple]:
    names = list(names)
    cmap = matplotlib.colormaps["tab10" if len(names) <= 10 else "tab20"]
    return {name: cmap(i % cmap.N) for i, name in enumerate(names)}


def _fit_curve(res, x_lo: float, x_hi: float, confidence: float) -> dict[str, np.ndarray]:
    """The fitted line and its confidence band for the mean, on a grid across the gaps."""
    pad = 0.05 * (x_hi - x_lo)
    grid = np.linspace(x_lo - pad, x_hi + pad, 50)
    frame = res.get_prediction(np.column_stack([np.ones_like(grid), grid])).summary_frame(alpha=1 - confidence)
    return {"x": grid, "y": frame["mean"].to_numpy(),
            "band_lo": frame["mean_ci_lower"].to_numpy(), "band_hi": frame["mean_ci_upper"].to_numpy()}


def _line_curve(line) -> dict:
    """A line without intervals (two configurations) on the same grid as `_fit_curve`, with no band."""
    pad = 0.05 * (line.x_max - line.x_min)
    grid = np.linspace(line.x_min - pad, line.x_max + pad, 50)
    return {"x": grid, "y": line.intercept + line.slope * grid, "band_lo": None, "band_hi": None}


def _fmt(value) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.2f}"


def fig1_law(fit: FitResult, out_dir: str | Path, *, measure: str = "all_pass") -> dict:
    """Fig. 1: improvement vs gap per family — configuration means with 1-SD error bars over seeds on both
    axes, coloured by context, the fitted line with its confidence band, and slope, R², LOO R². A line
    through two configurations is drawn without a band, labelled as such.

    Returns {"paths": [...], "families": {family: {"x", "y", "band_lo", "band_hi", "slope", "intercept",
    "n_points"}}, "labels": {"x", "y"}} where slope/intercept are those of the drawn line; band_lo/band_hi are
    None without a band; the axis labels name the accuracy measure.
    """
    law = fit.law
    families = list(law.families)
    configs = fit.configs[fit.configs["model_family"].isin(families)]
    colours = _palette(sorted(configs["context"].unique()))
    drawn: dict[str, dict] = {}
    with matplotlib.rc_context(STYLE):
        width = SINGLE if len(families) == 1 else DOUBLE
        ncols = min(len(families), 3)
        nrows = -(-len(families) // ncols)
        fig = Figure(figsize=(width, 2.5 * nrows + 0.5), layout="constrained")
        axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
        for ax, family in zip(axes, families):
            line = law.families[family]
            sub = configs[configs["model_family"] == family]
            models = sorted(sub["model"].unique())
            for row in sub.itertuples():
                ax.errorbar(row.gap_mean, row.improvement_mean, xerr=row.gap_sd, yerr=row.improvement_sd,
                            fmt=MARKERS[models.index(row.model) % len(MARKERS)], color=colours[row.context],
                            ms=4, elinewidth=0.7, capsize=1.5, mec="white", mew=0.4, zorder=3)
            if line.has_intervals:
                curve = _fit_curve(fit.models[family], line.x_min, line.x_max, law.settings["confidence"])
                ax.fill_between(curve["x"], curve["band_lo"], curve["band_hi"], color="0.6", alpha=0.3, lw=0,
                                zorder=1)
                stats = (f"slope {line.slope:.2f} [{line.slope_ci[0]:.2f}, {line.slope_ci[1]:.2f}]\n"
                         f"$R^2$ {_fmt(line.r2)}, LOO $R^2$ {_fmt(line.loo_r2)}")
            else:  # a line through two configurations: no band, and the label says what it is
                curve = _line_curve(line)
                stats = f"slope {line.slope:.2f}, no interval\nline through {line.n_configs} points: no evidence"
            ax.plot(curve["x"], curve["y"], color="0.15", zorder=2)
            ax.axhline(0, color="0.7", lw=0.5, zorder=0)
            ax.set_title(family)
            ax.set_xlabel(gap_label(measure))
            ax.set_ylabel(improvement_label(measure))
            ax.text(0.03, 0.97, f"{stats}\n{line.n_configs} configs, {line.n_trials} trials",
                    transform=ax.transAxes, va="top", fontsize=7,
                    bbox={"boxstyle": "round,pad=0.3", "fc": "white", "ec": "0.8", "lw": 0.5})
            if len(models) > 1:
                handles = [Line2D([], [], ls="", marker=MARKERS[i % len(MARKERS)], color="0.3", ms=4, label=m)
                           for i, m in enumerate(models)]
                ax.legend(handles=handles, loc="lower right", frameon=False, title="model", title_fontsize=7)
            slope, intercept = np.polyfit(curve["x"], curve["y"], 1)
            drawn[family] = {**curve, "slope": float(slope), "intercept": float(intercept), "n_points": len(sub)}
        for ax in axes[len(families):]:
            ax.set_visible(False)
        handles = [Line2D([], [], ls="", marker="o", color=c, ms=4, label=ctx) for ctx, c in colours.items()]
        fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 2 if width == SINGLE else 3),
                   frameon=False, title="context", title_fontsize=7)
        paths = _save(fig, Path(out_dir), "fig1_law")
    return {"paths": paths, "families": drawn, "labels": {"x": gap_label(measure), "y": improvement_label(measure)}}


def fig2_dynamics(steps: pd.DataFrame, out_dir: str | Path, *, measure: str = "all_pass",
                  decoding: str | None = None) -> dict:
    """Fig. 2: student (solid) and self-teacher (dashed) accuracy on the validation problems over training
    steps, both at the same decoding: the train-time one (`decoding`, e.g. "T=1, top-p 1") at which the gap is
    measured (the student's `student_acc_t1`, the self-teacher's `teacher_acc`); one panel per context, one
    colour per model, mean over seeds with a ±1 SD band; whole steps on the x axis.

    steps: results.join_steps() output. Returns {"paths": [...], "curves": {(context, model): DataFrame
    with step, student_mean, student_sd, teacher_mean, teacher_sd}, "labels": {"x", "y"}, "xticks": the
    first panel's step ticks; the decoding is the legend's title}.
    """
    contexts = sorted(steps["context"].unique())
    colours = _palette(sorted(steps["model"].unique()))
    curves: dict[tuple[str, str], pd.DataFrame] = {}
    with matplotlib.rc_context(STYLE):
        ncols = min(len(contexts), 3)
        nrows = -(-len(contexts) // ncols)
        width = SINGLE if ncols == 1 else DOUBLE
        fig = Figure(figsize=(width, 1.9 * nrows + 0.6), layout="constrained")
        axes = fig.subplots(nrows, ncols, squeeze=False, sharex=True, sharey=True).ravel()
        for ax, context in zip(axes, contexts):
            for model, rows in steps[steps["context"] == context].groupby("model", sort=True):
                curve = rows.groupby("step").agg(
                    student_mean=("student_acc_t1", "mean"), student_sd=("student_acc_t1", "std"),
                    teacher_mean=("teacher_acc", "mean"), teacher_sd=("teacher_acc", "std")).fillna(0.0)
                curve = curve.reset_index()
                curves[(context, model)] = curve
                for who, ls in (("student", "-"), ("teacher", "--")):
                    mean, sd = curve[f"{who}_mean"], curve[f"{who}_sd"]
                    ax.plot(curve["step"], mean, ls=ls, color=colours[model])
                    ax.fill_between(curve["step"], mean - sd, mean + sd, color=colours[model], alpha=0.15, lw=0)
            ax.set_title(context)
        for ax in axes[len(contexts):]:
            ax.set_visible(False)
        for ax in axes[: len(contexts)]:
            ax.tick_params(labelbottom=True, labelleft=True)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 5, 10]))  # whole steps, round numbers
        fig.supxlabel("Training step", fontsize=7.5)
        ylabel = f"Validation accuracy\n({MEASURE_NAMES[measure]})"
        fig.supylabel(ylabel, fontsize=7.5)
        at = f"train-time decoding ({decoding})" if decoding else "train-time decoding"
        title = f"Student and self-teacher, both at {at}"
        handles = [Line2D([], [], color=c, label=m) for m, c in colours.items()]
        handles += [Line2D([], [], color="0.3", ls="-", label="student"),
                    Line2D([], [], color="0.3", ls="--", label="self-teacher")]
        fig.legend(handles=handles, loc="outside upper center", ncols=min(len(handles), 2 if width == SINGLE else 4),
                   frameon=False, title=title, title_fontsize=7.5)
        paths = _save(fig, Path(out_dir), "fig2_dynamics")
        xticks = [float(x) for x in axes[0].get_xticks() if axes[0].get_xlim()[0] <= x <= axes[0].get_xlim()[1]]
    return {"paths": paths, "curves": curves, "labels": {"x": "Training step", "y": ylabel, "title": title},
            "xticks": xticks}


def fig3_scale(fit: FitResult, out_dir: str | Path, *, measure: str = "all_pass") -> dict:
    """Fig. 3: the law across model sizes. (a) improvement vs gap coloured by size, one fitted line per model
    that has at least 3 configurations (else its family's line, dashed); (b) each such model's slope with its
    confidence interval against size, beside its family's slope (dashed line) and band. Panel (b) is left out
    when no model has 3 configurations (e.g. the paper's one context per size).

    Returns {"paths": [...], "models": {model: {"size", "family", "slope", "slope_ci", "line_slope"}},
    "family_lines": [families drawn as one line across sizes], "labels": {"x", "y"} of panel (a)}.
    """
    law = fit.law
    confidence = law.settings["confidence"]
    configs = fit.configs[fit.configs["model_family"].isin(list(law.families))]
    sizes = sorted(configs["model_size_b"].unique())
    cmap = matplotlib.colormaps["viridis"]
    size_colour = {s: cmap(0.85 * i / max(len(sizes) - 1, 1)) for i, s in enumerate(sizes)}
    families = sorted(configs["model_family"].unique())
    per_model: dict[str, dict] = {}
    for model, sub in configs.groupby("model", sort=True):
        if len(sub) >= 3 and np.ptp(sub["gap_mean"].to_numpy()) > 0:
            res = fit_line(sub["gap_mean"], sub["improvement_mean"])
            ci = np.asarray(res.conf_int(alpha=1 - confidence))[1]
            per_model[model] = {"size": float(sub["model_size_b"].iloc[0]), "family": sub["model_family"].iloc[0],
                                "slope": float(res.params[1]), "slope_ci": (float(ci[0]), float(ci[1])),
                                "intercept": float(res.params[0])}
    with matplotlib.rc_context(STYLE):
        if per_model:
            fig = Figure(figsize=(DOUBLE, 2.8), layout="constrained")
            ax_law, ax_slope = fig.subplots(1, 2)
        else:
            fig = Figure(figsize=(SINGLE, 2.8), layout="constrained")
            ax_law, ax_slope = fig.subplots(1, 1), None
        for model, sub in configs.groupby("model", sort=True):
            size, family = float(sub["model_size_b"].iloc[0]), sub["model_family"].iloc[0]
            colour, marker = size_colour[size], MARKERS[families.index(family) % len(MARKERS)]
            ax_law.errorbar(sub["gap_mean"], sub["improvement_mean"], xerr=sub["gap_sd"], yerr=sub["improvement_sd"],
                            fmt=marker, color=colour, ms=4, elinewidth=0.6, capsize=1.2, mec="white", mew=0.4)
            if model in per_model:
                d = per_model[model]
                xs = np.array([sub["gap_mean"].min(), sub["gap_mean"].max()])
                ys = d["intercept"] + d["slope"] * xs
                ax_law.plot(xs, ys, color=colour, lw=1)
                d["line_slope"] = float((ys[1] - ys[0]) / (xs[1] - xs[0]))
        family_lines = [f for f in families if not any(v["family"] == f for v in per_model.values())]
        for family in family_lines:
            line = law.families[family]
            xs = np.array([line.x_min, line.x_max])
            ax_law.plot(xs, line.intercept + line.slope * xs, color="0.3", ls="--", lw=1, zorder=0)
        ax_law.axhline(0, color="0.7", lw=0.5, zorder=0)
        ax_law.set_xlabel(gap_label(measure))
        ax_law.set_ylabel(improvement_label(measure))
        ax_law.set_title("(a) the law at each size" if ax_slope is not None else "The law across model sizes")
        handles = [Line2D([], [], ls="", marker="o", color=c, ms=4, label=f"{s:g}B") for s, c in size_colour.items()]
        if len(families) > 1:
            handles += [Line2D([], [], ls="", marker=MARKERS[i % len(MARKERS)], color="0.3", ms=4, label=f)
                        for i, f in enumerate(families)]
        if family_lines:
            handles.append(Line2D([], [], color="0.3", ls="--", label="family fit"))
        ax_law.legend(handles=handles, loc="upper left", frameon=False, ncols=2 if len(handles) > 5 else 1)

        if ax_slope is not None:
            for i, family in enumerate(families):
                line = law.families[family]
                colour = f"C{i}"
                ax_slope.axhline(line.slope, color=colour, ls="--", lw=0.8, label=f"{family} (all sizes)")
                if line.slope_ci is not None:
                    ax_slope.axhspan(*line.slope_ci, color=colour, alpha=0.12, lw=0)
                items = [v for v in per_model.values() if v["family"] == family]
                if items:
                    err = np.array([[v["slope"] - v["slope_ci"][0], v["slope_ci"][1] - v["slope"]] for v in items]).T
                    ax_slope.errorbar([v["size"] for v in items], [v["slope"] for v in items], yerr=err,
                                      fmt=MARKERS[i % len(MARKERS)], color=colour, ms=4, capsize=2, elinewidth=0.8)
            lo, hi = ax_slope.get_ylim()
            ax_slope.set_ylim(lo, hi + 0.3 * (hi - lo))  # headroom for the legend above the intervals
            ax_slope.set_xscale("log")
            ax_slope.set_xticks(sizes, [f"{s:g}" for s in sizes])
            ax_slope.minorticks_off()
            ax_slope.set_xlabel("Model size (billions of parameters)")
            ax_slope.set_ylabel(f"Slope ({100 * confidence:g}% CI)")
            ax_slope.set_title("(b) slope of the law by size")
            ax_slope.legend(loc="upper left", frameon=False, ncols=2)
        paths = _save(fig, Path(out_dir), "fig3_scale")
    for d in per_model.values():
        d.pop("intercept")
    return {"paths": paths, "models": per_model, "family_lines": family_lines,
            "labels": {"x": gap_label(measure), "y": improvement_label(measure)}}
