"""`opsd analyze` (fit the law, write law.json, figures and report.md) and the prediction half of `opsd screen`
(`screen_gaps`: predicted improvements from measured gaps with an earlier law). No torch, Ray or vLLM: both run
on a laptop. `opsd screen` itself is registered by orchestrator/screen_cli.py, which also measures gaps from a
trial or sweep file (the analysis may not import the trainer)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ANALYZE_EPILOG = """\
examples:
  opsd analyze runs/sweep --out report/                      configuration means, 1000 bootstrap resamples
  opsd analyze runs/sweep/trials.parquet --out report/ --seed-level --bootstrap 0
  opsd analyze runs/sweep --out report/ --weighted --bootstrap 2000 --seed 7
  opsd analyze runs/sweep --out report/ --by-seeds          unequal seeds per configuration
  opsd analyze runs/guided-sweep --out report/ --unweighted  a guided sweep fitted by OLS, not by its seeds
  opsd analyze /shared/opsd-sweeps/paper-fig1 /shared/opsd-sweeps/paper-fig3 --out report/

RESULTS is a folder holding trials.parquet (and optionally steps.parquet for Fig. 2) or the trials file; give
several (e.g. two sweeps) to fit them together: a trial found in more than one (shared by two sweeps, or
the same settings trained twice) is kept once.
Writes OUT/law.json, OUT/report.md, OUT/fig1_law.{png,pdf}, OUT/fig2_dynamics.{png,pdf} (when steps
exist) and OUT/fig3_scale.{png,pdf} (when several model sizes exist).
"""

def register(subparsers) -> None:
    analyze = subparsers.add_parser(
        "analyze", help="fit the predictive law from sweep results",
        description="Fit improvement = a + b·gap per model family from trials.parquet: intervals, "
                    "leave-one-configuration-out CV, seed bootstrap, figures and a report.",
        epilog=ANALYZE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    analyze.add_argument("results", nargs="+", metavar="RESULTS", help="results folders or trials files")
    analyze.add_argument("--out", required=True, metavar="DIR", help="folder for law.json, figures, report.md")
    analyze.add_argument("--seed-level", action="store_true",
                         help="fit every seed as a point instead of configuration means")
    weights = analyze.add_mutually_exclusive_group()
    weights.add_argument("--weighted", action="store_true",
                         help="weight configurations by the inverse variance of their mean over seeds")
    weights.add_argument("--by-seeds", dest="by_seeds", action="store_const", const=True, default=None,
                         help="weight configurations by their seed counts (for unequal seeds; the default for a "
                              "guided sweep's results, whose searcher trains seeds unequally and fits them so)")
    weights.add_argument("--unweighted", dest="by_seeds", action="store_const", const=False,
                         help="configuration means unweighted (OLS; the default except for a guided sweep)")
    analyze.add_argument("--bootstrap", type=int, default=1000, metavar="N",
                         help="seed-bootstrap resamples (0 = none; default 1000)")
    analyze.add_argument("--seed", type=int, default=0, metavar="S", help="random seed of the bootstrap (default 0)")
    analyze.add_argument("--confidence", type=float, default=0.95, help="level of every interval (default 0.95)")
    analyze.add_argument("--measure", choices=["all_pass", "tests"], default="all_pass",
                         help="accuracy measure: all tests passed (default) or the fraction of tests passed")
    analyze.set_defaults(func=_analyze)


class _DelayedProgress:
    """A rich progress bar that appears only once the work has run for more than `delay` seconds."""

    def __init__(self, description: str, delay: float = 1.0):
        self.description, self.delay = description, delay
        self.started = time.monotonic()
        self.bar = None
        self.task = None

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            if time.monotonic() - self.started < self.delay or done >= total:
                return
            from rich.console import Console
            from rich.progress import Progress

            # stderr, so that the summary printed on stdout stays clean for pipes.
            self.bar = Progress(console=Console(stderr=True), transient=True)
            self.bar.start()
            self.task = self.bar.add_task(self.description, total=total)
        self.bar.update(self.task, completed=done)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _analyze(args: argparse.Namespace) -> int:
    from analysis.report import fmt_ci, fmt_num, run_analysis

    progress = _DelayedProgress("bootstrap over seeds")
    try:
        output = run_analysis(args.results, args.out, unit="seed" if args.seed_level else "configuration",
                              weighted=args.weighted, by_seeds=args.by_seeds, n_bootstrap=args.bootstrap,
                              seed=args.seed, confidence=args.confidence, progress=progress, measure=args.measure)
    finally:
        progress.close()
    if output.law.settings.get("by_seeds") and args.by_seeds is None:
        print("a guided sweep: configurations weighted by their seed counts, as its searcher fits them "
              "(--unweighted for OLS)")
    for name, line in output.law.families.items():
        if line.has_intervals:
            stats = f"slope CI {fmt_ci(line.slope_ci)}  R² {fmt_num(line.r2)}  LOO R² {fmt_num(line.loo_r2)}"
        else:
            stats = f"a line through {line.n_configs} points: no intervals, no LOO, no evidence about the law"
        print(f"{name}: improvement = {line.intercept:.4f} + {line.slope:.3f}·gap  {stats}  "
              f"({line.n_configs} configs, {line.n_trials} trials)")
    for name, reason in output.law.skipped.items():
        print(f"{name}: no law ({reason})")
    print(f"wrote {output.law_path}, {output.report_path} and "
          f"{sum(len(f['paths']) for f in output.figures.values())} figure files in {output.out_dir}")
    return 0


def screen_gaps(gaps: str | Path, law: str | Path, *, out: str | Path | None = None, pooled: bool = False,
                measure: str = "all_pass") -> int:
    """`opsd screen GAPS --law LAW.json`: print (and with `out` write) the predicted improvement and its
    prediction interval for each row of a table of measured gaps."""
    from analysis.errors import AnalysisError
    from analysis.predict import load_gaps, screen
    from analysis.results import use_measure

    predictions = screen(law, use_measure(load_gaps(Path(gaps)), measure), pooled=pooled)
    if out:
        out = Path(out)
        suffix = out.suffix.lower()
        if suffix == ".csv":
            predictions.to_csv(out, index=False)
        elif suffix == ".parquet":
            predictions.to_parquet(out, index=False)
        elif suffix == ".json":
            predictions.to_json(out, orient="records", indent=2)
        else:
            raise AnalysisError(f"--out {out}: unknown format {suffix!r} (use .csv, .parquet or .json)")
        print(f"wrote {len(predictions)} predictions to {out}", file=sys.stderr)
    from rich.console import Console

    Console().print(predictions_table(predictions))
    return 0


def predictions_table(predictions):
    """The predictions as a table narrow enough for an 80-column terminal: the model column only when there
    are several models, an extrapolated prediction starred (its gap is outside the law's range)."""
    from rich.table import Table

    models = predictions["model"].unique()
    laws = predictions["law"].unique()
    table = Table(title=f"Predicted improvement ({', '.join(map(str, laws))} law)" if len(laws) == 1 else
                  "Predicted improvement", caption="* gap outside the fitted range: an extrapolation",
                  caption_justify="left", title_justify="left")
    several = len(models) > 1
    if several:
        table.add_column("model", overflow="fold")
    for name in ("context", "gap", "predicted \\[lo, hi]"):
        table.add_column(name, justify="left" if name == "context" else "right", overflow="fold")
    for row in predictions.itertuples():
        cells = [row.context, f"{row.initial_gap:+.3f}",
                 f"{row.predicted_improvement:+.3f}{'*' if row.extrapolated else ''} [{row.pi_lo:+.3f}, {row.pi_hi:+.3f}]"]
        table.add_row(*([str(row.model)] if several else []), *cells)
    return table
