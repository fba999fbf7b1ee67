"""Guided sweeps against the full grid, simulated at the paper's scale: Fig. 1's grid (Qwen3-8B × 6 contexts × 3
seeds, Olmo-3-7B-Instruct × 6 × 2 seeds, the plan's GPU-hours per trial from sweeps/paper_fig1.yaml), outcomes
drawn from the analysis's synthetic generator (analysis/synthetic.py: the paper's two families and their laws,
seed noise on the gap and the improvement, gaps spread as the paper's contexts spread them).

Each simulated sweep draws one grid of outcomes; the full grid trains all 30 trials, the grid thinned evenly
its first one or two seeds of every configuration, each guided policy (analysis/guided.py) the trials it
chooses, one at a time, the screen's gap of a configuration being its first seed's measured gap (the screen
samples what that trial's first evaluation samples). Every sweep is then fitted as `opsd analyze --by-seeds`
fits it (configuration means weighted by their seed counts; the same as the default unweighted fit wherever a
family's configurations have equal seeds, as in the full grid) and compared with the true law.

    python benchmarks/guided_vs_grid.py                 500 sweeps (a few minutes)
    python benchmarks/guided_vs_grid.py --sweeps 2000 --improvement-noise 0.03
    python benchmarks/guided_vs_grid.py --config-scatter 0.01 --only law   configurations that miss the law
    python benchmarks/guided_vs_grid.py --unweighted --by-stop            as `opsd analyze` fits by default

Printed per policy: GPU-hours (mean, and against the full grid), trials, the slope's RMSE against the true law
and the coverage of its 95% interval per family, how the runs stopped, and for every policy how often the
configuration it measured best is the truly best one (the `best` goal's aim). The `law` goal's target is the
median width of the full grid's slope intervals in a pilot of the same number of sweeps (other seeds): "as
precise as the full grid". Then the least slope SD that any choice of half of each family's grid trials can
have (noise known): what no policy restricted to the grid's trials can beat; and the same with up to six seeds
per context to choose from (a sweep file listing more seeds than Fig. 1's).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis.aggregate import aggregate_configs  # noqa: E402
from analysis.fit import fit_line  # noqa: E402
from analysis.guided import Candidate, Outcome, Policy, run_sequential  # noqa: E402
from analysis.law import MIN_CONFIGS  # noqa: E402
from analysis.synthetic import CONTEXT_GAPS, LAWS, MODELS, expected_gap, make_trials  # noqa: E402

FAMILIES = ("qwen3", "olmo3")
FIG1_MODELS = [m for m in MODELS if m[0] in ("Qwen3-8B", "Olmo-3-7B-Instruct")]  # (model, family, size)
SEEDS = {"qwen3": 3, "olmo3": 2}  # METHOD.md section 5 / sweeps/paper_fig1.yaml


def plan_costs() -> dict[str, float]:
    """GPU-hours per trial of Fig. 1 by family, from `opsd sweep plan`'s cost model on sweeps/paper_fig1.yaml."""
    from orchestrator.plan import estimate
    from orchestrator.sweep_file import load_sweep

    root = Path(__file__).resolve().parents[1]
    sweep, points = load_sweep(root / "sweeps" / "paper_fig1.yaml")
    hours = {}
    for e in estimate(sweep, points, []):
        hours[e.point.config.model.family] = e.device_hours
    return hours


def draw_grid(rng: np.random.Generator, costs: dict[str, float], *, config_scatter: float = 0.0,
              **noise) -> tuple[pd.DataFrame, list[Candidate]]:
    trials = make_trials(rng, models=FIG1_MODELS, n_seeds=max(SEEDS.values()), n_failed=0, **noise)
    trials = trials[trials["seed"] < trials["model_family"].map(SEEDS)].reset_index(drop=True)
    # Configurations that miss the law by their own amount (every seed alike): the scatter a fit on
    # configuration means carries in its residual variance, and seeds cannot average away.
    keys = trials["model"] + "|" + trials["context"]
    offsets = dict(zip(keys.unique(), rng.normal(0, config_scatter, keys.nunique()))) if config_scatter else {}
    trials = trials.assign(offset=keys.map(offsets).fillna(0.0) if offsets else 0.0)
    trials["improvement"] = trials["improvement"] + trials["offset"]
    screened = trials[trials["seed"] == 0].set_index(["model", "context"])["initial_gap"]
    candidates = [Candidate(r.trial_id, r.model_family, r.model, r.context, int(r.seed),
                            float(screened[(r.model, r.context)]), costs[r.model_family]) for r in trials.itertuples()]
    return trials, candidates


def best_design(family: str, trials: int, *, improvement_noise: float, gap_noise: float,
                config_scatter: float = 0.0, max_seeds: int | None = None) -> tuple[float, tuple[int, ...]]:
    """The least slope SD that a fit on configuration means weighted by their seed counts can have with
    `trials` of the family's grid trials, over every allocation of seeds to its six contexts (at most the
    grid's seeds each, or `max_seeds`: a grid with more seeds to choose from; at least MIN_CONFIGS contexts),
    the noise known and the gaps the generator's expected ones: (SD, seeds per context). A bound no policy
    restricted to those trials beats on average; the slope variance is Σ n_i²·d_i²·(τ² + σ²/n_i)/(Σ n_i·d_i²)²,
    d_i about the seed-weighted mean gap, with σ² = improvement noise² + slope²·gap noise² per seed (the errors
    in x)."""
    import itertools

    size = next(m[2] for m in FIG1_MODELS if m[1] == family)
    gaps = np.array([expected_gap(context, size) for context in CONTEXT_GAPS])
    sigma2 = improvement_noise ** 2 + LAWS[family][1] ** 2 * gap_noise ** 2
    best = (np.inf, ())
    for n in itertools.product(range((max_seeds or SEEDS[family]) + 1), repeat=len(gaps)):
        n = np.array(n)
        if n.sum() > trials or (n > 0).sum() < MIN_CONFIGS:
            continue
        x, m = gaps[n > 0], n[n > 0]
        dev2 = (x - np.average(x, weights=m)) ** 2
        sd = float(np.sqrt(np.sum(m ** 2 * dev2 * (config_scatter ** 2 + sigma2 / m))) / np.sum(m * dev2))
        best = min(best, (sd, tuple(int(v) for v in n)))
    return best


def evaluate(trials: pd.DataFrame, trained: list[str], *, by_seeds: bool = True) -> dict:
    """The fit of the trained trials as `opsd analyze --by-seeds` fits (configuration means weighted by their
    seed counts: the analysis's aggregate_configs and fit_line, without fit_law's diagnostics), or with
    `by_seeds` False as `opsd analyze` fits by default (unweighted), against the truth."""
    sub = trials[trials["trial_id"].isin(trained)]
    out: dict = {"hours": float(sub["cost"].sum()), "trials": len(sub)}
    configs = aggregate_configs(sub)
    for family in FAMILIES:
        mine = configs[configs["model_family"] == family]
        true_slope = LAWS[family][1]
        out[f"{family}_err"] = out[f"{family}_cover"] = out[f"{family}_width"] = np.nan
        if len(mine) < MIN_CONFIGS:
            continue
        res = fit_line(mine["gap_mean"], mine["improvement_mean"], weights=mine["n_seeds"] if by_seeds else None)
        lo, hi = np.asarray(res.conf_int(alpha=0.05))[1]
        out[f"{family}_err"] = float(res.params[1]) - true_slope
        out[f"{family}_cover"] = float(lo <= true_slope <= hi)
        out[f"{family}_width"] = hi - lo
    truth = trials.assign(true=[LAWS[f][0] + LAWS[f][1] * g + o
                                for f, g, o in zip(trials["model_family"], trials["true_gap"], trials["offset"])])
    true_best = truth.groupby(["model", "context"])["true"].first().idxmax()
    measured = sub.groupby(["model", "context"])["improvement"].mean()
    out["best_found"] = float(len(measured) > 0 and measured.idxmax() == true_best)
    return out


def simulate(n_sweeps: int, seed: int, policies: dict[str, Policy | int | None], costs: dict[str, float], *,
             by_seeds: bool = True, **noise) -> pd.DataFrame:
    """One row per (policy, sweep). A policy None trains the full grid, an int the grid's first that many seeds
    of every configuration (the grid thinned evenly), a Policy what it chooses."""
    rows = []
    rng = np.random.default_rng(seed)
    for i in range(n_sweeps):
        trials, candidates = draw_grid(rng, costs, **noise)
        trials = trials.assign(cost=trials["model_family"].map(costs))
        outcomes = {r.trial_id: Outcome(r.initial_gap, r.improvement) for r in trials.itertuples()}
        for name, policy in policies.items():
            if policy is None or isinstance(policy, int):
                kept = trials if policy is None else trials[trials["seed"] < policy]
                rows.append({"policy": name, "sweep": i, "stop": "-",
                             **evaluate(trials, list(kept["trial_id"]), by_seeds=by_seeds)})
                continue
            decisions, done = run_sequential(candidates, outcomes, policy)
            stop = decisions[-1].reason.split(":")[0]
            stop = "grid of one family exhausted" if stop.startswith("grid exhausted for") else \
                "no trial narrows one family's interval" if stop.startswith("no trial left is expected") else stop
            rows.append({"policy": name, "sweep": i, "stop": stop, **evaluate(trials, list(done), by_seeds=by_seeds)})
    return pd.DataFrame(rows)


def table(results: pd.DataFrame, grid_hours: float) -> str:
    lines = ["| policy | GPU-hours (of the grid) | trials | slope RMSE qwen3 / olmo3 | 95% CI coverage qwen3 / olmo3 "
             "| CI width qwen3 / olmo3 (median) | best config found | stops |", "|" + "---|" * 8]
    for name, sub in results.groupby("policy", sort=False):
        def rmse(f):
            e = sub[f"{f}_err"].dropna()
            return np.sqrt(np.mean(e ** 2)) if len(e) else np.nan
        fitted = min(sub[f"{f}_err"].notna().mean() for f in FAMILIES)
        stops = Counter(sub["stop"])
        stop_text = "-" if list(stops) == ["-"] else ", ".join(f"{k} {v / len(sub):.0%}" for k, v in stops.most_common())
        lines.append(
            f"| {name} | {sub['hours'].mean():.0f} ({sub['hours'].mean() / grid_hours:.0%}) | {sub['trials'].mean():.1f} "
            f"| {rmse('qwen3'):.3f} / {rmse('olmo3'):.3f}"
            + (f" ({fitted:.0%} fitted)" if fitted < 1 else "")
            + f" | {sub['qwen3_cover'].mean():.1%} / {sub['olmo3_cover'].mean():.1%} "
            f"| {sub['qwen3_width'].median():.3f} / {sub['olmo3_width'].median():.3f} "
            f"| {sub['best_found'].mean():.0%} | {stop_text} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sweeps", type=int, default=500, help="simulated sweeps (default 500)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--improvement-noise", type=float, default=0.015,
                        help="SD of a seed's improvement about its configuration's law value (default 0.015)")
    parser.add_argument("--gap-noise", type=float, default=0.01, help="SD of a measured gap (default 0.01)")
    parser.add_argument("--config-scatter", type=float, default=0.0,
                        help="SD of each configuration's own miss of the law, alike for its seeds (default 0)")
    parser.add_argument("--unweighted", action="store_true",
                        help="fit configuration means unweighted, as `opsd analyze` does by default (default: "
                             "weighted by their seed counts, as `opsd analyze --by-seeds`)")
    parser.add_argument("--only", metavar="TEXT", help="run only the policies whose name contains TEXT")
    parser.add_argument("--by-stop", action="store_true", help="also print coverage per family and stop reason")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    costs = plan_costs()
    grid_hours = sum(costs[f] * 6 * n for f, n in SEEDS.items())
    noise = {"improvement_noise": args.improvement_noise, "gap_noise": args.gap_noise,
             "config_scatter": args.config_scatter}
    pilot = simulate(args.sweeps, args.seed + 1_000_003, {"full grid": None}, costs, by_seeds=not args.unweighted,
                     **noise)
    target = float(np.nanmedian(pilot[[f"{f}_width" for f in FAMILIES]].to_numpy()))
    policies = {
        "full grid (Fig. 1)": None,
        "grid thinned evenly: 2 seeds per configuration": 2,
        "grid thinned evenly: 1 seed per configuration": 1,
        f"guided, goal law (slope CI < {target:.3f})": Policy("law", slope_ci_width=target),
        f"guided, goal law (slope CI < {1.5 * target:.3f})": Policy("law", slope_ci_width=1.5 * target),
        f"guided, goal law, budget {grid_hours / 2:.0f} GPU-h": Policy("law", slope_ci_width=target,
                                                                       max_hours=grid_hours / 2),
        "guided, goal best": Policy("best"),
    }
    if args.only:
        policies = {k: v for k, v in policies.items() if args.only in k or v is None}
    results = simulate(args.sweeps, args.seed, policies, costs, by_seeds=not args.unweighted, **noise)
    print(f"Simulated: {args.sweeps} sweeps drawn from analysis/synthetic.py (laws {LAWS}, gap noise "
          f"{args.gap_noise}, improvement noise {args.improvement_noise}, configuration scatter "
          f"{args.config_scatter}); Fig. 1's grid of 30 trials, "
          f"{', '.join(f'{f} {h:.1f} GPU-h' for f, h in costs.items())} per trial (`opsd sweep plan`): "
          f"{grid_hours:.0f} GPU-hours. Law target: the full grid's median slope-CI width in a pilot, {target:.3f}.")
    print()
    print(table(results, grid_hours))
    print()
    bound = {f: best_design(f, 6 * SEEDS[f] // 2, **noise) for f in FAMILIES}
    full = {f: best_design(f, 6 * SEEDS[f], **noise)[0] for f in FAMILIES}
    print("The least slope SD any design of the grid's trials has at half of each family's trials (noise known, "
          "chosen in hindsight): " + " / ".join(f"{f} {bound[f][0]:.3f} (seeds per context {bound[f][1]})"
                                                for f in FAMILIES)
          + "; the full grid's: " + " / ".join(f"{full[f]:.3f}" for f in FAMILIES) + ".")
    wider = {f: best_design(f, 6 * SEEDS[f] // 2, max_seeds=6, **noise) for f in FAMILIES}
    print("With up to 6 seeds per context to choose from (a sweep file listing more seeds than Fig. 1's), the "
          "least at the same trials: " + " / ".join(
              f"{f} {wider[f][0]:.3f} = {wider[f][0] / full[f]:.2f}x the full grid's (seeds per context "
              f"{wider[f][1]})" for f in FAMILIES)
          + ": even chosen in hindsight, half the hours reach the full grid's precision only with all but one "
            "trial at the two ends of the gap range (three contexts, one residual degree of freedom).")
    if args.by_stop:
        for f in FAMILIES:
            by = results.groupby(["policy", "stop"], sort=False)[f"{f}_cover"].agg(["mean", "count"])
            print(f"\ncoverage of {f} by stop:\n{by.to_string()}")
    print()
    print(f"{time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
